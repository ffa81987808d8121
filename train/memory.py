"""The memory a training run's state needs, from shapes alone, and whether it fits this machine.

    estimate_memory(cfg, mesh) -> MemoryEstimate   bytes per process of
        parameters       every nnx.Param at model.param_dtype
        gradients        the same shapes and dtypes (the step holds one gradient per parameter)
        optimizer_state  optax's state for those parameters (AdamW: two moments per parameter; Muon: one for the
                         Muon matrices, two for the rest), from `jax.eval_shape` of the optimizer's init
Each leaf counts once per local device holding a copy of its shard (train/state.py's abstract state on `mesh`): a
replicated tensor on 8 devices is 8 copies. Nothing is allocated (nnx.eval_shape / jax.eval_shape). Activations,
the batch and compiler scratch are not counted: the total is a floor, so a run refused by `check_fits` cannot run.

    memory_shortfall(estimate) -> the line saying it does not fit, or None; check_fits(estimate) raises it
    available_memory() -> (bytes or None, what was measured)
On CPU the devices' memory is the host's: MemAvailable of /proc/meminfo (else the physical pages, os.sysconf).
On accelerators, the local devices' `bytes_limit` (memory_stats), when the backend reports it.
"""

from __future__ import annotations

import dataclasses
import os

import jax
from jax.sharding import Mesh

from train.config import TrainConfig
from train.state import abstract_train_state, device_bytes

GB = 1e9


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    parameters: int  # bytes per process
    gradients: int
    optimizer_state: int
    local_devices: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state

    def describe(self) -> str:
        return (f"{self.total / GB:.2f} GB per process (parameters {self.parameters / GB:.2f} GB + gradients "
                f"{self.gradients / GB:.2f} GB + optimizer state {self.optimizer_state / GB:.2f} GB, over "
                f"{self.local_devices} local device{'s' if self.local_devices > 1 else ''})")


def estimate_memory(cfg: TrainConfig, mesh: Mesh) -> MemoryEstimate:
    state = abstract_train_state(cfg, mesh).state  # the run's own state layout, not allocated
    local = len([d for d in mesh.devices.flat if d.process_index == jax.process_index()])
    param_bytes = device_bytes(state.params) * local
    return MemoryEstimate(parameters=param_bytes, gradients=param_bytes,
                          optimizer_state=device_bytes(state.opt_state) * local, local_devices=local)


def available_memory() -> tuple[int | None, str]:
    devices = jax.local_devices()
    if devices[0].platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024, "available host memory (MemAvailable)"
        except OSError:
            pass
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical host memory"
    limits = [(d.memory_stats() or {}).get("bytes_limit") for d in devices]
    if not all(limits):
        return None, "device memory (not reported by this backend)"
    return int(sum(limits)), f"memory of {len(devices)} {devices[0].device_kind} device(s)"


def memory_shortfall(estimate: MemoryEstimate) -> str | None:
    """A line with the sizes when the run's state alone exceeds the memory available to this process, else None."""
    available, what = available_memory()
    if available is None or estimate.total <= available:
        return None
    return (f"the training state needs {estimate.describe()}, but this machine has {available / GB:.2f} GB of {what}; "
            "use a smaller model or more devices to shard it over (mesh.fsdp)")


def check_fits(estimate: MemoryEstimate) -> None:
    """Raises ValueError with `memory_shortfall`'s line when the state cannot fit."""
    shortfall = memory_shortfall(estimate)
    if shortfall is not None:
        raise ValueError(shortfall)
