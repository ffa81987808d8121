"""The training config and zaya-train's checks before anything is built: types of every section, YAML syntax,
empty files, the memory estimate and its refusal, and --dry-run. Nothing here compiles a model."""

from __future__ import annotations

import math

import jax
import pytest
from flax import nnx

import train.memory
from sharding import make_mesh
from train.cli import train_main
from sharding.mesh import MeshConfig
from train.config import load_train_config, valid_keys
from train.memory import estimate_memory
from zaya_jax.config import load_yaml
from zaya_jax.model import ZayaForCausalLM

TINY = "configs/tiny.yaml"


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("zaya-train: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps has the wrong type: 'abc' (str), expected int"),
    ("train.batch_size=x", "train.batch_size has the wrong type: 'x' (str), expected int"),
    ("train.save_every=x", "train.save_every has the wrong type: 'x' (str), expected int"),
    ("data.seq_len=x", "data.seq_len has the wrong type: 'x' (str), expected int"),
    ("data.trim=maybe", "data.trim has the wrong type: 'maybe' (str), expected bool"),
    ("optimizer.warmup_steps=1.5", "optimizer.warmup_steps has the wrong type: 1.5 (float), expected int"),
    ("balancer.lr=fast", "balancer.lr has the wrong type: 'fast' (str), expected float"),
    ("mesh.fsdp=two", "mesh.fsdp has the wrong type: 'two' (str), expected int"),
    ("model.hidden_size=x", "model.hidden_size has the wrong type: 'x' (str), expected int"),
])
def test_a_value_of_the_wrong_type_names_the_key_the_value_and_the_type(capsys, override, message):
    assert train_main(["--config", TINY, "--set", override]) == 2
    assert message in _one_line_error(capsys)


def test_a_wrong_type_in_the_yaml_file_is_named_too(tmp_path, capsys):
    path = tmp_path / "ten.yaml"
    path.write_text(open(TINY).read().replace("\n  steps: 300", '\n  steps: "ten"'))
    assert train_main(["--config", str(path)]) == 2
    assert "train.steps has the wrong type: 'ten' (str), expected int" in _one_line_error(capsys)


def test_a_yaml_syntax_error_names_the_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  hidden_size: 64\n  num_layers: [2, 3\ntrain:\n  steps: 3\n")
    assert train_main(["--config", str(path)]) == 2
    err = _one_line_error(capsys)
    # The unclosed list runs on to line 4, where the parser meets `train:`'s colon (column 6).
    assert err == f"zaya-train: error: {path}:4:6: invalid YAML: expected ',' or ']', but got ':'\n"
    with pytest.raises(ValueError, match=r"^--set train.steps=\[:1:2: invalid YAML: expected the node content"):
        load_train_config(TINY, ["train.steps=["])
    with pytest.raises(ValueError, match=r"^<yaml>:1:\d+: invalid YAML"):
        load_yaml("a: [")


@pytest.mark.parametrize("text, message", [
    ("", "the config is empty; it needs a model section"),
    ("# only a comment\n", "the config is empty; it needs a model section"),
    ("train:\n  steps: 3\n", "no model section"),
    ("model:\ntrain:\n  steps: 3\n", "no model section"),
    ("- model\n", "expected a mapping of sections"),
])
def test_an_empty_or_model_less_config_is_an_error(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert train_main(["--config", str(path)]) == 2
    err = _one_line_error(capsys)
    assert str(path) in err and message in err


def test_data_seq_len_past_the_models_context_is_an_error(capsys):
    assert train_main(["--config", TINY, "--set", "data.seq_len=4096"]) == 2
    assert "data.seq_len (4096) is longer than model.max_position_embeddings (2048)" in _one_line_error(capsys)


def test_an_unknown_packing_is_an_error_naming_the_choices(capsys):
    assert train_main(["--config", TINY, "--set", "data.packing=worst_fit"]) == 2
    assert "data.packing must be one of ('first_fit', 'best_fit'), got 'worst_fit'" in _one_line_error(capsys)


def test_the_memory_estimate_counts_every_byte_of_parameters_and_adamw_moments():
    cfg = load_train_config(TINY)
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    estimate = estimate_memory(cfg, mesh)
    # Reference: the parameters of the model itself, 4 bytes each; AdamW holds two float32 moments per parameter
    # (and a few int32 step counters, 4 bytes each).
    params = nnx.state(nnx.eval_shape(lambda: ZayaForCausalLM(cfg.model, rngs=nnx.Rngs(0))), nnx.Param)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    assert estimate.parameters == estimate.gradients == 4 * n
    assert 8 * n <= estimate.optimizer_state <= 8 * n + 64
    # Replicated over 8 devices (data=8), every device holds a copy; fsdp=8 splits what the rules shard.
    replicated = estimate_memory(cfg, make_mesh(MeshConfig(data=8)))
    assert replicated.parameters == 8 * estimate.parameters
    sharded = estimate_memory(cfg, make_mesh(MeshConfig(data=1, fsdp=8)))
    assert sharded.parameters < replicated.parameters


def test_a_run_that_cannot_fit_the_memory_is_refused_with_the_sizes(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train.memory, "available_memory", lambda: (10**6, "available host memory (MemAvailable)"))
    run_dir = tmp_path / "run"
    assert train_main(["--config", TINY, "--set", f"train.run_dir={run_dir}"]) == 2
    err = _one_line_error(capsys)
    assert "the training state needs " in err and "GB per process (parameters" in err
    assert "but this machine has 0.00 GB of available host memory (MemAvailable)" in err
    assert not run_dir.exists()


def test_an_early_error_leaves_no_run_directory(tmp_path, capsys):
    run_dir = tmp_path / "run"
    # 8 devices split a batch of 4 rows 8 ways: refused before the model is built, after the memory check.
    assert train_main(["--config", TINY, "--set", f"train.run_dir={run_dir}", "--set", "train.batch_size=4"]) == 2
    assert "must be divisible by the batch shards of the mesh (8)" in _one_line_error(capsys)
    assert not run_dir.exists()


def test_dry_run_prints_every_key_the_counts_and_the_memory_and_builds_nothing(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "run"
    assert train_main(["--config", TINY, "--dry-run", "--set", f"train.run_dir={run_dir}",
                       "--set", "train.steps=400"]) == 0
    out = capsys.readouterr().out
    resolved = load_yaml(out[:out.index("config: ")])
    assert sorted(f"{s}.{k}" for s, keys in resolved.items() for k in keys) == sorted(valid_keys())
    assert resolved["train"]["steps"] == 400 and resolved["model"]["hidden_size"] == 64
    assert f"config: {TINY}" in out and "parameters: total " in out
    assert "mesh data=8 fsdp=1 context=1 expert=1 tensor=1" in out
    assert "tokens per step: 4,096 (batch 16 x seq_len 256" in out
    assert "memory: the training state needs " in out and f"run directory: {run_dir}" in out
    assert "new run from step 0 to step 400" in out
    assert "warning: train.steps (400) is past optimizer.total_steps (300)" in out
    assert "dry run: nothing was built or written" in out
    assert not run_dir.exists()
    monkeypatch.setattr(train.memory, "available_memory", lambda: (10**6, "available host memory (MemAvailable)"))
    assert train_main(["--config", TINY, "--dry-run", "--set", f"train.run_dir={run_dir}"]) == 0
    assert "warning: the training state needs " in capsys.readouterr().out


def test_a_width_the_mesh_cannot_split_is_refused_naming_the_rule(tmp_path, capsys):
    # The model itself relies on no divisibility of hidden_size (tests/zaya_jax/test_parity.py runs 40 wide with 6
    # query heads against transformers); sharding it over fsdp does, and that rule is checked before anything runs.
    run_dir = tmp_path / "run"
    assert train_main(["--config", TINY, "--set", "model.hidden_size=63", "--set", "mesh.fsdp=2",
                       "--set", f"train.run_dir={run_dir}"]) == 2
    assert "embed: dim 1 ('embed', size 63) is not divisible by mesh axes ('fsdp',) (2 ways)" in _one_line_error(capsys)
    assert not run_dir.exists()


def test_a_validation_loss_without_held_out_data_is_named_at_the_start(tmp_path, capsys):
    # A file source has no held-out split: evaluating on the training file itself would not be a validation loss.
    path = tmp_path / "docs.jsonl"
    path.write_text('{"text": "a document"}\n')
    assert train_main(["--config", TINY, "--dry-run", "--set", f"data.source={path}", "--set",
                       "train.eval_every=10", "--set", f"train.run_dir={tmp_path / 'run'}"]) == 0
    assert (f"warning: train.eval_every (10) asks for a validation loss, but data.source '{path}' has no held-out "
            "split and data.validation_source is empty: no validation loss is computed" in capsys.readouterr().out)
    assert train_main(["--config", TINY, "--set", "train.eval_every=-1"]) == 2
    assert "train.eval_every must be >= 0 (0 = no validation loss), got -1" in _one_line_error(capsys)
    held_out = load_train_config(TINY, [f"data.source={path}", "train.eval_every=10",
                                        f"data.validation_source={path}"])
    assert held_out.data.resolved_validation_source == str(path)
    assert load_train_config(TINY).data.resolved_validation_source == "synthetic:heldout"
