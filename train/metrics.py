"""Run metrics on the host: a JSONL log (plus TensorBoard when available) and a one-line terminal progress bar.

`MetricsWriter(run_dir)` appends one JSON object per logged step to `run_dir/metrics.jsonl`:

    {"step": 120, "loss": 2.3412, "grad_norm": 0.81, "routing_entropy": [0.97, 0.95], "expert_load": [[...], ...]}

Accepted values: Python/NumPy scalars, None, str, lists/tuples, NumPy or JAX arrays of any shape. A 0-d array becomes
a Python scalar of its kind (int, float or bool); an n-d array [L] or [L, E] becomes a (nested) list of Python floats.
Non-finite floats are written with Python's `json` convention (`allow_nan=True`): the bare tokens `NaN`, `Infinity`
and `-Infinity`. That is not strict RFC 8259 JSON, but Python's `json` (and so `read_metrics`) reads them back
exactly, and a NaN loss is precisely the thing a training log must not hide behind `null`.

When a TensorBoard writer is importable (`torch.utils.tensorboard`, else `tensorboardX`) the same step is also
written to event files in `run_dir/tensorboard`: scalars under their own name, 1-d per-layer arrays [L] as
`name/layer_i`; arrays with 2 or more dimensions (e.g. expert_load [L, E]) go to the JSONL only. With neither
installed, `writer.tensorboard_enabled` is False and nothing else changes.

`read_metrics(run_dir)` reads the JSONL back as a list of dicts, ignoring a truncated last line (a killed run).

`ProgressBar(total_steps)` draws `[#####-----] step 120/300 | loss 2.3412 | 41.2k tok/s | MFU 12.3% | ETA 1m23s`,
refreshed in place with a carriage return on a terminal, or as a full line every max(1, total // 20) steps when the
stream is not a TTY (CI logs, files).
"""

from __future__ import annotations

import importlib.util
import json
import math
import numbers
import os
import sys
import time
from typing import IO, Any, Callable, Mapping

import numpy as np

METRICS_FILENAME = "metrics.jsonl"
TENSORBOARD_DIRNAME = "tensorboard"


def _find_summary_writer() -> type | None:
    """The first importable TensorBoard SummaryWriter class, or None."""
    # torch.utils.tensorboard is only a thin shim over the `tensorboard` package; checking for that first avoids
    # importing all of torch (seconds, hundreds of MB) just to learn that the shim cannot work.
    if importlib.util.find_spec("tensorboard") is not None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            return SummaryWriter
        except Exception:  # noqa: BLE001 - a broken install (e.g. protobuf mismatch) must not stop training
            pass
    if importlib.util.find_spec("tensorboardX") is not None:
        try:
            from tensorboardX import SummaryWriter

            return SummaryWriter
        except Exception:  # noqa: BLE001
            pass
    return None


def _to_json_value(key: str, value: Any) -> Any:
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, numbers.Integral):  # also np.integer
        return int(value)
    if isinstance(value, numbers.Real):  # also np.floating
        return float(value)
    if isinstance(value, (list, tuple)):
        return [_to_json_value(key, v) for v in value]
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):  # JAX arrays convert through __array__
        array = np.asarray(value)
        if array.ndim == 0:
            return array.item()  # keeps an int32 "skipped" flag an int rather than 1.0
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
            raise TypeError(f"MetricsWriter.write: metric {key!r} is an array of dtype {array.dtype}, not numeric")
        return array.astype(np.float64).tolist()
    raise TypeError(f"MetricsWriter.write: metric {key!r} has unsupported type {type(value).__name__}")


def _tensorboard_scalars(name: str, value: Any) -> list[tuple[str, float]]:
    """(tag, value) pairs for TensorBoard: scalars as is, 1-d lists as name/layer_i, anything else skipped."""
    if value is None or isinstance(value, str):
        return []
    if isinstance(value, (bool, numbers.Real)):
        return [(name, float(value))]
    if isinstance(value, list) and all(isinstance(v, (bool, numbers.Real)) for v in value):
        return [(f"{name}/layer_{i}", float(v)) for i, v in enumerate(value)]
    return []


class MetricsWriter:
    """Appends one JSON line per logged step to run_dir/metrics.jsonl (and TensorBoard events when available).

    `tensorboard=False` skips the TensorBoard probe entirely (no torch import).
    """

    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = True) -> None:
        self.run_dir = os.fspath(run_dir)
        os.makedirs(self.run_dir, exist_ok=True)
        self.path = os.path.join(self.run_dir, METRICS_FILENAME)
        _drop_partial_last_line(self.path)
        self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")
        self._tb = None
        writer_cls = _find_summary_writer() if tensorboard else None
        if writer_cls is not None:
            self._tb = writer_cls(os.path.join(self.run_dir, TENSORBOARD_DIRNAME))

    @property
    def tensorboard_enabled(self) -> bool:
        return self._tb is not None

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Append {"step": step, **metrics} as one line and flush it (a killed run keeps every finished line)."""
        if self._file is None:
            raise ValueError("MetricsWriter.write: writer is closed")
        if "step" in metrics:
            raise ValueError("MetricsWriter.write: 'step' is reserved for the step argument")
        record: dict[str, Any] = {"step": int(step)}
        for key, value in metrics.items():
            record[str(key)] = _to_json_value(str(key), value)
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key == "step":
                    continue
                for tag, scalar in _tensorboard_scalars(key, value):
                    self._tb.add_scalar(tag, scalar, int(step))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _drop_partial_last_line(path: str) -> None:
    # A run killed mid-write leaves a fragment without its newline; appending after it would glue the next record
    # onto the fragment and turn a harmless truncated last line into a corrupt line in the middle of the file.
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data.endswith(b"\n"):
            return
        f.truncate(data.rfind(b"\n") + 1)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of run_dir/metrics.jsonl, in file order; an unparseable LAST line (killed run) is ignored.

    An unparseable line anywhere else is real corruption and raises ValueError with its line number.
    """
    path = os.path.join(os.fspath(run_dir), METRICS_FILENAME)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"read_metrics: {path} line {number} is not valid JSON: {err}") from err
    return records


def format_eta(seconds: float) -> str:
    """Compact duration: 9 -> "9s", 83 -> "1m23s", 3720 -> "1h02m" (rounded to the second; "?" if unknown)."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    total = max(0, int(round(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _format_rate(tokens_per_s: float) -> str:
    if not math.isfinite(tokens_per_s):
        return "?"
    for threshold, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(tokens_per_s) >= threshold:
            return f"{tokens_per_s / threshold:.1f}{suffix}"
    return f"{tokens_per_s:.0f}"


def _format_extra(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class ProgressBar:
    """One-line training progress: bar, step, loss, throughput, MFU and ETA.

    On a TTY the line is redrawn in place (carriage return); otherwise a full line is printed whenever at least
    max(1, total_steps // 20) steps have passed since the last printed one (plus the first and last update), so a
    CI log gets about 20 readable lines instead of one enormous \\r-joined line. `stream` defaults to sys.stderr;
    `clock` is injectable for tests.
    """

    def __init__(
        self,
        total_steps: int,
        stream: IO[str] | None = None,
        width: int = 30,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total_steps < 1:
            raise ValueError(f"ProgressBar: total_steps must be >= 1, got {total_steps}")
        if width < 1:
            raise ValueError(f"ProgressBar: width must be >= 1, got {width}")
        self.total_steps = int(total_steps)
        # Resolved per instance, not as a default argument, so a later swap of sys.stderr (pytest capture,
        # logging redirection) is honoured.
        self.stream = sys.stderr if stream is None else stream
        self.width = int(width)
        self.print_every = max(1, self.total_steps // 20)
        self._clock = clock
        isatty = getattr(self.stream, "isatty", None)
        self.is_tty = bool(isatty()) if callable(isatty) else False
        self._first: tuple[int, float] | None = None
        self._last_printed_step: int | None = None
        self._pending: str | None = None  # non-TTY: the latest line not yet printed
        self._drawn_len = 0  # TTY: length of the line currently on screen, to blank out leftovers
        self._closed = False

    def eta_seconds(self, step: int) -> float | None:
        """Average time per step since the first update times the steps left; None before two distinct steps."""
        if self._first is None or step <= self._first[0]:
            return None
        first_step, first_time = self._first
        per_step = (self._clock() - first_time) / (step - first_step)
        return per_step * max(0, self.total_steps - step)

    def format_line(
        self, step: int, loss: float, tokens_per_s: float, mfu: float | None, extra: Mapping[str, Any] | None = None
    ) -> str:
        fraction = min(max(step / self.total_steps, 0.0), 1.0)
        filled = int(round(fraction * self.width))
        parts = [
            f"[{'#' * filled}{'-' * (self.width - filled)}] step {step}/{self.total_steps}",
            f"loss {loss:.4f}",
            f"{_format_rate(tokens_per_s)} tok/s",
            "MFU n/a" if mfu is None else f"MFU {100.0 * mfu:.1f}%",
        ]
        parts += [f"{key} {_format_extra(value)}" for key, value in (extra or {}).items()]
        eta = self.eta_seconds(step)
        parts.append(f"ETA {'?' if eta is None else format_eta(eta)}")
        return " | ".join(parts)

    def update(
        self, step: int, loss: float, tokens_per_s: float, mfu: float | None, extra: Mapping[str, Any] | None = None
    ) -> None:
        if self._first is None:
            self._first = (int(step), self._clock())
        line = self.format_line(step, loss, tokens_per_s, mfu, extra)
        if self.is_tty:
            padding = " " * max(0, self._drawn_len - len(line))
            self.stream.write("\r" + line + padding)
            self._drawn_len = len(line)
            self.stream.flush()
            return
        due = (
            self._last_printed_step is None
            or step >= self._last_printed_step + self.print_every
            or step >= self.total_steps
        )
        if due:
            self.stream.write(line + "\n")
            self.stream.flush()
            self._last_printed_step = step
            self._pending = None
        else:
            self._pending = line

    def close(self) -> None:
        """End the progress output: newline after the in-place line, or print the last unprinted update."""
        if self._closed:
            return
        self._closed = True
        if self.is_tty and self._drawn_len:
            self.stream.write("\n")
        elif self._pending is not None:
            self.stream.write(self._pending + "\n")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
