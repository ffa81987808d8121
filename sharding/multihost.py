"""Multi-host runs: `jax.distributed` initialisation with explicit timeouts, and a step watchdog.

JAX's multi-controller runtime is the distributed engine: every process runs the same program on its own devices
and `jax.distributed.initialize` connects them through a coordinator. Where its settings come from, first match wins:
    1. explicit arguments (zaya-train's --coordinator / --num-processes / --process-id),
    2. ZAYA_COORDINATOR, ZAYA_NUM_PROCESSES, ZAYA_PROCESS_ID,
    3. SLURM (SLURM_NTASKS, SLURM_PROCID and the first host of SLURM_STEP_NODELIST or SLURM_JOB_NODELIST, port
       ZAYA_COORDINATOR_PORT or 12355).
With none of them the run is single-process and nothing is initialised.

A run must never hang: initialisation has a timeout, the coordinator's heartbeat detects dead peers, and
`StepWatchdog` ends this process with exit status 3 and a one-line message when no training step has completed
within `step_timeout_s` (a peer died inside a collective, or a device stalled); the first step, which includes
compilation, gets `first_step_timeout_s`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

WATCHDOG_EXIT_CODE = 3


@dataclass(frozen=True)
class DistributedSettings:
    coordinator: str
    num_processes: int
    process_id: int
    source: str  # "arguments", "environment" or "slurm"


def detect_settings(coordinator: str | None = None, num_processes: int | None = None,
                    process_id: int | None = None, environ: dict[str, str] | None = None) -> DistributedSettings | None:
    env = os.environ if environ is None else environ
    if coordinator or num_processes is not None or process_id is not None:
        if not coordinator or num_processes is None or process_id is None:
            raise ValueError("multi-host: give all three of --coordinator, --num-processes and --process-id")
        return _validated(coordinator, num_processes, process_id, "arguments")
    if "ZAYA_COORDINATOR" in env:
        try:
            return _validated(env["ZAYA_COORDINATOR"], int(env["ZAYA_NUM_PROCESSES"]), int(env["ZAYA_PROCESS_ID"]),
                              "environment")
        except KeyError as e:
            raise ValueError(f"multi-host: ZAYA_COORDINATOR is set but {e.args[0]} is not") from None
    if "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
        if not nodelist:
            raise ValueError("multi-host: SLURM_NTASKS > 1 but no SLURM_STEP_NODELIST / SLURM_JOB_NODELIST")
        port = env.get("ZAYA_COORDINATOR_PORT", "12355")
        return _validated(f"{first_slurm_host(nodelist)}:{port}", int(env["SLURM_NTASKS"]),
                          int(env["SLURM_PROCID"]), "slurm")
    return None


def first_slurm_host(nodelist: str) -> str:
    """'node[003-005,007],gpu1' -> 'node003' (the first host of a SLURM node list)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot parse SLURM node list {nodelist!r}")
    prefix, ranges = match.group(1), match.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _validated(coordinator: str, num_processes: int, process_id: int, source: str) -> DistributedSettings:
    if ":" not in coordinator:
        raise ValueError(f"multi-host: coordinator {coordinator!r} must be host:port")
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise ValueError(f"multi-host: process id {process_id} is not in [0, {num_processes})")
    return DistributedSettings(coordinator, num_processes, process_id, source)


def initialize(settings: DistributedSettings | None, *, init_timeout_s: int = 120,
               heartbeat_timeout_s: int = 30) -> None:
    """Connects this process to the others (no-op for a single-process run)."""
    if settings is None or settings.num_processes == 1:
        return
    # Cross-process collectives for the CPU backend (GPU and TPU bring their own); it must be set before the
    # backend starts, so it is set without asking which backend this is.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=settings.coordinator,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=init_timeout_s,
        heartbeat_timeout_seconds=heartbeat_timeout_s,
    )


def allgather_json(obj: Any) -> list[Any]:
    """Every process's JSON-serialisable `obj`, in process order (just [obj] in a single-process run)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.array([data.size], np.int32))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[: int(n)]).decode()) for row, n in zip(gathered, lengths.reshape(-1))]


class StepWatchdog:
    """Exits the process (status 3) with a clear message when no step completes within `timeout_s`."""

    def __init__(self, timeout_s: float, *, first_step_timeout_s: float | None = None, stream=None):
        self.timeout_s = timeout_s
        # The first step includes compilation, which can take far longer than a step.
        self.first_step_timeout_s = max(timeout_s, first_step_timeout_s or 0.0)
        self.stream = stream
        self._last = time.monotonic()
        self._step = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="zaya-step-watchdog", daemon=True)

    def start(self) -> "StepWatchdog":
        self._last = time.monotonic()
        self._thread.start()
        return self

    def beat(self, step: int) -> None:
        self._step = step
        self._last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(1.0, self.timeout_s / 4)):  # noqa: ASYNC110 - a plain daemon thread
            waited = time.monotonic() - self._last
            if waited > (self.timeout_s if self._step > 0 else self.first_step_timeout_s):
                stream = self.stream or sys.stderr
                print(f"zaya-train: error: no training step completed for {waited:.0f}s after step {self._step} "
                      f"(process {jax.process_index()} of {jax.process_count()}): a peer process died or a "
                      "device stalled; exiting instead of hanging", file=stream, flush=True)
                os._exit(WATCHDOG_EXIT_CODE)
