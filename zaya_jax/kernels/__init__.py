"""Pallas kernels for CCA (see docs/kernels.md): flash attention forward and backward, decode attention, and the
fused convolution prologue forward and backward.

`check_tiles(config, platform)` is the one place that states which model sizes the kernels can tile on a device;
the kernels' modules, when their block shapes change, change it with them."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def target_platform() -> str:
    """The platform the kernels are being lowered for: the abstract device of the current abstract mesh when one is
    set (`jax.sharding.use_abstract_mesh`, how a CPU host lowers for a TPU it does not have), else the default
    backend."""
    device = jax.sharding.get_abstract_mesh().abstract_device
    return device.platform if device is not None else jax.default_backend()


def tile_problems(config: Any, platform: str) -> list[str]:
    """The rules `config`'s sizes (a ZayaConfig: query_heads, kv_heads, head_dim) break when the kernels are lowered
    for `platform`, one line each naming the key, its value and the rule; empty when they tile. Sequence lengths
    have no rule (every kernel pads them to its tiles), nor has the Pallas interpreter (no block-shape rules).

    gpu (Triton: every block a kernel loads or stores must hold a power-of-two number of elements): the kernels
        load [tile, head_dim] blocks, and the decode kernel a KV group's [G, head_dim] query heads (G = query_heads
        / kv_heads).
    tpu (Mosaic: a block's last two dimensions must be multiples of (8, 128) or the whole array's): the prologue
        writes the [block_s, head_dim] k columns of one KV head and the [block_s, G * head_dim] q columns of its
        group out of [S, kv_heads * head_dim] and [S, query_heads * head_dim]: whole only when kv_heads is 1.
    """
    heads_q, heads_kv, head_dim = config.query_heads, config.kv_heads, config.head_dim
    groups = heads_q // heads_kv
    power_of_2 = lambda n: n > 0 and n & (n - 1) == 0  # noqa: E731
    problems = []
    if platform == "gpu":
        if not power_of_2(head_dim):
            problems.append(f"head_dim = {head_dim}: the Pallas kernels on a GPU (Triton) need a power of two "
                            "(they load [tile, head_dim] blocks)")
        if not power_of_2(groups):
            problems.append(f"query_heads / kv_heads = {heads_q} / {heads_kv} = {groups}: the Pallas decode kernel "
                            "on a GPU (Triton) needs a power of two (it loads a KV group's [G, head_dim] query heads "
                            "as one block)")
    elif platform == "tpu" and heads_kv > 1 and head_dim % 128:
        problems.append(f"head_dim = {head_dim}: the Pallas prologue kernel on a TPU (Mosaic) needs a multiple of 128 "
                        f"when kv_heads > 1 (kv_heads = {heads_kv}): it writes each KV head's [block_s, head_dim] "
                        "columns as one block, whose width must be a multiple of 128 or the whole row")
    return problems


def check_tiles(config: Any, platform: str | None = None) -> None:
    """Raises one ValueError listing `tile_problems` for `platform` (default: the one being lowered for) when
    `config.attention_impl` is "pallas"; nothing to check for other implementations."""
    if config.attention_impl != "pallas":
        return
    platform = platform or target_platform()
    problems = tile_problems(config, platform)
    if problems:
        raise ValueError(f"attention_impl 'pallas' on {platform}: " + "; ".join(problems))


# Per-kernel Mosaic scoped-VMEM limits (bytes, by pallas_call name) set by `mosaic_vmem_limits`; a kernel not
# named gets the compiler's default limit.
_VMEM_LIMITS: contextvars.ContextVar[Mapping[str, int]] = contextvars.ContextVar("vmem_limits", default={})


@contextlib.contextmanager
def mosaic_vmem_limits(limits: Mapping[str, int]) -> Iterator[None]:
    """Kernels traced inside this block ask Mosaic for these scoped-VMEM limits ({pallas_call name: bytes});
    train/compile_kernels.py uses it to find the VMEM each kernel needs (Mosaic refuses a kernel above its limit)."""
    token = _VMEM_LIMITS.set(dict(limits))
    try:
        yield
    finally:
        _VMEM_LIMITS.reset(token)


# The prologue backward holds many [block_s, D] tiles at once: with 4 warps ptxas ran out of registers for it on the
# H100 (docs/kernels.md); 8 warps give each thread half the tile elements.
_TRITON_WARPS = {"cca_prologue_backward": 8}


def compiler_params(interpret, grid_rank: int, name: str, sequential: int = 0):
    """Mosaic settings on TPU: the last `sequential` grid axes "arbitrary" (reductions whose programs run in order
    on one core, accumulating in VMEM scratch), the others "parallel" (each program writes only its own output
    blocks, so Mosaic may split them across TensorCores). Triton settings elsewhere: the kernels use Pallas's
    generic primitives (refs, BlockSpecs, fori_loop), which the Triton lowering takes, while the Mosaic GPU lowering
    wants warpgroup-level code; Triton runs every program independently, so a kernel with sequential axes is refused
    there (ValueError). Nothing in the interpreter, which runs the grid in order. `name` is the pallas_call's, for
    `mosaic_vmem_limits`."""
    if interpret is not False:
        return None
    platform = target_platform()
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pltpu.CompilerParams(
            dimension_semantics=("parallel",) * (grid_rank - sequential) + ("arbitrary",) * sequential,
            vmem_limit_bytes=_VMEM_LIMITS.get().get(name))
    if sequential:
        raise ValueError(f"Pallas kernel {name!r} has {sequential} sequential grid axes (a reduction over programs "
                         f"run in order), which only Mosaic (TPU) runs; this lowers for {platform}")
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=_TRITON_WARPS.get(name, 4), num_stages=2)


def scalars_spec(interpret) -> pl.BlockSpec:
    """The spec of a small 32-bit array that the kernel reads element by element (`ref[i]`: a start slot, a
    temperature): scalar memory on TPU (and in the TPU interpreter the tests use), where vector memory cannot feed
    loop bounds; one whole block elsewhere."""
    if interpret is not False or target_platform() == "tpu":
        from jax.experimental.pallas import tpu as pltpu

        return pl.BlockSpec(memory_space=pltpu.SMEM)
    return pl.BlockSpec()


def online_softmax(carry, scores, v):
    """One key tile of the online softmax (FlashAttention-2), inside a kernel.

    carry = (acc [rows, D] float32, row max m [rows, 1], row sum l [rows, 1]); scores [rows, tile] float32 (masked
    entries at a large negative value); v [tile, D]. Start from (0, -inf, 0); the output is acc / l and the row
    log-sum-exp m + log(l). Row statistics stay [rows, 1] columns: the layout Mosaic broadcasts along lanes."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(scores, axis=1, keepdims=True))
    p = jnp.exp(scores - m_new)
    correction = jnp.exp(m - m_new)
    acc = acc * correction + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l * correction + jnp.sum(p, axis=1, keepdims=True)


def softmax_init(rows: int, head_dim: int):
    """The online softmax's starting carry for `rows` query rows."""
    return (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), -jnp.inf, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
