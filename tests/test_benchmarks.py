"""The benchmark scripts run end to end at toy sizes on CPU, so they are ready when a GPU is lent (no timing is
asserted: the figures come from the device, see BENCHMARKS.md)."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*argv: str) -> str:
    env = {**os.environ, "ZAYA_PALLAS_INTERPRET": "1"}
    env.pop("XLA_FLAGS", None)  # one device, as a user's run
    done = subprocess.run([sys.executable, *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_train_compares_with_transformers_and_splits_the_profile(tmp_path):
    out = _run("benchmarks/bench_train.py", "--config", "tiny", "--layers", "2", "--seq", "64", "--batch", "2",
               "--steps", "2", "--warmup", "1", "--dtype", "float32", "--peak-size", "256", "--profile", str(tmp_path))
    assert "| zaya_jax |" in out and "| transformers |" in out and "zaya_jax / transformers tokens/s" in out
    assert "| attention |" in out and "| experts |" in out


def test_bench_cca_and_bench_decode_run():
    out = _run("benchmarks/bench_cca.py", "--seqs", "32", "--tokens", "64", "--heads", "4", "2", "--head-dim", "16",
               "--repeats", "1", "--peak-size", "256", "--impls", "xla", "pallas")
    assert "| attention pallas | 32 | 2 | forward+backward |" in out and "| CCA block pallas |" in out
    out = _run("benchmarks/bench_decode.py", "--config", "tiny", "--dtype", "float32", "--prompt-len", "16",
               "--new-tokens", "4", "--batches", "1,2", "--repeats", "1", "--copy-gib", "0.05")
    assert "| 2 |" in out and "x |" in out
