"""zaya-forward, and the one-line error of every entry point asked for a backend the machine lacks."""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from zaya_jax import init_model, load_preset, save_pretrained
from zaya_jax.cli import forward_main

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_forward_prints_logits_shape_and_the_checkpoint_parameter_count(tmp_path, capsys):
    save_pretrained(init_model(load_preset("tiny"), seed=4), tmp_path)
    assert forward_main(["--config", "tiny", "--batch", "1", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "logits: shape (1, 8, 261)" in out and "finite=True" in out
    in_checkpoint = 0
    for file in tmp_path.glob("*.safetensors"):
        with safe_open(file, "np") as f:
            # balancing_biases are buffers (set by the balancer, not by gradients), not parameters
            in_checkpoint += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()
                                 if not k.endswith("balancing_biases"))
    assert f"parameters: total {in_checkpoint:,}" in out


def test_forward_past_the_context_is_an_error(capsys):
    assert forward_main(["--config", "tiny", "--seq", "3000"]) == 2
    err = capsys.readouterr().err
    assert err == ("zaya-forward: error: --seq 3000 must be in [1, max_position_embeddings = 2048], the longest "
                   "sequence tiny accepts\n")


@pytest.mark.parametrize("command", [["zaya_jax.cli"], ["train.cli", "--config", "configs/tiny.yaml"]])
def test_asking_for_a_gpu_on_a_machine_without_one_is_one_line_and_exit_2(command):
    env = {**os.environ, "JAX_PLATFORMS": "cuda"}
    env.pop("XLA_FLAGS", None)
    done = subprocess.run([sys.executable, "-m", *command], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert "JAX could not start a backend for JAX_PLATFORMS='cuda'" in lines[-1], done.stderr[-2000:]
    assert sum(": error:" in line for line in lines) == 1  # one line of ours, last
    if importlib.util.find_spec("jax_cuda12_plugin") is None:
        assert len(lines) == 1, done.stderr[-2000:]
    # else: the CUDA plugin (the .[aot] extra) logs its own failed start-up check above our line
