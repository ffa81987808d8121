"""zaya-forward, zaya-generate and zaya-rsa: what they print, and one-line errors with exit status 2."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from safetensors import safe_open

from zaya_jax import generate_ids, init_model, load_preset, save_pretrained
from zaya_jax.cli import forward_main, generate_main, rsa_main
from zaya_jax.tokenizers import ByteTokenizer, reasoning_prompt

TOK = ByteTokenizer()
ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = init_model(load_preset("tiny"), seed=4)
    path = tmp_path_factory.mktemp("tiny_hf")
    save_pretrained(model, path)
    return model, str(path)


def test_forward_prints_logits_shape_and_the_checkpoint_parameter_count(exported, capsys):
    _, path = exported
    assert forward_main(["--config", "tiny", "--batch", "1", "--seq", "8"]) == 0
    out = capsys.readouterr().out
    assert "logits: shape (1, 8, 261)" in out and "finite=True" in out
    in_checkpoint = 0
    for file in pathlib.Path(path).glob("*.safetensors"):
        with safe_open(file, "np") as f:
            # balancing_biases are buffers (set by the balancer, not by gradients), not parameters
            in_checkpoint += sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()
                                 if not k.endswith("balancing_biases"))
    assert f"parameters: total {in_checkpoint:,}" in out


def test_generate_streams_the_same_text_that_generate_ids_returns(exported, capsys):
    model, path = exported
    prompt = "Compute 3 + 4."
    assert generate_main(["--model", path, "--tokenizer", "byte", "--prompt", prompt, "--max-new-tokens", "12",
                          "--temperature", "0.8", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    ids = generate_ids(model, [reasoning_prompt(TOK, prompt)], 12, stop_tokens=(TOK.eos_id,), temperature=0.8,
                       seed=3)[0]
    assert out == "<think>" + TOK.decode(ids) + "\n"


def test_generate_batches_several_prompts(exported, capsys):
    _, path = exported
    assert generate_main(["--model", path, "--tokenizer", "byte", "--prompt", "a", "--prompt", "bb",
                          "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.count("=== ") == 2 and "=== a\n" in out and "=== bb\n" in out


def test_rsa_prints_every_round_and_scores_synthetic_problems(exported, tmp_path, capsys):
    _, path = exported
    report = tmp_path / "rsa.json"
    assert rsa_main(["--model", path, "--tokenizer", "byte", "--synthetic", "2", "-N", "3", "-C", "2", "-T", "2",
                     "--budget", "8", "--tail", "4", "--format", "compact", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    table = [line.split() for line in out.splitlines()[1:4]]
    assert [int(row[0]) for row in table] == [0, 1, 2] and all(int(row[1]) == 6 for row in table)
    assert "2 held-out problems: majority-vote accuracy" in out
    saved = json.loads(report.read_text())
    assert len(saved["rounds"]) == 3 and len(saved["answers"]) == 2
    assert 0.0 <= saved["majority_accuracy"] <= 1.0


@pytest.mark.parametrize("argv, message", [
    (["--model", "/nonexistent", "--prompt", "x"], "neither a transformers-format directory"),
    (["--model", "{hf}", "--prompt", "x"], "has no tokenizer.json: pass --tokenizer byte"),
    (["--model", "{hf}", "--tokenizer", "/nonexistent/tokenizer.json", "--prompt", "x"], "tokenizer file not found"),
    (["--model", "{hf}", "--tokenizer", "byte", "--prompt", "x", "--temperature", "-1"], "temperature=-1.0"),
])
def test_generate_errors_are_one_line_and_exit_2(exported, capsys, argv, message):
    _, path = exported
    assert generate_main([a.replace("{hf}", path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("zaya-generate: error:")


def test_rsa_errors_are_one_line_and_exit_2(exported, capsys):
    _, path = exported
    assert rsa_main(["--model", path, "--tokenizer", "byte", "--question", "q", "-N", "2", "-C", "3"]) == 2
    err = capsys.readouterr().err
    assert "RSAConfig.candidates = 3 must be in [1, population=2]" in err and err.count("\n") == 1


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
