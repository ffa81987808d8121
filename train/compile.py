"""zaya-compile: compile the training step for hardware this machine does not have, and say whether it fits.

    zaya-compile --config configs/zaya1-8b.yaml --target tpu:v5p-128 [--set section.key=value ...] [--json]
    zaya-compile --config configs/zaya1-8b.yaml --program kernels --target tpu:v5p-8 | gpu:h100x8 [--json]

(`--program kernels`: the Pallas kernels instead of the step, see train/compile_kernels.py.)

The program compiled is the one `zaya-train` runs (train/state.py `jit_train_step`: the same step function, state
shardings, batch sharding and donation), lowered from an abstract training state (ShapeDtypeStructs carrying their
shardings: nothing is allocated, so the 8.8B model compiles on a laptop) for the target's compile-only devices
(train/targets.py). Reported per device:

    parameters, optimizer state, batch, rest of the state   from the state's shard shapes
    arguments, outputs, aliased, temporaries, code          from `compiled.memory_analysis()`
    total = arguments + outputs - aliased + temporaries + code; fits when total <= HBM x (1 - margin)
    collectives by kind with their operand bytes per step   from the compiled HLO (train/hlo_collectives.py)
    model FLOPs per step                                   6 x active params x tokens + causal attention
                                                           (train/loop.py flops_per_token; XLA's cost_analysis
                                                           counts a scanned layer once, and is None for CUDA)
    compile time                                           tracing, lowering and compiling

A TPU program that does not fit is refused by the compiler itself: that is reported as "does not fit" with the
compiler's message. Exit status: 0 fits, 1 does not fit, 2 bad input or a compiler that is not installed here.
"""

from __future__ import annotations

import os

# The machine running zaya-compile has none of the target's devices: jax's own backend is the CPU. Set before jax
# starts (an explicit JAX_PLATFORMS wins), so an installed libtpu / CUDA plugin does not look for hardware.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh  # noqa: E402

from sharding import make_mesh, use_mesh  # noqa: E402
from train.compile_kernels import compile_kernels, format_kernels_report  # noqa: E402
from train.config import TrainConfig, load_train_config  # noqa: E402
from train.hlo_collectives import KINDS, collective_bytes  # noqa: E402
from train.loop import flops_per_token  # noqa: E402
from train.state import abstract_batch, abstract_train_state, device_bytes, jit_train_step  # noqa: E402
from train.targets import GIB, Target, TargetError, parse_target, target_devices  # noqa: E402

# Per-compile XLA options by target platform. CUDA: XLA's CUB radix sort (what jnp.argsort in the MoE dispatch
# lowers to) needs a GPU at compile time to size its scratch space; the sort network compiles without one.
COMPILER_OPTIONS = {"cuda": {"xla_gpu_enable_cub_radix_sort": False}}
BATCH_DTYPES = {"target_mask": jnp.float32}  # every other batch array is int32 (train/data/packing.py)


@dataclasses.dataclass
class CompileReport:
    target: str
    devices: int
    mesh: dict[str, int]
    tokens_per_device: int
    remat_policy: str
    loss_chunk: int
    # Bytes per device.
    param_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    other_state_bytes: int  # balancer biases and moments, step, rng
    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    hbm_bytes: int | None = None
    usable_bytes: int | None = None  # HBM less the target's margin
    fits: bool | None = None  # None: a CPU target (host memory)
    compiler_message: str = ""  # the compiler's refusal when it does not fit
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    collectives_unknown_trip_count: list[str] = dataclasses.field(default_factory=list)
    loop_trip_counts: list[int | None] = dataclasses.field(default_factory=list)  # the program's while loops
    model_flops_per_step: float = 0.0
    compile_seconds: float = 0.0  # tracing, lowering and compiling
    expert_groups_within_node: bool | None = None  # multi-node GPU targets


def compile_train_step(cfg: TrainConfig, target: Target) -> CompileReport:
    """Lowers and compiles the training step for `target` and measures it (see the module docstring)."""
    devices = target_devices(target)
    mesh = make_mesh(cfg.mesh, devices=devices)
    setup = abstract_train_state(cfg, mesh)  # the run's own state and step (train/state.py), not allocated
    state, batch = setup.state, abstract_batch(cfg, mesh)
    report = CompileReport(
        target=target.name, devices=len(devices), mesh=dict(mesh.shape),
        tokens_per_device=cfg.train.batch_size * cfg.data.seq_len // len(devices),
        remat_policy=cfg.model.remat_policy, loss_chunk=cfg.train.loss_chunk,
        param_bytes=device_bytes(state.params), opt_state_bytes=device_bytes(state.opt_state),
        batch_bytes=device_bytes(batch),
        other_state_bytes=device_bytes((state.biases, state.balancer, state.step, state.rng)),
        hbm_bytes=target.hbm_bytes, usable_bytes=target.usable_bytes,
        model_flops_per_step=flops_per_token(cfg) * cfg.train.batch_size * cfg.data.seq_len,
        expert_groups_within_node=experts_within_node(mesh, target),
    )
    step = jit_train_step(cfg, setup, mesh)
    start = time.perf_counter()
    with use_mesh(mesh):  # the model reads the mesh and its axis rules while tracing
        lowered = step.lower(state, batch)
    try:
        compiled = lowered.compile(compiler_options=COMPILER_OPTIONS.get(target.platform))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        report.compile_seconds = time.perf_counter() - start
        report.fits = False
        report.compiler_message = str(e).strip()
        return report
    report.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    report.argument_bytes = memory.argument_size_in_bytes
    report.output_bytes = memory.output_size_in_bytes
    report.alias_bytes = memory.alias_size_in_bytes
    report.temp_bytes = memory.temp_size_in_bytes
    report.code_bytes = memory.generated_code_size_in_bytes
    report.total_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                          - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                          + memory.generated_code_size_in_bytes)
    if target.usable_bytes is not None:
        report.fits = report.total_bytes <= target.usable_bytes
    collectives = collective_bytes(compiled.as_text())
    report.collectives = {k: {"ops": v.ops, "bytes_per_step": v.bytes_per_step}
                          for k, v in collectives.by_kind.items()}
    report.collectives_unknown_trip_count = collectives.unknown_trip_count
    report.loop_trip_counts = collectives.loop_trip_counts
    return report


def experts_within_node(mesh: Mesh, target: Target) -> bool | None:
    """Multi-node GPU targets: whether every group of devices that shares the expert (and tensor) axes lies in
    one node, so expert dispatch stays on NVLink. None for single-node and non-GPU targets."""
    if not target.devices_per_node:
        return None
    axes = [a for a in mesh.axis_names if a in ("expert", "tensor")]
    groups = mesh.devices.reshape(-1, math.prod(mesh.shape[a] for a in axes))
    return all(len({d.process_index for d in group}) == 1 for group in groups)  # one process per node


def _gib(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, size in (("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def format_report(r: CompileReport) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [
        f"target: {r.target}  devices: {r.devices}  mesh: {mesh}",
        f"tokens per device: {r.tokens_per_device}  remat: {r.remat_policy}  loss chunk: {r.loss_chunk}",
        "per device:",
        f"  parameters       {_gib(r.param_bytes)}",
        f"  optimizer state  {_gib(r.opt_state_bytes)}",
        f"  batch            {_gib(r.batch_bytes)}",
        f"  rest of state    {_gib(r.other_state_bytes)}",
    ]
    if r.total_bytes is not None:
        lines += [
            f"  arguments {_gib(r.argument_bytes)}  outputs {_gib(r.output_bytes)}  aliased {_gib(r.alias_bytes)}",
            f"  temporaries      {_gib(r.temp_bytes)}",
            f"  code             {_gib(r.code_bytes)}",
            f"  total            {_gib(r.total_bytes)}",
        ]
    if r.fits is None:
        lines.append("fits: host memory (no device limit)")
    elif r.fits:
        lines.append(f"fits: yes, {_gib(r.total_bytes)} of {_gib(r.usable_bytes)} usable "
                     f"({_gib(r.hbm_bytes)} HBM), headroom {_gib(r.usable_bytes - r.total_bytes)}")
    elif r.compiler_message:
        lines.append(f"fits: NO, does not fit ({_gib(r.hbm_bytes)} HBM per device); the compiler says:")
        lines += ["  " + line for line in r.compiler_message.splitlines()]
    else:
        lines.append(f"fits: NO, does not fit: {_gib(r.total_bytes)} > {_gib(r.usable_bytes)} usable "
                     f"({_gib(r.hbm_bytes)} HBM)")
    if r.expert_groups_within_node is not None:
        lines.append(f"expert groups within a node: {'yes' if r.expert_groups_within_node else 'NO'}")
    if r.collectives:
        lines.append("collectives per step (operand bytes per device):")
        for kind in KINDS:
            c = r.collectives[kind]
            lines.append(f"  {kind:<20} {c['ops']:>4} ops  {_gib(c['bytes_per_step'])}")
        if r.collectives_unknown_trip_count:
            lines.append(f"  not totalled (loop trip count unknown): {', '.join(r.collectives_unknown_trip_count)}")
    lines.append(f"model FLOPs per step: {r.model_flops_per_step:.4g} ({r.model_flops_per_step / r.devices:.4g} "
                 f"per device)")
    lines.append(f"compile time: {r.compile_seconds:.1f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zaya-compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset (as zaya-train takes)")
    parser.add_argument("--target", required=True,
                        help="tpu:v5p-N | tpu:v5e-N | tpu:v5p:AxBxC | gpu:h100xN | gpu:h200xN | cpu:N")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set mesh.fsdp=-1")
    parser.add_argument("--margin", type=float, default=None,
                        help="fraction of HBM to leave free (default: 0 on TPU, where the compiler checks; 0.25 "
                             "on GPU, what jax's client leaves by default)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--program", choices=("train", "kernels"), default="train",
                        help="train: the training step; kernels: the Pallas kernels at the config's shapes "
                             "(train/compile_kernels.py)")
    args = parser.parse_args(argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
        target = parse_target(args.target)
        if target.platform == "cpu":
            try:  # a fresh process has one CPU device; give it the target's count before jax starts
                jax.config.update("jax_num_cpu_devices", target.num_devices)
            except RuntimeError:
                pass  # jax already started (e.g. under pytest): target_devices checks the count it has
        if args.margin is not None:
            if not 0.0 <= args.margin < 1.0:
                raise ValueError(f"--margin must be in [0, 1), got {args.margin}")
            target = dataclasses.replace(target, margin=args.margin)
        if args.program == "kernels":
            kernels = compile_kernels(cfg.model, target)
        else:
            report = compile_train_step(cfg, target)
    except (ValueError, FileNotFoundError, TargetError) as e:
        print(f"zaya-compile: error: {e}", file=sys.stderr)
        return 2
    if args.program == "kernels":
        print(json.dumps(dataclasses.asdict(kernels)) if args.json else format_kernels_report(kernels))
        return 0 if all(case.compiled for case in kernels.cases) else 1
    print(json.dumps(dataclasses.asdict(report)) if args.json else format_report(report))
    return 1 if report.fits is False else 0


if __name__ == "__main__":
    sys.exit(main())
