"""Tests for train/metrics.py (JSONL writer/reader, TensorBoard fan-out, progress bar, ETA format) and
train/plots.py (every plot writes a readable PNG, rejects bad shapes, leaves no figure open)."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # the test process itself must never try to open a display

import matplotlib.image  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import train.metrics as metrics_module  # noqa: E402
from train.metrics import MetricsWriter, ProgressBar, format_eta, read_metrics  # noqa: E402
from train.plots import (  # noqa: E402
    _ema,
    plot_balancer_biases,
    plot_expert_load_heatmap,
    plot_final_expert_load,
    plot_loss_curve,
    plot_routing_entropy,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------------------------------
# MetricsWriter / read_metrics


def test_jsonl_round_trip_with_arrays_and_non_finite(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(1, {
            "loss": 2.5,
            "tokens": 4096,
            "lr": np.float32(3e-4),
            "skipped": jnp.asarray(1, jnp.int32),
            "routing_entropy": jnp.asarray([0.5, 0.75], jnp.float32),
            "expert_load": np.array([[0.25, 0.75], [1.0, 0.0]]),
            "counts": [1, 2, 3],
            "int_array": np.array([1, 2], np.int32),
            "mfu": None,
        })
        writer.write(np.int64(2), {"loss": float("nan"), "grad_norm": float("inf"),
                                   "per_layer": np.array([float("-inf"), 1.0])})
    records = read_metrics(tmp_path)
    assert len(records) == 2
    first, second = records
    assert first == {
        "step": 1, "loss": 2.5, "tokens": 4096, "lr": pytest.approx(3e-4), "skipped": 1,
        "routing_entropy": [0.5, 0.75], "expert_load": [[0.25, 0.75], [1.0, 0.0]], "counts": [1, 2, 3],
        "int_array": [1.0, 2.0], "mfu": None,
    }
    assert type(first["skipped"]) is int and type(first["tokens"]) is int
    assert all(type(v) is float for v in first["routing_entropy"] + first["int_array"])
    assert second["step"] == 2 and math.isnan(second["loss"])
    assert second["grad_norm"] == math.inf and second["per_layer"] == [-math.inf, 1.0]
    # Python's json convention for non-finite values, not null.
    raw = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(raw) == 2 and '"loss": NaN' in raw[1] and '"grad_norm": Infinity' in raw[1]


def test_each_line_is_flushed_before_close(tmp_path):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    writer.write(7, {"loss": 1.0})
    assert read_metrics(tmp_path) == [{"step": 7, "loss": 1.0}]
    writer.close()
    writer.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        writer.write(8, {"loss": 1.0})


def test_write_rejects_reserved_key_and_unsupported_types(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        with pytest.raises(ValueError, match="step"):
            writer.write(1, {"step": 3})
        with pytest.raises(TypeError, match="'weird'"):
            writer.write(1, {"weird": object()})
        with pytest.raises(TypeError, match="'strings'"):
            writer.write(1, {"strings": np.array(["a", "b"])})


def test_truncated_last_line_is_ignored_and_dropped_on_reopen(tmp_path):
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        for step in range(3):
            writer.write(step, {"loss": float(step)})
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # killed mid-write: no closing brace, no newline
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2]

    # A resumed run must not glue its first record onto the fragment.
    with MetricsWriter(tmp_path, tensorboard=False) as writer:
        writer.write(3, {"loss": 3.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [0, 1, 2, 3]
    assert path.read_text().count("\n") == 4


def test_corrupt_middle_line_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\n{"step": 1, \n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2"):
        read_metrics(tmp_path)


class _FakeSummaryWriter:
    instances: list = []

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.scalars: list[tuple[str, float, int]] = []
        self.flushed = self.closed = False
        _FakeSummaryWriter.instances.append(self)

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def flush(self):
        self.flushed = True

    def close(self):
        self.closed = True


def test_tensorboard_fan_out_with_a_writer_available(tmp_path, monkeypatch):
    _FakeSummaryWriter.instances = []
    monkeypatch.setattr(metrics_module, "_find_summary_writer", lambda: _FakeSummaryWriter)
    with MetricsWriter(tmp_path) as writer:
        assert writer.tensorboard_enabled
        writer.write(5, {"loss": 2.0, "routing_entropy": np.array([0.9, 0.8]), "expert_load": np.ones((2, 3)),
                         "mfu": None, "skipped": np.int32(0)})
    (tb,) = _FakeSummaryWriter.instances
    assert tb.log_dir == os.path.join(str(tmp_path), "tensorboard")
    assert sorted(tb.scalars) == sorted([
        ("loss", 2.0, 5), ("routing_entropy/layer_0", 0.9, 5), ("routing_entropy/layer_1", 0.8, 5),
        ("skipped", 0.0, 5),
    ])
    assert tb.flushed and tb.closed
    assert read_metrics(tmp_path)[0]["expert_load"] == [[1.0] * 3] * 2  # 2-d arrays still reach the JSONL


def test_tensorboard_absent_or_disabled(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_module, "_find_summary_writer", lambda: None)
    with MetricsWriter(tmp_path / "a") as writer:
        assert not writer.tensorboard_enabled
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "a" / "tensorboard").exists()
    monkeypatch.setattr(metrics_module, "_find_summary_writer", lambda: _FakeSummaryWriter)
    with MetricsWriter(tmp_path / "b", tensorboard=False) as writer:
        assert not writer.tensorboard_enabled


# ---------------------------------------------------------------------------------------------------------------------
# ProgressBar / format_eta


class _Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_progress_bar_non_tty_prints_full_lines_every_twentieth():
    stream, clock = io.StringIO(), _Clock()
    bar = ProgressBar(100, stream=stream, width=30, clock=clock)
    for step in range(1, 101):
        bar.update(step, 2.34123, 41234.0, 0.123)
        clock.now += 0.4
        if step == 100:
            assert stream.getvalue().endswith("ETA 0s\n")  # the last step is printed at once, not only at close
    bar.close()
    out = stream.getvalue()
    assert "\r" not in out
    lines = out.splitlines()
    # Printed at the first update, then whenever 5 (= 100 // 20) steps have passed, and at the last step.
    assert [int(line.split("step ")[1].split("/")[0]) for line in lines] == [1, *range(6, 100, 5), 100]
    # Step 51: 50 steps took 20 s since step 1 -> 0.4 s/step, 49 steps left -> 19.6 s.
    assert lines[10] == ("[###############---------------] step 51/100 | loss 2.3412 | 41.2k tok/s | MFU 12.3% "
                         "| ETA 20s")
    assert lines[0].endswith("| ETA ?")  # one point gives no step time yet
    assert lines[-1].startswith("[" + "#" * 30 + "] step 100/100") and lines[-1].endswith("ETA 0s")


def test_progress_bar_mfu_na_extra_and_pending_line_on_close():
    stream = io.StringIO()
    bar = ProgressBar(300, stream=stream, width=10, clock=_Clock())
    bar.update(1, 9.5, 950.0, None)
    bar.update(3, 8.25, 2.5e6, None, extra={"lr": 3e-4, "skipped": 0})
    assert stream.getvalue().count("\n") == 1  # step 3 is not due yet (every 15 steps)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    assert "step 1/300 | loss 9.5000 | 950 tok/s | MFU n/a" in lines[0]
    assert "step 3/300 | loss 8.2500 | 2.5M tok/s | MFU n/a | lr 0.0003 | skipped 0 | ETA" in lines[1]


class _TTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_tty_redraws_in_place():
    stream, clock = _TTY(), _Clock()
    bar = ProgressBar(10, stream=stream, clock=clock)
    bar.update(1, 3.0, 1e3, 0.5, extra={"note": "a long extra field"})
    clock.now += 83.0
    bar.update(2, 2.0, 1e3, 0.5)
    out = stream.getvalue()
    assert out.count("\r") == 2 and "\n" not in out
    second = out.split("\r")[2]
    assert second.rstrip().endswith("ETA 11m04s")  # 83 s/step x 8 steps = 664 s
    assert second.endswith(" ")  # the longer first line is blanked out
    bar.close()
    assert stream.getvalue().endswith("\n") and stream.getvalue().count("\n") == 1


def test_progress_bar_rejects_bad_total():
    with pytest.raises(ValueError, match="total_steps"):
        ProgressBar(0, stream=io.StringIO())


@pytest.mark.parametrize("seconds, expected", [
    (0, "0s"), (9.4, "9s"), (59.4, "59s"), (59.6, "1m00s"), (83, "1m23s"), (600, "10m00s"), (3599.4, "59m59s"),
    (3600, "1h00m"), (3720, "1h02m"), (36300, "10h05m"), (-5, "0s"), (float("nan"), "?"), (float("inf"), "?"),
])
def test_format_eta(seconds, expected):
    assert format_eta(seconds) == expected


# ---------------------------------------------------------------------------------------------------------------------
# Plots

N, L, E = 6, 2, 4
STEPS = [1, 10, 20, 30, 40, 50]
_rng = np.random.default_rng(0)
LOADS = _rng.dirichlet(np.ones(E), size=(N, L))  # [N, L, E]
BIASES = _rng.normal(0.0, 0.05, (N, L, E))
ENTROPY = _rng.uniform(0.5, 1.0, (N, L))


def _assert_png(path, min_side=150, max_side=4000):
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    height, width = image.shape[:2]
    assert min_side <= height <= max_side and min_side <= width <= max_side
    assert image[..., :3].std() > 0.05  # something was drawn, not a blank canvas


PLOT_CASES = {
    "loss": lambda p: plot_loss_curve(STEPS, [5.0, 4.0, 3.5, float("nan"), 3.0, 2.9], p, eval_points={50: 0.4}),
    "loss_plain": lambda p: plot_loss_curve(STEPS, np.linspace(5, 2, N), p, smoothing=0.0),
    "loss_validation_lr": lambda p: plot_loss_curve(STEPS, np.linspace(5, 2, N), p, validation={20: 4.5, 50: 3.0},
                                                    learning_rates=np.linspace(1e-3, 1e-4, N)),
    "load": lambda p: plot_expert_load_heatmap(LOADS, STEPS, p),
    "load_grid": lambda p: plot_expert_load_heatmap(np.repeat(LOADS, 3, axis=1), STEPS, p),  # 6 layers -> grid
    "load_single": lambda p: plot_expert_load_heatmap(LOADS[:1], STEPS[:1], p),
    "final": lambda p: plot_final_expert_load(LOADS[-1], p),
    "final_big": lambda p: plot_final_expert_load(np.full((20, 16), 1 / 16), p),  # too many cells to annotate
    "biases": lambda p: plot_balancer_biases(BIASES, STEPS, p),
    "biases_many": lambda p: plot_balancer_biases(np.repeat(BIASES, 6, axis=2), STEPS, p),  # 24 experts, no legend
    "entropy": lambda p: plot_routing_entropy(ENTROPY, STEPS, p),
    "entropy_many": lambda p: plot_routing_entropy(np.repeat(ENTROPY, 7, axis=1), STEPS, p),  # 14 -> colorbar
}


@pytest.mark.parametrize("case", sorted(PLOT_CASES))
def test_plot_writes_png_into_new_directory(tmp_path, case):
    path = tmp_path / "nested" / "dir" / f"{case}.png"
    PLOT_CASES[case](path)
    _assert_png(path)
    assert plt.get_fignums() == []


BAD_SHAPES = [
    (lambda p: plot_loss_curve(STEPS, [1.0, 2.0], p), "steps"),
    (lambda p: plot_loss_curve(STEPS, np.ones((N, 2)), p), "losses"),
    (lambda p: plot_loss_curve([], [], p), "losses"),
    (lambda p: plot_loss_curve([3, 2, 1], [1.0, 2.0, 3.0], p), "steps"),  # not increasing
    (lambda p: plot_loss_curve(STEPS, np.ones(N), p, learning_rates=np.ones(N - 1)), "learning_rates"),
    (lambda p: plot_expert_load_heatmap(LOADS[0], STEPS, p), "loads"),
    (lambda p: plot_expert_load_heatmap(LOADS, STEPS[:-1], p), "steps"),
    (lambda p: plot_final_expert_load(LOADS, p), "load"),
    (lambda p: plot_final_expert_load(np.ones(E), p), "load"),
    (lambda p: plot_balancer_biases(BIASES[..., 0], STEPS, p), "biases"),
    (lambda p: plot_balancer_biases(BIASES, STEPS + [60], p), "steps"),
    (lambda p: plot_routing_entropy(ENTROPY[..., None], STEPS, p), "entropy"),
    (lambda p: plot_routing_entropy(ENTROPY, np.array(STEPS)[None], p), "steps"),
    (lambda p: plot_routing_entropy(np.ones((0, L)), [], p), "entropy"),
]


@pytest.mark.parametrize("index", range(len(BAD_SHAPES)))
def test_plot_rejects_bad_shapes(tmp_path, index):
    call, argument = BAD_SHAPES[index]
    path = tmp_path / "bad.png"
    with pytest.raises(ValueError, match=rf"^{argument}: ") as err:
        call(path)
    assert "expected shape" in str(err.value) or "increasing" in str(err.value)
    assert not path.exists()
    assert plt.get_fignums() == []


def test_ema_skips_non_finite_points():
    out = _ema(np.array([1.0, np.nan, 3.0]), 0.5)
    # Bias-corrected: (0.5*1) / 0.5 = 1, unchanged over the NaN, then (0.25 + 1.5) / 0.75.
    np.testing.assert_allclose(out, [1.0, 1.0, 1.75 / 0.75])
    np.testing.assert_allclose(_ema(np.array([np.nan, 2.0]), 0.9), [np.nan, 2.0])  # nothing to average yet


def test_importing_train_modules_does_not_import_matplotlib():
    code = "import sys, train.metrics, train.plots; print('matplotlib' in sys.modules, 'torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["False", "False"]
