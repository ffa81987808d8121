"""The example scripts in examples/ run (fine-tuning and export on the tiny preset) or parse (the SLURM script)."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from tests.tolerances import float32_bound, model_depth, model_terms
from train.config import load_train_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_slurm_script_is_valid_bash_and_its_settings_are_valid_keys():
    script = ROOT / "examples" / "slurm_train.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    overrides = [s.replace('"$RUN_DIR"', "/shared/runs/x") for s in re.findall(r"--set (\S+)", text)]
    cfg = load_train_config(ROOT / "configs" / "zaya1-8b.yaml", overrides)
    assert (cfg.mesh.data, cfg.mesh.expert, cfg.model.moe_impl) == (4, 16, "expert_parallel")


def test_finetune_starts_from_the_base_weights_and_exports(tmp_path):
    import jax
    from flax import nnx

    from zaya_jax import init_model, load_preset, load_pretrained, save_pretrained

    base, run_dir, out = tmp_path / "base", tmp_path / "ft", tmp_path / "hf"
    base_model = init_model(load_preset("tiny"), seed=1)  # the run's own init would use seed 0
    save_pretrained(base_model, base)
    finetune = subprocess.run(
        [sys.executable, "examples/finetune.py", "--base", str(base), "--data", "synthetic", "--run-dir",
         str(run_dir), "--steps", "2", "--lr", "1e-9", "--set", "train.batch_size=8", "--set", "data.eval_samples=0",
         "--set", "optimizer.warmup_steps=0"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert finetune.returncode == 0, finetune.stderr[-2000:]
    export = subprocess.run([sys.executable, "examples/export_to_safetensors.py", str(run_dir), str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert export.returncode == 0, export.stderr[-2000:]
    error = float(re.search(r"max \|difference\| / max \|logit\| = (\S+)", export.stdout).group(1))
    config = load_preset("tiny")  # float32 against transformers' float32 (tests/tolerances.py)
    assert error <= float32_bound(model_terms(config, 16), model_depth(config.num_layers))
    # Two steps at lr 1e-9 move no weight by more than ~1e-8: the run started from the base checkpoint.
    tuned = load_pretrained(out)
    pairs = zip(jax.tree.leaves(nnx.state(tuned, nnx.Param)), jax.tree.leaves(nnx.state(base_model, nnx.Param)))
    assert max(float(abs(a - b).max()) for a, b in pairs) < 1e-6
