"""Pallas kernels for CCA (see docs/kernels.md): flash attention forward and backward, decode attention, and the
fused convolution prologue forward and backward."""

from __future__ import annotations

import jax


def compiler_params(interpret):
    """Triton settings on GPUs: the kernels use Pallas's generic primitives (refs, BlockSpecs, fori_loop), which
    the Triton lowering takes, while the Mosaic GPU lowering wants warpgroup-level code. Mosaic's defaults on TPU;
    nothing in the interpreter."""
    if interpret is not False or jax.default_backend() == "tpu":
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=4, num_stages=2)
