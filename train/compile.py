"""zaya-compile: compile the training step (or zaya-generate's programs) for hardware this machine does not have,
and say whether it fits.

    zaya-compile --config configs/zaya1-8b.yaml --target tpu:v5p-128 [--set section.key=value ...] [--json]
    zaya-compile ... --program generate [--batch B --prompt-len P --max-len T]   prefill + one decode step
    zaya-compile ... --max-seq [--granule 1024]        the longest data.seq_len that fits one row per device
    zaya-compile ... --memory-gib G                    a per-device memory instead of the target's (what-if)
    zaya-compile ... --program kernels --target tpu:v5p-8 | gpu:h100x8   the Pallas kernels (train/compile_kernels.py)

--program train (default): the program compiled is the one `zaya-train` runs (train/state.py `jit_train_step`: the
same step function, state shardings, batch sharding and donation), lowered from an abstract training state
(ShapeDtypeStructs carrying their shardings: nothing is allocated, so the 8.8B model compiles on a laptop) for the
target's compile-only devices (train/targets.py). Reported per device:

    parameters, optimizer state, batch, rest of the state   from the state's shard shapes
    arguments, outputs, aliased, temporaries, code          from `compiled.memory_analysis()`
    total = arguments + outputs - aliased + temporaries + code; fits when total <= HBM x (1 - margin)
    collectives by kind with their operand bytes per step   from the compiled HLO (train/hlo_collectives.py)
    model FLOPs per step                                   6 x active params x tokens + causal attention
                                                           (train/loop.py flops_per_token; XLA's cost_analysis
                                                           counts a scanned layer once, and is None for CUDA)
    compile time                                           tracing, lowering and compiling

--program generate: zaya-generate's two programs (zaya_jax/generate.py `prefill`, `decode_step`, greedy), each
compiled and measured as above, with the model's state sharded as in training and the prompt, tokens and KV/conv
cache split over the batch (`compile_generate`); reported per device: parameters, cache, and per program the
compiler's figures. --max-seq: `search_max_seq_len`, doubling then bisection over data.seq_len.

A TPU program that does not fit is refused by the compiler itself: that is reported as "does not fit" with the
compiler's message. Exit status: 0 fits (--max-seq: some length fits), 1 does not fit, 2 bad input or a compiler
that is not installed here.
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
from typing import Any, Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: E402

from sharding import RULES, batch_shards, make_mesh, train_state_shardings, use_mesh  # noqa: E402
from train.compile_kernels import compile_kernels, format_kernels_report  # noqa: E402
from train.config import TrainConfig, load_train_config  # noqa: E402
from train.hlo_collectives import KINDS, collective_bytes  # noqa: E402
from train.loop import flops_per_token  # noqa: E402
from train.state import (abstract_batch, abstract_train_state, device_bytes, jit_train_step,  # noqa: E402
                         shardings_of, with_shardings)
from train.targets import GIB, Target, TargetError, parse_target, target_devices  # noqa: E402
from zaya_jax.axis_rules import mesh_axes, spec_entry  # noqa: E402
from zaya_jax.cache import Cache, init_cache  # noqa: E402
from zaya_jax.generate import Sampling, decode_step, prefill  # noqa: E402
from zaya_jax.model import ZayaForCausalLM  # noqa: E402

# Per-compile XLA options by target platform. CUDA: XLA's CUB radix sort (what jnp.argsort in the MoE dispatch
# lowers to) needs a GPU at compile time to size its scratch space; the sort network compiles without one. CPU: the
# program is measured, never run, and LLVM's optimisation level halves the compile without changing the buffers.
COMPILER_OPTIONS = {"cuda": {"xla_gpu_enable_cub_radix_sort": False}, "cpu": {"xla_backend_optimization_level": 0}}


@dataclasses.dataclass(kw_only=True)
class CompiledProgram:
    """What the compiler says about one program, per device (filled by `compile_and_measure`)."""

    argument_bytes: int | None = None
    output_bytes: int | None = None
    alias_bytes: int | None = None
    temp_bytes: int | None = None
    code_bytes: int | None = None
    total_bytes: int | None = None
    hbm_bytes: int | None = None
    usable_bytes: int | None = None  # HBM less the target's margin
    fits: bool | None = None  # None: a CPU target (host memory) without --memory-gib
    compiler_message: str = ""  # the compiler's refusal when it does not fit
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    collectives_unknown_trip_count: list[str] = dataclasses.field(default_factory=list)
    loop_trip_counts: list[int | None] = dataclasses.field(default_factory=list)  # the program's while loops
    compile_seconds: float = 0.0  # tracing, lowering and compiling


@dataclasses.dataclass(kw_only=True)
class CompileReport(CompiledProgram):
    """The training step (--program train)."""

    target: str
    devices: int
    mesh: dict[str, int]
    seq_len: int  # data.seq_len
    tokens_per_device: int
    remat_policy: str
    loss_chunk: int
    # Bytes per device.
    param_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    other_state_bytes: int  # balancer biases and moments, step, rng
    model_flops_per_step: float = 0.0
    expert_groups_within_node: bool | None = None  # multi-node GPU targets


def compile_train_step(cfg: TrainConfig, target: Target) -> CompileReport:
    """Lowers and compiles the training step for `target` and measures it (see the module docstring)."""
    devices = target_devices(target)
    mesh = make_mesh(cfg.mesh, devices=devices)
    setup = abstract_train_state(cfg, mesh)  # the run's own state and step (train/state.py), not allocated
    state, batch = setup.state, abstract_batch(cfg, mesh)
    report = CompileReport(
        target=target.name, devices=len(devices), mesh=dict(mesh.shape),
        seq_len=cfg.data.seq_len, tokens_per_device=cfg.train.batch_size * cfg.data.seq_len // len(devices),
        remat_policy=cfg.model.remat_policy, loss_chunk=cfg.train.loss_chunk,
        param_bytes=device_bytes(state.params), opt_state_bytes=device_bytes(state.opt_state),
        batch_bytes=device_bytes(batch),
        other_state_bytes=device_bytes((state.biases, state.balancer, state.step, state.rng)),
        model_flops_per_step=flops_per_token(cfg) * cfg.train.batch_size * cfg.data.seq_len,
        expert_groups_within_node=experts_within_node(mesh, target),
    )
    step = jit_train_step(cfg, setup, mesh)
    compile_and_measure(lambda: step.lower(state, batch), mesh, target, report)
    return report


def compile_and_measure(lower: Callable[[], Any], mesh: Mesh, target: Target, program: CompiledProgram,
                        rules: dict[str, Any] | None = None) -> None:
    """Traces and lowers (`lower()`, under the mesh and the logical-axis `rules`, default sharding/rules.py's),
    compiles for `target` and fills `program` with the compiler's memory figures, whether they fit, the collectives
    and the compile time. A program the compiler refuses for memory (TPU) is recorded as not fitting, with the
    compiler's message."""
    program.hbm_bytes, program.usable_bytes = target.hbm_bytes, target.usable_bytes
    start = time.perf_counter()
    with use_mesh(mesh, rules):  # the model reads the mesh and its axis rules while tracing
        lowered = lower()
    try:
        compiled = lowered.compile(compiler_options=COMPILER_OPTIONS.get(target.platform))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        program.compile_seconds = time.perf_counter() - start
        program.fits = False
        program.compiler_message = str(e).strip()
        return
    program.compile_seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    program.argument_bytes = memory.argument_size_in_bytes
    program.output_bytes = memory.output_size_in_bytes
    program.alias_bytes = memory.alias_size_in_bytes
    program.temp_bytes = memory.temp_size_in_bytes
    program.code_bytes = memory.generated_code_size_in_bytes
    program.total_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes
                           - memory.alias_size_in_bytes + memory.temp_size_in_bytes
                           + memory.generated_code_size_in_bytes)
    if target.usable_bytes is not None:
        program.fits = program.total_bytes <= target.usable_bytes
    collectives = collective_bytes(compiled.as_text())
    program.collectives = {k: {"ops": v.ops, "bytes_per_step": v.bytes_per_step}
                           for k, v in collectives.by_kind.items()}
    program.collectives_unknown_trip_count = collectives.unknown_trip_count
    program.loop_trip_counts = collectives.loop_trip_counts


@dataclasses.dataclass(kw_only=True)
class GenerateProgram(CompiledProgram):
    """One of zaya-generate's two programs: "prefill" (the prompt into a fresh cache) or "decode step" (one token)."""

    name: str
    tokens_per_device: int  # new tokens each device runs through the model
    input_bytes: int  # per device: prompt and mask, or token and position (the cache and the key aside)


@dataclasses.dataclass
class GenerateReport:
    """--program generate: the prefill and the decode step of `zaya-generate` laid out on the target's mesh."""

    target: str
    devices: int
    mesh: dict[str, int]
    batch: int
    prompt_len: int
    cache_len: int  # slots: prompt + generated tokens
    batch_axes: list[str]  # mesh axes the batch (and the cache's batch dimension) is split over; [] = replicated
    param_bytes: int  # per device: the model's parameters and balancing biases, sharded as in training
    cache_bytes: int  # per device: K/V, conv and value history, valid slots, length
    programs: list[GenerateProgram]

    @property
    def fits(self) -> bool | None:
        if any(p.fits is False for p in self.programs):
            return False
        return None if any(p.fits is None for p in self.programs) else True


def generation_batch_axes(mesh: Mesh, batch: int) -> tuple[str, ...]:
    """The training rules' batch mesh axes that can split `batch` rows: each in turn while the product divides the
    batch (batch 1 on 8 devices: none, every device runs the whole batch)."""
    axes: list[str] = []
    for axis in mesh_axes(("batch",), mesh, RULES):
        if batch % (math.prod(mesh.shape[a] for a in axes) * mesh.shape[axis]) == 0:
            axes.append(axis)
    return tuple(axes)


def cache_shardings(cache: Cache, mesh: Mesh, batch_axes: tuple[str, ...]) -> Cache:
    """The cache split over its batch dimension: [L, B, ...] layer states on dim 1, valid [B, T] on dim 0."""
    split = spec_entry(batch_axes)
    layer = NamedSharding(mesh, PartitionSpec(None, split))
    return Cache(layers=jax.tree.map(lambda _: layer, cache.layers), valid=NamedSharding(mesh, PartitionSpec(split)),
                 length=NamedSharding(mesh, PartitionSpec()))


def compile_generate(cfg: TrainConfig, target: Target, batch: int, prompt_len: int, cache_len: int) -> GenerateReport:
    """Compiles zaya-generate's prefill (a [batch, prompt_len] prompt into a fresh cache of `cache_len` slots) and
    one cached decode step (zaya_jax/generate.py `prefill`, `decode_step`; greedy, zaya-generate's default) for
    `target` and measures each. Layout: the model's state sharded as a training run shards it (sharding/rules.py on
    cfg.mesh: FSDP over `embed`, experts over `expert`); the prompt, the tokens and the cache split over the batch
    mesh axes that divide the batch (generation_batch_axes); the decode step donates the cache it updates."""
    if batch < 1 or prompt_len < 1:
        raise ValueError(f"--batch and --prompt-len must be >= 1, got {batch} and {prompt_len}")
    if cache_len <= prompt_len:
        raise ValueError(f"the prompt ({prompt_len} tokens) must be shorter than the cache (--max-len {cache_len} "
                         "slots): the cache holds the prompt and every generated token")
    if cache_len > cfg.model.max_position_embeddings:
        raise ValueError(f"--max-len {cache_len} is longer than model.max_position_embeddings "
                         f"({cfg.model.max_position_embeddings})")
    devices = target_devices(target)
    mesh = make_mesh(cfg.mesh, devices=devices)
    batch_axes = generation_batch_axes(mesh, batch)
    rules = {**RULES, "batch": batch_axes}
    model = nnx.eval_shape(lambda: ZayaForCausalLM(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, model_shapes = nnx.split(model)
    model_state = with_shardings(model_shapes, train_state_shardings(model_shapes, mesh))
    rows = NamedSharding(mesh, PartitionSpec(spec_entry(batch_axes)))
    replicated = NamedSharding(mesh, PartitionSpec())
    cache_shapes = jax.eval_shape(lambda: init_cache(cfg.model, batch, cache_len))
    cache_sharding = cache_shardings(cache_shapes, mesh, batch_axes)
    cache = with_shardings(cache_shapes, cache_sharding)
    key = jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype, sharding=replicated)
    prompt = jax.ShapeDtypeStruct((batch, prompt_len), jnp.int32, sharding=rows)
    token = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows)
    sampling = Sampling()  # greedy

    def prefill_program(state, input_ids, mask, key):
        return prefill(nnx.merge(graphdef, state), input_ids, mask, cache_len, key, sampling)

    def decode_program(state, token, position, cache, key):
        return decode_step(nnx.merge(graphdef, state), token, position, cache, key, sampling)

    model_sharding = shardings_of(model_state)
    outputs = (rows, rows, cache_sharding, replicated)
    jit_prefill = jax.jit(prefill_program, in_shardings=(model_sharding, rows, rows, replicated),
                          out_shardings=outputs)
    jit_decode = jax.jit(decode_program, in_shardings=(model_sharding, rows, rows, cache_sharding, replicated),
                         out_shardings=outputs, donate_argnums=3)
    rows_per_device = batch // math.prod(mesh.shape[a] for a in batch_axes)
    programs = [
        GenerateProgram(name="prefill", tokens_per_device=rows_per_device * prompt_len,
                        input_bytes=device_bytes((prompt, prompt))),
        GenerateProgram(name="decode step", tokens_per_device=rows_per_device,
                        input_bytes=device_bytes((token, token))),
    ]
    compile_and_measure(lambda: jit_prefill.lower(model_state, prompt, prompt, key), mesh, target, programs[0], rules)
    compile_and_measure(lambda: jit_decode.lower(model_state, token, token, cache, key), mesh, target, programs[1],
                        rules)
    return GenerateReport(target=target.name, devices=len(devices), mesh=dict(mesh.shape), batch=batch,
                          prompt_len=prompt_len, cache_len=cache_len, batch_axes=list(batch_axes),
                          param_bytes=device_bytes(model_state), cache_bytes=device_bytes(cache), programs=programs)


@dataclasses.dataclass
class SeqSearch:
    """--max-seq: the longest data.seq_len (a multiple of `granule`) whose training step fits one row per device."""

    granule: int
    largest_fitting: CompileReport | None  # None: not even one granule fits
    smallest_not_fitting: CompileReport | None  # None: model.max_position_embeddings itself fits
    tried: list[tuple[int, bool]]  # (seq_len, fits) in the order compiled


def search_max_seq_len(cfg: TrainConfig, target: Target, granule: int = 1024,
                       on_compiled: Callable[[CompileReport], None] | None = None) -> SeqSearch:
    """Compiles the training step at data.seq_len (rounded down to a multiple of `granule`, at least one granule),
    then at twice, four times ... that until it does not fit (or reaches model.max_position_embeddings), or at half,
    a quarter ... until it fits; then bisects between the longest fitting and the shortest failing length, in
    granules. A data.seq_len near the answer saves compiles. One row of seq_len tokens per batch shard
    (train.batch_size = batch shards x accumulation steps), so each device holds one sequence whole: no context
    parallelism. The target needs a memory size (a CPU target: --memory-gib). `on_compiled(report)` after each
    compile (zaya-compile prints a progress line: a search at full size takes many minutes)."""
    if granule < 1:
        raise ValueError(f"--granule must be >= 1, got {granule}")
    if target.usable_bytes is None:
        raise ValueError(f"{target.name} has no device memory to fit in: give one with --memory-gib")
    limit = cfg.model.max_position_embeddings // granule  # in granules
    if limit < 1:
        raise ValueError(f"--granule {granule} is longer than model.max_position_embeddings "
                         f"({cfg.model.max_position_embeddings})")
    mesh = make_mesh(cfg.mesh, devices=target_devices(target))
    rows = batch_shards(mesh) * cfg.train.accumulation_steps
    reports: dict[int, CompileReport] = {}
    tried: list[tuple[int, bool]] = []

    def fits(granules: int) -> bool:
        seq_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=granules * granule),
                                      train=dataclasses.replace(cfg.train, batch_size=rows))
        reports[granules] = compile_train_step(seq_cfg, target)
        tried.append((granules * granule, reports[granules].fits is True))
        if on_compiled is not None:
            on_compiled(reports[granules])
        return tried[-1][1]

    fitting, failing = 0, None  # in granules; 0: nothing fits yet
    size = min(max(cfg.data.seq_len // granule, 1), limit)
    if fits(size):
        fitting = size
        while fitting < limit:  # doubling
            size = min(2 * fitting, limit)
            if not fits(size):
                failing = size
                break
            fitting = size
    else:
        failing = size
        while failing > 1:  # halving
            size = failing // 2
            if fits(size):
                fitting = size
                break
            failing = size
    while failing is not None and failing - fitting > 1:  # bisection
        middle = (fitting + failing) // 2
        if fits(middle):
            fitting = middle
        else:
            failing = middle
    return SeqSearch(granule=granule, largest_fitting=reports.get(fitting),
                     smallest_not_fitting=None if failing is None else reports[failing], tried=tried)


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
        *_compiled_lines(r, "step"),
    ]
    if r.expert_groups_within_node is not None:
        lines.append(f"expert groups within a node: {'yes' if r.expert_groups_within_node else 'NO'}")
    lines.append(f"model FLOPs per step: {r.model_flops_per_step:.4g} ({r.model_flops_per_step / r.devices:.4g} "
                 f"per device)")
    lines.append(f"compile time: {r.compile_seconds:.1f} s")
    return "\n".join(lines)


def format_generate_report(r: GenerateReport) -> str:
    mesh = " ".join(f"{k}={v}" for k, v in r.mesh.items())
    lines = [
        f"target: {r.target}  devices: {r.devices}  mesh: {mesh}",
        f"generate: batch {r.batch}  prompt {r.prompt_len}  cache {r.cache_len} slots  batch split over: "
        f"{' x '.join(r.batch_axes) or 'nothing (every device runs the whole batch)'}",
        "per device:",
        f"  parameters       {_gib(r.param_bytes)}",
        f"  cache            {_gib(r.cache_bytes)}",
    ]
    for p in r.programs:
        lines += [f"{p.name}: {p.tokens_per_device} tokens per device, inputs {_gib(p.input_bytes)} per device",
                  *("  " + line for line in _compiled_lines(p, "call")),
                  f"  compile time: {p.compile_seconds:.1f} s"]
    return "\n".join(lines)


def format_seq_search(r: SeqSearch) -> str:
    fit, fail = r.largest_fitting, r.smallest_not_fitting
    lines = [f"largest data.seq_len that fits one row per device (multiples of {r.granule}): "
             f"{fit.seq_len if fit else f'none (not even {r.granule})'}"]
    if fit:
        lines.append(f"  total {_gib(fit.total_bytes)} of {_gib(fit.usable_bytes)} usable "
                     f"(temporaries {_gib(fit.temp_bytes)})")
    if fail:
        lines.append(f"smallest that does not fit: {fail.seq_len}: "
                     + (f"total {_gib(fail.total_bytes)} (temporaries {_gib(fail.temp_bytes)})"
                        if fail.total_bytes is not None else "refused by the compiler"))
    else:
        lines.append("model.max_position_embeddings fits: nothing longer was tried")
    lines.append("compiled: " + ", ".join(f"{n} {'fits' if ok else 'no'}" for n, ok in r.tried))
    if fit:
        lines += ["", "the largest that fits:", format_report(fit)]
    return "\n".join(lines)


def _compiled_lines(p: CompiledProgram, per: str) -> list[str]:
    """The compiler's figures for one program: memory, whether it fits, the collectives per `per` (step, call)."""
    lines = []
    if p.total_bytes is not None:
        lines += [
            f"  arguments {_gib(p.argument_bytes)}  outputs {_gib(p.output_bytes)}  aliased {_gib(p.alias_bytes)}",
            f"  temporaries      {_gib(p.temp_bytes)}",
            f"  code             {_gib(p.code_bytes)}",
            f"  total            {_gib(p.total_bytes)}",
        ]
    if p.fits is None:
        lines.append("fits: host memory (no device limit)")
    elif p.fits:
        lines.append(f"fits: yes, {_gib(p.total_bytes)} of {_gib(p.usable_bytes)} usable "
                     f"({_gib(p.hbm_bytes)} HBM), headroom {_gib(p.usable_bytes - p.total_bytes)}")
    elif p.compiler_message:
        lines.append(f"fits: NO, does not fit ({_gib(p.hbm_bytes)} HBM per device); the compiler says:")
        lines += ["  " + line for line in p.compiler_message.splitlines()]
    else:
        lines.append(f"fits: NO, does not fit: {_gib(p.total_bytes)} > {_gib(p.usable_bytes)} usable "
                     f"({_gib(p.hbm_bytes)} HBM)")
    if p.collectives:
        lines.append(f"collectives per {per} (operand bytes per device):")
        for kind in KINDS:
            c = p.collectives[kind]
            lines.append(f"  {kind:<20} {c['ops']:>4} ops  {_gib(c['bytes_per_step'])}")
        if p.collectives_unknown_trip_count:
            lines.append(f"  not totalled (loop trip count unknown): {', '.join(p.collectives_unknown_trip_count)}")
    return lines


PROGRAMS = ("train", "generate", "kernels")  # --program: what zaya-train runs, what zaya-generate runs, the kernels
GENERATE_DEFAULTS = {"batch": 1, "prompt_len": 1024, "max_len": 2048}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="zaya-compile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset (as zaya-train takes)")
    parser.add_argument("--target", required=True,
                        help="tpu:v5p-N | tpu:v5e-N | tpu:v5p:AxBxC | gpu:h100xN | gpu:h200xN | cpu:N")
    parser.add_argument("--program", default="train",
                        help=f"what to compile: {' | '.join(PROGRAMS)} (default train: the training step; generate: "
                             "zaya-generate's prefill and one decode step; kernels: the Pallas kernels at the config's shapes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value (repeatable), e.g. --set mesh.fsdp=-1")
    parser.add_argument("--margin", type=float, default=None,
                        help="fraction of HBM to leave free (default: 0 on TPU, where the compiler checks; 0.25 "
                             "on GPU, what jax's client leaves by default)")
    parser.add_argument("--memory-gib", type=float, default=None,
                        help="memory per device in GiB instead of the target's (what-if; gives a CPU target a limit; "
                             "the TPU compiler still refuses what exceeds the real HBM)")
    parser.add_argument("--batch", type=int, default=None,
                        help=f"--program generate: prompts per call (default {GENERATE_DEFAULTS['batch']})")
    parser.add_argument("--prompt-len", type=int, default=None,
                        help=f"--program generate: prompt tokens (default {GENERATE_DEFAULTS['prompt_len']})")
    parser.add_argument("--max-len", type=int, default=None,
                        help="--program generate: cache slots, prompt + generated tokens "
                             f"(default {GENERATE_DEFAULTS['max_len']})")
    parser.add_argument("--max-seq", action="store_true",
                        help="--program train: search the longest data.seq_len that fits one row per device")
    parser.add_argument("--granule", type=int, default=None,
                        help="--max-seq: search multiples of this many tokens (default 1024)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    args = parser.parse_args(argv)
    try:
        check_program_flags(args)
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
        if args.memory_gib is not None:
            if args.memory_gib <= 0:
                raise ValueError(f"--memory-gib must be > 0, got {args.memory_gib}")
            target = dataclasses.replace(target, hbm_bytes=int(args.memory_gib * GIB))
        if args.program == "kernels":
            report = compile_kernels(cfg.model, target)
            fits = all(case.compiled for case in report.cases)
            text, fields = format_kernels_report(report), {}
        elif args.program == "generate":
            settings = {k: v if getattr(args, k) is None else getattr(args, k) for k, v in GENERATE_DEFAULTS.items()}
            report = compile_generate(cfg, target, settings["batch"], settings["prompt_len"], settings["max_len"])
            fits, text, fields = report.fits, format_generate_report(report), {"fits": report.fits}
        elif args.max_seq:
            report = search_max_seq_len(cfg, target, 1024 if args.granule is None else args.granule,
                                        on_compiled=_print_progress)
            fits, text, fields = report.largest_fitting is not None, format_seq_search(report), {}
        else:
            report = compile_train_step(cfg, target)
            fits, text, fields = report.fits, format_report(report), {}
    except (ValueError, FileNotFoundError, TargetError) as e:
        print(f"zaya-compile: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({**dataclasses.asdict(report), **fields}) if args.json else text)
    return 1 if fits is False else 0


def _print_progress(r: CompileReport) -> None:
    verdict = "fits" if r.fits else "does not fit"
    print(f"zaya-compile: data.seq_len {r.seq_len}: {verdict}, total {_gib(r.total_bytes)} "
          f"({r.compile_seconds:.0f} s)", file=sys.stderr, flush=True)


def check_program_flags(args: argparse.Namespace) -> None:
    """One error for a program zaya-compile does not know, or a flag that belongs to another program."""
    if args.program not in PROGRAMS:
        raise ValueError(f"unknown --program {args.program!r}: expected one of {', '.join(PROGRAMS)}")
    generate_flags = [f"--{k.replace('_', '-')}" for k in GENERATE_DEFAULTS if getattr(args, k) is not None]
    if args.program != "generate" and generate_flags:
        raise ValueError(f"{', '.join(generate_flags)}: settings of --program generate, not of --program {args.program}")
    if args.max_seq and args.program != "train":
        raise ValueError("--max-seq searches the training step's sequence length: use it with --program train")
    if args.granule is not None and not args.max_seq:
        raise ValueError("--granule applies to --max-seq only")


if __name__ == "__main__":
    sys.exit(main())
