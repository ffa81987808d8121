"""zaya-compile --program kernels: compile the Pallas kernels for a TPU or GPU this machine does not have.

    zaya-compile --config configs/zaya1-8b.yaml --program kernels --target tpu:v5p-8 | gpu:h100x8 [--json]

Each kernel (flash attention forward and backward, the fused CCA prologue forward and backward, decode attention) is
compiled -- Mosaic for TPU targets, Triton for GPU targets -- at the config's shapes (query / KV heads, head dim,
conv kernels, compute dtype; one batch row) for the sequence lengths in SEQ_LENS and the cache lengths in
CACHE_LENS, on one of the target's compile-only devices (train/targets.py). Reported per case:

    compiled, or the compiler's error (one line)          compiling with the compiler's default limits
    compile time                                          tracing, lowering and compiling, seconds
    TPU: VMEM each kernel needs                           the smallest `vmem_limit_bytes` (pltpu.CompilerParams)
                                                          Mosaic accepts, to VMEM_STEP bytes: from a 1-byte limit,
                                                          retried at the size each refusal names ("Scoped allocation
                                                          with size 4.04M") until one compiles, then bisection
    TPU: operands resident in VMEM                        the kernel's operands and results XLA placed whole in
                                                          VMEM (memory space S(1) in the compiled module): small
                                                          programs get them, and then need less scoped VMEM
    TPU: the BlockSpecs' bytes                            one copy of every VMEM block a program holds + scratch,
                                                          from the traced pallas_call: a lower bound of scoped +
                                                          resident;
                                                          and twice the blocks + scratch, the double-buffered
                                                          estimate (Mosaic pipelines each block through two
                                                          buffers, less for some small or fixed blocks)

Exit status: 0 when every case compiled, 1 otherwise, 2 bad input or a compiler that is not installed here.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from train.targets import Target, TargetError, target_devices
from zaya_jax.config import ZayaConfig
from zaya_jax.kernels import mosaic_vmem_limits
from zaya_jax.kernels.cca_prologue import PrologueParams, fused_prologue
from zaya_jax.kernels.decode_attention import decode_attention
from zaya_jax.kernels.flash_attention import flash_attention

SEQ_LENS = (4096, 8192, 32768)  # flash attention and the prologue (one row of S tokens)
CACHE_LENS = (4096, 32768)  # decode attention: one new token against a cache of T slots
# The tiles the model runs on a device (zaya_jax/attention.py: 128 x 128 flash tiles and 128-key decode tiles;
# zaya_jax/cca.py: prologue tiles of 64 positions).
FLASH_BLOCK, DECODE_BLOCK, PROLOGUE_BLOCK = 128, 128, 64
VMEM_STEP = 1024  # bisection resolution of the VMEM figures, bytes
_SIZE = re.compile(r"Scoped allocation with size ([\d.]+)([KMG]?)B?")
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


@dataclasses.dataclass
class VmemFigure:
    kernel: str  # the pallas_call's name
    block_bytes: int  # one copy of the program's VMEM blocks + scratch (BlockSpecs): a lower bound of the need
    double_buffered_bytes: int  # two copies of the blocks + scratch: the arithmetic estimate
    needed_bytes: int | None = None  # smallest vmem_limit_bytes that compiles (None: none does)
    compiler_size: str = ""  # the size the compiler named in its last refusal, e.g. "4.04M"
    error: str = ""  # why no limit compiles (e.g. above the core's VMEM), one line
    # Bytes of the kernel's operands and results that XLA placed whole in VMEM (layout memory space S(1) in the
    # compiled module, at the default limits); a kernel reads those directly, with no window in its scoped VMEM.
    resident_bytes: int | None = None


@dataclasses.dataclass
class KernelCase:
    name: str  # e.g. "flash backward"
    length: int  # S (sequence) or T (cache slots)
    compiled: bool = False
    error: str = ""  # the compiler's refusal at its default limits, one line
    compile_seconds: float = 0.0
    vmem: list[VmemFigure] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class KernelsReport:
    target: str
    platform: str
    dtype: str
    heads: str  # "8 query / 2 KV heads of 128"
    vmem_capacity_bytes: int | None  # per TensorCore (jax's TPU table); None on GPUs
    cases: list[KernelCase]


def _summed(fn: Callable) -> Callable:
    """fn's outputs summed to one float32 scalar: the loss whose gradient runs a kernel's backward."""
    return lambda *a: sum(jnp.sum(x.astype(jnp.float32)) for x in jax.tree.leaves(fn(*a)))


def kernel_cases(model: ZayaConfig, seq_lens: Sequence[int], cache_lens: Sequence[int]
                 ) -> list[tuple[str, int, tuple[str, ...], Callable, tuple]]:
    """(case name, length, pallas_call names it measures, function, abstract arguments) at the config's shapes."""
    s, dtype, b = jax.ShapeDtypeStruct, jnp.dtype(model.dtype), 1
    hq, hkv, d = model.query_heads, model.kv_heads, model.head_dim
    flash = lambda q, k, v, seg: flash_attention(q, k, v, seg, seg, 0, FLASH_BLOCK, FLASH_BLOCK, False)  # noqa: E731
    prologue = lambda *a: fused_prologue(*a, PROLOGUE_BLOCK, False)  # noqa: E731
    c = model.conv_channels
    params = PrologueParams(s((model.conv_kernel_depthwise, c), dtype), s((c,), dtype),
                            s((model.conv_kernel_grouped, hq + hkv, d, d), dtype), s((c,), dtype), s((hkv,), dtype))
    cases = []
    for n in seq_lens:
        attention = (s((b, n, hq, d), dtype), s((b, n, hkv, d), dtype), s((b, n, hkv, d), dtype),
                     s((b, n), jnp.int32))
        rope = s((b, n, model.rotary_dim), jnp.float32)
        prologue_args = (s((b, n, hq * d), dtype), s((b, n, hkv * d), dtype), s((b, n), jnp.int32), rope, rope,
                         params)
        cases += [
            ("flash forward", n, ("cca_flash_forward",), flash, attention),
            # The gradient's program runs the forward kernel too (its residuals): measured with the two backward ones.
            ("flash backward", n, ("cca_flash_forward", "cca_flash_dq", "cca_flash_dkv"),
             jax.grad(_summed(flash), argnums=(0, 1, 2)), attention),
            ("prologue forward", n, ("cca_prologue",), prologue, prologue_args),
            ("prologue backward", n, ("cca_prologue_backward",),
             jax.grad(_summed(prologue), argnums=(0, 1, 5)), prologue_args),
        ]
    for n in cache_lens:
        decode = (s((b, hq, d), dtype), s((b, hkv, n, d), dtype), s((b, hkv, n, d), dtype), s((b, n), jnp.int32),
                  s((), jnp.int32))
        cases.append(("decode", n, ("cca_decode_attention",),
                      lambda *a: decode_attention(*a, block_k=DECODE_BLOCK), decode))
    return cases


def _one_line(error: Exception) -> str:
    """The compiler's message in one line: for a scoped-VMEM refusal the kernel, size and limit it names; else the
    first line naming the problem (XLA's messages carry a long HLO dump)."""
    text = str(error)
    scoped = re.search(r"Scoped allocation with size \S+ and limit \S+", text)
    if scoped:
        kernel = re.search(r"allocating on stack for %([\w.]+)", text)
        return f"{kernel.group(1) if kernel else 'a kernel'}: {scoped.group(0)} (scoped VMEM)"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if any(key in line for key in ("failed to compile", "Ran out of memory", "exceeds", "RESOURCE_EXHAUSTED")):
            return line[:300]
    return (lines[0] if lines else type(error).__name__)[:300]


def _compile(fn: Callable, args: Sequence, mesh: Mesh, limits: dict[str, int]) -> Exception | None:
    """Traces, lowers and compiles fn(*args) on the mesh's one device under these VMEM limits; the compiler's
    error, or None."""
    result = _compiled(fn, args, mesh, limits)
    return result if isinstance(result, Exception) else None


def _compiled(fn: Callable, args: Sequence, mesh: Mesh, limits: dict[str, int]):
    """The compiled program, or the compiler's error."""
    replicated = NamedSharding(mesh, PartitionSpec())
    placed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), args)
    jax.clear_caches()  # the limits are read while tracing, which jit caches: trace afresh
    try:
        # The default matmul precision, as a run traces the kernels (the suite's "highest", a CPU setting, makes
        # Mosaic refuse bfloat16 dots: "Bad lhs type").
        with jax.set_mesh(mesh), mosaic_vmem_limits(limits), jax.default_matmul_precision("default"):
            return jax.jit(fn).lower(*placed).compile()
    except Exception as e:  # noqa: BLE001  the compiler's refusal is the result (XLA's and Mosaic's error types)
        return e


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8,
             "s64": 8}


def resident_bytes(hlo: str, kernel: str) -> int | None:
    """Bytes of `kernel`'s operands and results placed in VMEM (layouts with memory space S(1)) in compiled HLO
    text, unpadded; None when the kernel's custom call is not found."""
    types = {m.group(1): m.group(2) for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) [\w\-]+\(", hlo, re.M)}
    in_vmem = lambda text: sum(  # noqa: E731
        _ITEMSIZE.get(m.group(1), 4) * math.prod(int(x) for x in m.group(2).split(",") if x)
        for m in re.finditer(r"(\w+)\[([\d,]*)\]\{[^}]*S\(1\)[^}]*\}", text))
    for line in hlo.splitlines():
        if 'custom_call_target="tpu_custom_call"' in line and re.search(rf"{kernel}\W", line.split("op_name=")[-1]):
            name = re.match(r"\s*(?:ROOT )?%([\w.\-]+) =", line).group(1)
            operands = re.search(r"custom-call\((.*?)\), custom_call_target", line).group(1)
            return in_vmem(types[name]) + sum(in_vmem(types.get(op, "")) for op in re.findall(r"%([\w.\-]+)", operands))
    return None


def block_bytes(fn: Callable, args: Sequence, mesh: Mesh) -> dict[str, tuple[int, int]]:
    """{pallas_call name: (its VMEM blocks, its scratch) in bytes}, from the BlockSpecs of the traced program (one
    copy of each block a program holds in VMEM; scalar-memory blocks left out)."""
    with jax.set_mesh(mesh), jax.default_matmul_precision("default"):
        jaxpr = jax.make_jaxpr(fn)(*args)
    found: dict[str, tuple[int, int]] = {}

    def nbytes(aval) -> int:
        return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                mapping = eqn.params["grid_mapping"]
                blocks = sum(nbytes(m.transformed_block_aval) for m in mapping.block_mappings
                             if "smem" not in str(m.transformed_block_aval.memory_space).lower())
                found[eqn.params["name"]] = blocks, sum(nbytes(a) for a in mapping.scratch_avals)
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        walk(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        walk(sub)

    walk(jaxpr.jaxpr)
    return found


def vmem_needed(fn: Callable, args: Sequence, mesh: Mesh, kernel: str, capacity: int) -> VmemFigure:
    """The smallest scoped-VMEM limit (to VMEM_STEP bytes) under which Mosaic compiles `kernel`, the other kernels
    of the program at the core's whole VMEM (see the module docstring)."""
    blocks = block_bytes(fn, args, mesh)
    others = {name: capacity for name in blocks}
    held, scratch = blocks[kernel]
    figure = VmemFigure(kernel, held + scratch, 2 * held + scratch)

    def refusal(limit: int) -> Exception | None:
        return _compile(fn, args, mesh, {**others, kernel: limit})

    # Climb: each refusal names the allocation that did not fit under its limit (a tighter limit can make Mosaic
    # name a smaller one), so retry at that size until one compiles; then bisect between the last refusal and it.
    lo, limit = 0, 1
    while (error := refusal(limit)) is not None:
        match = _SIZE.search(str(error))
        if match is None:  # e.g. more than the core's VMEM
            figure.error = _one_line(error)
            return figure
        figure.compiler_size = match.group(1) + match.group(2)
        # The size is printed to 2 decimals of its unit: round half a unit of the last decimal up.
        size = (float(match.group(1)) + 0.005) * _UNITS[match.group(2)]
        lo, limit = limit, max(-(-int(size) // VMEM_STEP) * VMEM_STEP, 2 * limit)
        if lo >= capacity:
            figure.error = f"needs more than the core's {capacity} bytes: {_one_line(error)}"
            return figure
    hi = limit
    near = hi - 16 * VMEM_STEP  # the named size is usually within a few KiB: narrow the bisection when it is
    if near > lo and refusal(near) is not None:
        lo = near
    while hi - lo > VMEM_STEP:
        mid = (lo + hi) // 2 // VMEM_STEP * VMEM_STEP
        if mid <= lo:
            break
        if refusal(mid) is None:
            hi = mid
        else:
            lo = mid
    figure.needed_bytes = hi
    return figure


def kernel_mesh(target: Target) -> Mesh:
    """A mesh of one of the target's compile-only devices: the kernels are per-device programs."""
    return Mesh(np.asarray(target_devices(target)[:1]), ("kernel",))


def vmem_capacity(device) -> int:
    """VMEM per TensorCore of a TPU device's chip, from jax's TPU table (v5e 128 MiB, v5p 64 MiB)."""
    from jax._src.pallas.mosaic import tpu_info

    return tpu_info.get_tpu_info_for_chip(tpu_info.chip_version_from_device_kind(device.device_kind),
                                          1).vmem_capacity_bytes


def compile_kernels(model: ZayaConfig, target: Target, *, seq_lens: Sequence[int] = SEQ_LENS,
                    cache_lens: Sequence[int] = CACHE_LENS, only: Sequence[str] | None = None,
                    measure_vmem: bool = True, progress: Callable[[KernelCase], None] | None = None) -> KernelsReport:
    """Compiles every kernel case (those named in `only`, if given) for `target`; see the module docstring.
    `progress` is called with each case as it is done."""
    if target.platform not in ("tpu", "cuda"):
        raise TargetError(f"{target.name}: --program kernels compiles for TPU and GPU targets (Mosaic, Triton); on "
                          "CPUs the kernels run only in the Pallas interpreter")
    mesh = kernel_mesh(target)
    capacity = vmem_capacity(mesh.devices.flat[0]) if target.platform == "tpu" else None
    report = KernelsReport(target.name, target.platform, model.dtype,
                           f"{model.query_heads} query / {model.kv_heads} KV heads of {model.head_dim}", capacity, [])
    for name, length, kernels, fn, args in kernel_cases(model, seq_lens, cache_lens):
        if only is not None and name not in only:
            continue
        case = KernelCase(name, length)
        start = time.perf_counter()
        compiled = _compiled(fn, args, mesh, {})
        case.compile_seconds = time.perf_counter() - start
        case.compiled = not isinstance(compiled, Exception)
        case.error = "" if case.compiled else _one_line(compiled)
        if target.platform == "tpu" and measure_vmem:
            case.vmem = [vmem_needed(fn, args, mesh, kernel, capacity) for kernel in kernels]
            for figure in case.vmem if case.compiled else ():
                figure.resident_bytes = resident_bytes(compiled.as_text(), figure.kernel)
        report.cases.append(case)
        if progress is not None:
            progress(case)
    return report


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 1024**2:.2f} MiB"


def format_kernels_report(r: KernelsReport) -> str:
    lines = [f"target: {r.target} ({r.platform})  {r.dtype}, {r.heads}, batch 1"]
    if r.vmem_capacity_bytes is not None:
        lines.append(f"VMEM per TensorCore: {_mib(r.vmem_capacity_bytes)}")
    for c in r.cases:
        status = "compiled" if c.compiled else f"FAILED: {c.error}"
        lines.append(f"{c.name:<18} {'T' if c.name == 'decode' else 'S'}={c.length:<6} {status}  "
                     f"({c.compile_seconds:.1f} s)")
        for v in c.vmem:
            needs = _mib(v.needed_bytes) if v.needed_bytes is not None else f"none compiles: {v.error}"
            lines.append(f"    {v.kernel:<22} scoped VMEM needed {needs}; operands resident in VMEM "
                         f"{_mib(v.resident_bytes)}  (compiler's last size: {v.compiler_size or '-'}; BlockSpecs: "
                         f"{_mib(v.block_bytes)}, x2 {_mib(v.double_buffered_bytes)})")
    return "\n".join(lines)
