"""Hardware that zaya-compile compiles for without having it: TPU slices, GPU nodes, CPU devices.

    parse_target("tpu:v5p-128")  -> Target(platform "tpu", 64 devices, topology "v5:4x4x4", HBM per device, ...)
    target_devices(target)       -> the target's compile-only jax devices (no hardware needed)

Target names:
    tpu:v5p-N      a Cloud TPU v5p slice; N counts TensorCores (two per chip, one megacore device per chip), so
                   v5p-128 is 64 chips. Slices: v5p-8, -16, -32, -64, -128, -256, -512, -1024.
    tpu:v5e-N      a Cloud TPU v5e (v5 lite) slice; N counts chips (one core each): v5e-1, -4, -8, ..., -256.
    tpu:GEN:AxBxC  an explicit topology, e.g. tpu:v5p:2x2x4 (16 chips) or tpu:v5e:2x2; GEN is v5p or v5e.
    gpu:h100xN     N NVIDIA H100 SXM 80GB, 8 per node (N = 8 or a multiple of 8); gpu:h200xN likewise (141 GB).
    cpu:N          N host CPU devices (the first N of this process's; the suite has 8 virtual ones).

TPU devices come from libtpu (`jax[tpu]`); chip layouts and torus wrap-around follow Cloud TPU's slice shapes
(MaxText's accelerator_to_spec_map lists the same). GPU devices come from the CUDA PJRT plugin
(`jax-cuda12-plugin`), given a GPU target description: the text files in train/gpu_targets/ (XLA's own device
specs, source named in each file's header) and a topology "1 x nodes x 8". Device ids run node by node, so the
innermost mesh axes (expert, tensor) stay inside a node, as in a real multi-node run.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import importlib.util
import math
import os
import re

import jax

GIB = 1024**3
GPUS_PER_NODE = 8
INSTALL_HINT = "pip install -e '.[aot]' (jax[tpu] and jax[cuda12-local] at the installed jax version, plus ptxas)"

# Per-device HBM as the TPU compiler counts it ("exceeds available HBM (95.74G)" in libtpu's out-of-memory message
# for v5p, 15.75G for v5e; G = GiB). GPU targets read device_memory_size from their description.
_TPU_GENERATIONS = {
    # name: (libtpu topology prefix, chip config, cores per device in the slice name, dimensions, HBM bytes,
    #        Cloud TPU accelerator type prefix)
    "v5p": ("v5", "megacore", 2, 3, int(95.74 * GIB), "v5p"),
    "v5e": ("v5e", "default", 1, 2, int(15.75 * GIB), "v5litepod"),
}
# Cloud TPU slice shapes (chips) by chip count.
_TPU_SHAPES = {
    "v5p": {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
            256: (4, 8, 8), 512: (8, 8, 8)},
    "v5e": {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)},
}
_GPU_SPECS = {"h100": "h100_sxm.txtpb", "h200": "h200.txtpb"}
# Fields of XLA's newer device descriptions that the installed CUDA plugin's proto does not know yet (jax 0.10.2
# rejects the whole description over them); they only tune collective buffers, not what is compiled.
_UNKNOWN_GPU_SPEC_FIELDS = ("collective_memory_granularity",)


class TargetError(ValueError):
    """A target name zaya-compile does not know, or one whose compiler is not installed here."""


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # as given, e.g. "tpu:v5p-128"
    platform: str  # "tpu" | "cuda" | "cpu"
    num_devices: int
    hbm_bytes: int | None  # per device; None for CPU devices (host memory)
    margin: float  # fraction of HBM a run leaves free (runtime, fragmentation; the GPU client's preallocation)
    topology: str = ""  # libtpu "v5:4x4x4" / CUDA "1x8x8"
    chip_config: str = ""
    wrap: tuple[bool, ...] = ()
    gpu_spec: str = ""  # the GPU target description's file name in train/gpu_targets/
    devices_per_node: int = 0  # GPU: devices that share a node (NVLink); 0 = not a multi-node target
    accelerator_type: str = ""  # TPU: the Cloud TPU accelerator type, e.g. "v5p-128"

    @property
    def host_bounds(self) -> tuple[int, int, int]:
        """TPU chips per host: 2x2x1 (4 chips), or the whole slice when it is smaller."""
        shape = [int(s) for s in self.topology.split(":")[1].split("x")] + [1]
        return tuple(min(bound, size) for bound, size in zip((2, 2, 1), shape[:3]))

    @property
    def usable_bytes(self) -> int | None:
        return None if self.hbm_bytes is None else int(self.hbm_bytes * (1.0 - self.margin))


def parse_target(name: str) -> Target:
    """The Target a name describes (see the module docstring), or a TargetError listing what is accepted."""
    kind, _, rest = name.partition(":")
    if kind == "tpu":
        return _tpu_target(name, rest)
    if kind == "gpu":
        match = re.fullmatch(r"(h100|h200)x(\d+)", rest)
        if match is None:
            raise TargetError(f"unknown GPU target {name!r}: expected gpu:h100xN or gpu:h200xN (N = 8, 16, 64, ...)")
        count = int(match.group(2))
        if count < 1 or (count > GPUS_PER_NODE and count % GPUS_PER_NODE):
            raise TargetError(f"{name}: {count} GPUs is not whole nodes of {GPUS_PER_NODE}")
        nodes, per_node = (count // GPUS_PER_NODE, GPUS_PER_NODE) if count >= GPUS_PER_NODE else (1, count)
        spec = _GPU_SPECS[match.group(1)]
        # jax's GPU client takes 75% of device memory by default (XLA_PYTHON_CLIENT_MEM_FRACTION); a run that
        # needs more must raise that fraction, so the default margin is what an unconfigured run has.
        return Target(name, "cuda", count, gpu_memory_bytes(spec), 0.25, topology=f"1x{nodes}x{per_node}",
                      gpu_spec=spec, devices_per_node=per_node if nodes > 1 else 0)
    if kind == "cpu":
        if not rest.isdigit() or int(rest) < 1:
            raise TargetError(f"unknown CPU target {name!r}: expected cpu:N with N >= 1 devices")
        return Target(name, "cpu", int(rest), None, 0.0)
    raise TargetError(f"unknown target {name!r}: expected tpu:v5p-N, tpu:v5e-N, tpu:v5p:AxBxC, tpu:v5e:AxB, "
                      f"gpu:h100xN, gpu:h200xN or cpu:N")


def _tpu_target(name: str, rest: str) -> Target:
    slice_name = re.fullmatch(r"(v5p|v5e)-(\d+)", rest)
    explicit = re.fullmatch(r"(v5p|v5e):(\d+(?:x\d+)+)", rest)
    if slice_name:
        generation, count = slice_name.group(1), int(slice_name.group(2))
        prefix, chip_config, cores, dims, hbm, accelerator = _TPU_GENERATIONS[generation]
        if count % cores or count // cores not in _TPU_SHAPES[generation]:
            sizes = ", ".join(f"{generation}-{chips * cores}" for chips in _TPU_SHAPES[generation])
            raise TargetError(f"unknown TPU slice {name!r}: {generation} slices are {sizes}, or give a topology "
                              f"such as tpu:{generation}:{'x'.join(['2'] * dims)}")
        shape = _TPU_SHAPES[generation][count // cores]
    elif explicit:
        generation = explicit.group(1)
        prefix, chip_config, cores, dims, hbm, accelerator = _TPU_GENERATIONS[generation]
        shape = tuple(int(s) for s in explicit.group(2).split("x"))
        if len(shape) != dims or min(shape) < 1:
            raise TargetError(f"{name}: a {generation} topology has {dims} positive dimensions")
    else:
        raise TargetError(f"unknown TPU target {name!r}: expected tpu:v5p-N (N TensorCores), tpu:v5e-N (N chips) "
                          "or an explicit topology tpu:v5p:AxBxC / tpu:v5e:AxB")
    # Torus wrap-around: v5p slices of whole 4x4x4 cubes, v5e along dimensions of 16 chips (Cloud TPU's shapes).
    if generation == "v5p":
        wrap = (all(s % 4 == 0 for s in shape),) * 3
    else:
        wrap = tuple(s == 16 for s in shape) + (False,)
    shape_text = "x".join(str(s) for s in shape)
    return Target(name, "tpu", math.prod(shape), hbm, 0.0, topology=f"{prefix}:{shape_text}",
                  chip_config=chip_config, wrap=wrap, accelerator_type=f"{accelerator}-{math.prod(shape) * cores}")


def gpu_spec_text(file_name: str) -> str:
    """A GPU target description from train/gpu_targets/, less the fields the installed plugin cannot parse."""
    text = importlib.resources.files("train").joinpath("gpu_targets", file_name).read_text()
    return "".join(line for line in text.splitlines(keepends=True)
                   if line.strip().split(":")[0] not in _UNKNOWN_GPU_SPEC_FIELDS)


def gpu_memory_bytes(file_name: str) -> int:
    match = re.search(r"device_memory_size:\s*(\d+)", gpu_spec_text(file_name))
    if match is None:
        raise TargetError(f"train/gpu_targets/{file_name} has no device_memory_size")
    return int(match.group(1))


def target_devices(target: Target) -> list:
    """The compile-only devices of `target` (CPU: this process's CPU devices). Raises TargetError naming the
    package to install when this machine cannot compile for it."""
    if target.platform == "cpu":
        devices = jax.devices("cpu")
        if len(devices) < target.num_devices:
            raise TargetError(f"{target.name}: this process has {len(devices)} CPU devices; start it with "
                              f"XLA_FLAGS=--xla_force_host_platform_device_count={target.num_devices}")
        return devices[:target.num_devices]  # the first N of a process that has more (e.g. the suite's 8)
    from jax.experimental import topologies

    if target.platform == "tpu":
        # libtpu asks the cloud metadata server which TPU slice this machine belongs to, and warns when it cannot
        # tell; this machine is no TPU host, so say what it would be. Read once, when libtpu loads.
        os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
        os.environ.setdefault("TPU_ACCELERATOR_TYPE", target.accelerator_type)
        os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
        # libtpu takes /tmp/libtpu_lockfile so that one process owns a host's chips; compiling claims no chip, and
        # without this a second zaya-compile (or the test suite) next to a running one fails with "Internal error
        # when accessing libtpu multi-process lockfile".
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            topology = topologies.get_topology_desc(
                platform="tpu", topology_name=target.topology, chip_config_name=target.chip_config,
                chips_per_host_bounds=target.host_bounds, num_slices=1, wrap=target.wrap)
        except RuntimeError as e:
            if "TPU support not installed" in str(e):
                raise TargetError(f"{target.name}: compiling for TPUs needs libtpu: {INSTALL_HINT}") from None
            raise
    else:
        try:
            topology = topologies.get_topology_desc(platform="cuda", topology=target.topology,
                                                    target_config=gpu_spec_text(target.gpu_spec))
        except NotImplementedError:
            if importlib.util.find_spec("jax_cuda12_plugin") is None:
                raise TargetError(f"{target.name}: compiling for NVIDIA GPUs needs the CUDA plugin: "
                                  f"{INSTALL_HINT}") from None
            # Installed but not started: without a GPU its start-up check fails unless JAX_PLATFORMS leaves
            # CUDA out, which must be set before jax starts.
            raise TargetError(f"{target.name}: the CUDA plugin is installed but did not start (no CUDA runtime "
                              "here); set JAX_PLATFORMS=cpu before jax starts, as zaya-compile does") from None
    devices = list(topology.devices)
    if len(devices) != target.num_devices:
        raise TargetError(f"{target.name}: the compiler gave {len(devices)} devices, expected {target.num_devices}")
    return devices
