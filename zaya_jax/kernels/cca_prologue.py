"""The CCA prologue fused in one Pallas kernel: causal convolutions, q-k mean, QK L2-norm with temperature and
partial RoPE, from the two projections to the q and k that attention reads.

    fused_prologue(q0 [B, S, Hq*D], k0 [B, S, Hkv*D], segment_ids [B, S], cos [B, S, R], sin [B, S, R],
                   params: PrologueParams, *, block_s, interpret) -> q [B, S, Hq, D], k [B, S, Hkv, D]

The function of `zaya_jax.cca.prologue_reference` with no earlier tokens (training and full forwards; cached
decoding keeps the reference, which carries the conv history). One program per (batch row, tile of block_s
positions, KV group) reads the group's G query heads and its KV head from the packed [q0 | k0] columns, with the
K = (k_dw - 1) + (k_gr - 1) columns before the tile, once: the depthwise conv, the per-head grouped conv, the q-k
mean, the norm, the temperature and the rotation all happen on that tile in registers / VMEM, and only q and k are
written. Columns of another document (segment id) count as the zero padding a document sees at its start.

Backward: `jax.custom_vjp` whose backward is the reference's VJP in XLA, recomputed from the saved inputs.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


class PrologueParams(NamedTuple):
    w_dw: jax.Array  # [k_dw, C] depthwise taps
    b_dw: jax.Array  # [C]
    w_gr: jax.Array  # [k_gr, Hq + Hkv, D, D] grouped taps, one group per head
    b_gr: jax.Array  # [C]
    temperature: jax.Array  # [Hkv]


def _kernel(ext_ref, seg_ref, cos_ref, sin_ref, w_dw_ref, b_dw_ref, w_gr_ref, b_gr_ref, temp_ref, q_ref, k_ref, *,
            block_s, heads_q, head_dim, groups, k_dw, k_gr, rotary_dim, eps):
    g = pl.program_id(2)
    history = k_dw - 1 + k_gr - 1
    row0 = pl.program_id(1) * block_s
    d = head_dim
    q_cols = pl.ds(g * groups * d, groups * d)
    k_cols = pl.ds(heads_q * d + g * d, d)
    seg = seg_ref[pl.ds(row0 + history, block_s)]
    dtype = q_ref.dtype

    def column(shift, cols):  # P_{t - shift} for the tile, zero across a document boundary
        rows = pl.ds(row0 + history - shift, block_s)
        same = seg_ref[rows] == seg
        return jnp.where(same[:, None], ext_ref[rows, cols], 0).astype(dtype)

    def conv(cols, heads, first_head, width):
        shifted = [column(shift, cols) for shift in range(history + 1)]
        w_dw, b_dw = w_dw_ref[:, cols].astype(dtype), b_dw_ref[cols].astype(dtype)
        out = []
        for h in range(heads):
            head = slice(h * d, (h + 1) * d)
            acc = jnp.zeros((block_s, d), jnp.float32)
            for j2 in range(k_gr):
                depthwise = b_dw[head] + sum(w_dw[j1, head] * shifted[history - j1 - j2][:, head] for j1 in range(k_dw))
                acc += jnp.dot(depthwise, w_gr_ref[j2, first_head + h].astype(dtype),
                               preferred_element_type=jnp.float32).astype(dtype).astype(jnp.float32)
            out.append((acc + b_gr_ref[cols][head].astype(jnp.float32)).astype(dtype))
        return out, shifted[0]

    z_q, q0 = conv(q_cols, groups, g * groups, groups * d)
    z_k, k0 = conv(k_cols, 1, heads_q + g, d)
    q_means = [0.5 * (q0[:, h * d:(h + 1) * d] + k0) for h in range(groups)]
    k_mean = sum(q_means) / groups

    cos = cos_ref[...].astype(dtype)
    sin = sin_ref[...].astype(dtype)
    half = rotary_dim // 2

    def finish(x, out_ref, col0, scale):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        x = (x32 * (d**0.5 / jnp.maximum(norm, eps)) * scale).astype(dtype)
        x1, x2 = x[:, :half], x[:, half:rotary_dim]
        out_ref[:, col0:col0 + half] = x1 * cos[:, :half] - x2 * sin[:, :half]
        out_ref[:, col0 + half:col0 + rotary_dim] = x2 * cos[:, half:] + x1 * sin[:, half:]
        if rotary_dim < d:
            out_ref[:, col0 + rotary_dim:col0 + d] = x[:, rotary_dim:]

    for h in range(groups):
        finish(z_q[h] + q_means[h], q_ref, h * d, 1.0)
    finish(z_k[0] + k_mean, k_ref, 0, temp_ref[g].astype(jnp.float32))


def _fused_forward(q0, k0, segment_ids, cos, sin, params: PrologueParams, block_s: int, interpret):
    batch, seq, q_width = q0.shape
    kv_width = k0.shape[2]
    k_dw, channels = params.w_dw.shape
    k_gr, _, head_dim, _ = params.w_gr.shape
    heads_q, heads_kv = q_width // head_dim, kv_width // head_dim
    groups = heads_q // heads_kv
    history = k_dw - 1 + k_gr - 1
    rotary_dim = cos.shape[-1]
    padded = -(-seq // block_s) * block_s
    dtype = q0.dtype
    # K zero columns before the sequence (no earlier tokens), the sequence, and padding up to whole tiles.
    ext = jnp.pad(jnp.concatenate([q0, k0], axis=-1), ((0, 0), (history, padded - seq), (0, 0)))
    seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], history, axis=1), segment_ids,
                           jnp.full((batch, padded - seq), -1, segment_ids.dtype)], axis=1).astype(jnp.int32)
    cos_p = jnp.pad(cos, ((0, 0), (0, padded - seq), (0, 0)))
    sin_p = jnp.pad(sin, ((0, 0), (0, padded - seq), (0, 0)))
    whole = lambda *shape: pl.BlockSpec(shape, lambda b, i, g: (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(_kernel, block_s=block_s, heads_q=heads_q, head_dim=head_dim, groups=groups,
                               k_dw=k_dw, k_gr=k_gr, rotary_dim=rotary_dim, eps=float(jnp.finfo(dtype).eps))
    q, k = pl.pallas_call(
        kernel,
        grid=(batch, padded // block_s, heads_kv),
        in_specs=[
            pl.BlockSpec((None, padded + history, channels), lambda b, i, g: (b, 0, 0)),
            pl.BlockSpec((None, padded + history), lambda b, i, g: (b, 0)),
            pl.BlockSpec((None, block_s, rotary_dim), lambda b, i, g: (b, i, 0)),
            pl.BlockSpec((None, block_s, rotary_dim), lambda b, i, g: (b, i, 0)),
            whole(k_dw, channels), whole(channels), whole(*params.w_gr.shape), whole(channels), whole(heads_kv),
        ],
        out_specs=[pl.BlockSpec((None, block_s, groups * head_dim), lambda b, i, g: (b, i, g)),
                   pl.BlockSpec((None, block_s, head_dim), lambda b, i, g: (b, i, g))],
        out_shape=[jax.ShapeDtypeStruct((batch, padded, q_width), dtype),
                   jax.ShapeDtypeStruct((batch, padded, kv_width), dtype)],
        interpret=interpret,
        name="cca_prologue",
    )(ext, seg, cos_p, sin_p, *params)
    return (q[:, :seq].reshape(batch, seq, heads_q, head_dim), k[:, :seq].reshape(batch, seq, heads_kv, head_dim))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def fused_prologue(q0, k0, segment_ids, cos, sin, params, reference, block_s=64, interpret=False):
    """See the module docstring. `reference(q0, k0, segment_ids, cos, sin, params) -> (q, k)` is the XLA
    function the kernel equals; its VJP is the backward."""
    return _fused_forward(q0, k0, segment_ids, cos, sin, params, block_s, interpret)


def _fwd(q0, k0, segment_ids, cos, sin, params, reference, block_s, interpret):
    out = _fused_forward(q0, k0, segment_ids, cos, sin, params, block_s, interpret)
    return out, (q0, k0, segment_ids, cos, sin, params)


def _bwd(reference, block_s, interpret, saved, cotangents):
    q0, k0, segment_ids, cos, sin, params = saved
    _, vjp = jax.vjp(lambda q0, k0, cos, sin, params: reference(q0, k0, segment_ids, cos, sin, params),
                     q0, k0, cos, sin, params)
    dq0, dk0, dcos, dsin, dparams = vjp(cotangents)
    return dq0, dk0, jnp.zeros(segment_ids.shape, jax.dtypes.float0), dcos, dsin, dparams


fused_prologue.defvjp(_fwd, _bwd)
