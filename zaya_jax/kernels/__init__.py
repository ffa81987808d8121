"""Pallas kernels for CCA (see docs/kernels.md): flash attention forward and backward, decode attention, and the
fused convolution prologue forward and backward."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def compiler_params(interpret):
    """Triton settings on GPUs: the kernels use Pallas's generic primitives (refs, BlockSpecs, fori_loop), which
    the Triton lowering takes, while the Mosaic GPU lowering wants warpgroup-level code. Mosaic's defaults on TPU;
    nothing in the interpreter."""
    if interpret is not False or jax.default_backend() == "tpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)


def online_softmax(carry, scores, v):
    """One key tile of the online softmax (FlashAttention-2), inside a kernel.

    carry = (acc [rows, D] float32, row max m [rows], row sum l [rows]); scores [rows, tile] float32 (masked
    entries at a large negative value); v [tile, D]. Start from (0, -inf, 0); the output is acc / l and the row
    log-sum-exp m + log(l)."""
    acc, m, l = carry
    m_new = jnp.maximum(m, jnp.max(scores, axis=1))
    p = jnp.exp(scores - m_new[:, None])
    correction = jnp.exp(m - m_new)
    acc = acc * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return acc, m_new, l * correction + jnp.sum(p, axis=1)
