"""Flash attention for CCA's GQA heads in Pallas: forward, and a backward of two kernels under `jax.custom_vjp`.

    flash_attention(q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D], q_segments [B, S], kv_segments [B, T],
                    q_index [B, S], kv_index [B, T], *, block_q, block_k, interpret) -> [B, S, Hq, D]

The same function as `zaya_jax.attention.xla_attention`: query head h reads KV head h // (Hq / Hkv); a query sees a
key when both carry the same segment id and the key's index is not later than the query's; scores scaled by
1/sqrt(D), softmax in float32. Nothing of size S x T is materialised: each program holds one [block_q, D] query
tile and walks the keys in [block_k, D] tiles with the online softmax (FlashAttention-2), keeping the row
log-sum-exp for the backward.

Kernels (grids; every program works on one batch row and one head):
    forward   (B, Hq, S / block_q)    out, lse [B, Hq, S]
    dq        (B, Hq, S / block_q)    dq = sum over key tiles of dS K / sqrt(D)
    dk, dv    (B, Hkv, T / block_k)   sums over the G query heads of the group and over query tiles
with dS = P * (dP - delta), P = exp(scores - lse), dP = dO V^T, delta = rowsum(dO * O).

Tile skipping assumes what both callers pass: kv_index[b] = arange(T) and q_index[b] = start_b + arange(S). The
forward and dq kernels stop after the last key tile a query tile can see; the dk/dv kernel starts at the first
query tile that can see its key tile. Masks compare the real indices and segments, so they stay exact.

S and T need not be multiples of the tiles: inputs are padded, with segment ids no real token carries.
`interpret=True` runs the kernels in the Pallas interpreter (CPU tests); on GPU they lower through Triton, on TPU
through Mosaic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from zaya_jax.kernels import compiler_params, online_softmax

_MASKED = -1e30  # as in attention.py: finite, so fully masked padding rows stay finite
_Q_PAD, _KV_PAD = -2, -3  # segment ids of padding rows: they match nothing real and not each other


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_to(x: jax.Array, axis: int, size: int, value) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _scores(q, k, q_seg, kv_seg, q_idx, kv_idx, scale):
    """q [bq, D], k [bk, D] -> masked scaled scores [bq, bk] float32."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    allowed = (q_seg[:, None] == kv_seg[None, :]) & (kv_idx[None, :] <= q_idx[:, None])
    return jnp.where(allowed, s, _MASKED)


def _forward_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, qi_ref, ki_ref, o_ref, lse_ref, *, block_k, scale):
    q = q_ref[...]
    q_seg, q_idx = qs_ref[...], qi_ref[...]
    block_q, head_dim = q.shape
    num_k = k_ref.shape[0] // block_k
    # Key tiles after the last query's index are invisible (kv_index = arange(T)).
    last = jnp.minimum(jnp.max(q_idx) // block_k + 1, num_k)

    def body(j, carry):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        s = _scores(q, k_ref[tile, :], q_seg, ks_ref[tile], q_idx, ki_ref[tile], scale)
        return online_softmax(carry, s, v_ref[tile, :])

    init = (jnp.zeros((block_q, head_dim), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, m, l = jax.lax.fori_loop(0, last, body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, qi_ref, ki_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               block_k, scale):
    q, do = q_ref[...], do_ref[...]
    q_seg, q_idx = qs_ref[...], qi_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    num_k = k_ref.shape[0] // block_k
    last = jnp.minimum(jnp.max(q_idx) // block_k + 1, num_k)

    def body(j, dq):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[tile, :], v_ref[tile, :]
        p = jnp.exp(_scores(q, k, q_seg, ks_ref[tile], q_idx, ki_ref[tile], scale) - lse[:, None])
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        ds = p * (dp - delta[:, None])
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    dq = jax.lax.fori_loop(0, last, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, qi_ref, ki_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                block_q, scale):
    k, v = k_ref[...], v_ref[...]
    kv_seg, kv_idx = ks_ref[...], ki_ref[...]
    groups, seq_q = q_ref.shape[0], q_ref.shape[1]
    num_q = seq_q // block_q
    # Query row r has index start + r (q_index = start + arange(S)): rows before kv_idx[0] - start see no key here.
    start = qi_ref[0]
    first = jnp.clip((jnp.min(kv_idx) - start) // block_q, 0, num_q)

    def head(g, carry):
        def body(i, carry):
            dk, dv = carry
            tile = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            q, do = q_ref[g, tile, :], do_ref[g, tile, :]
            p = jnp.exp(_scores(q, k, qs_ref[tile], kv_seg, qi_ref[tile], kv_idx, scale) - lse_ref[g, tile][:, None])
            dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
            ds = p * (dp - delta_ref[g, tile][:, None])
            dk = dk + jax.lax.dot_general(ds.astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                          preferred_element_type=jnp.float32)
            return dk, dv

        return jax.lax.fori_loop(first, num_q, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _layout(q, k, v, q_segments, kv_segments, q_index, kv_index, block_q, block_k):
    """[B, S, H, D] -> padded [B, H, S', D] and padded side inputs."""
    s_pad, t_pad = _round_up(q.shape[1], block_q), _round_up(k.shape[1], block_k)
    qh = _pad_to(q.transpose(0, 2, 1, 3), 2, s_pad, 0)
    kh = _pad_to(k.transpose(0, 2, 1, 3), 2, t_pad, 0)
    vh = _pad_to(v.transpose(0, 2, 1, 3), 2, t_pad, 0)
    qs = _pad_to(q_segments.astype(jnp.int32), 1, s_pad, _Q_PAD)
    ks = _pad_to(kv_segments.astype(jnp.int32), 1, t_pad, _KV_PAD)
    # Padded query rows continue the index run (q_index = start + arange), padded keys come after every query.
    qi = jnp.concatenate([q_index, q_index[:, -1:] + 1 + jnp.arange(s_pad - q.shape[1])], axis=1).astype(jnp.int32)
    ki = jnp.concatenate([kv_index, kv_index[:, -1:] + 1 + jnp.arange(t_pad - k.shape[1])], axis=1).astype(jnp.int32)
    return qh, kh, vh, qs, ks, qi, ki


def _specs(heads_q, heads_kv, s_pad, t_pad, head_dim, block_q):
    groups = heads_q // heads_kv
    q_tile = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_all = pl.BlockSpec((None, None, t_pad, head_dim), lambda b, h, i: (b, h // groups, 0, 0))
    q_side = pl.BlockSpec((None, block_q), lambda b, h, i: (b, i))
    kv_side = pl.BlockSpec((None, t_pad), lambda b, h, i: (b, 0))
    row = pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, i))
    return q_tile, kv_all, q_side, kv_side, row


def _forward(q, k, v, q_segments, kv_segments, q_index, kv_index, block_q, block_k, interpret):
    batch, seq_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    qh, kh, vh, qs, ks, qi, ki = _layout(q, k, v, q_segments, kv_segments, q_index, kv_index, block_q, block_k)
    s_pad, t_pad = qh.shape[2], kh.shape[2]
    q_tile, kv_all, q_side, kv_side, row = _specs(heads_q, heads_kv, s_pad, t_pad, head_dim, block_q)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, block_k=block_k, scale=head_dim**-0.5),
        grid=(batch, heads_q, s_pad // block_q),
        in_specs=[q_tile, kv_all, kv_all, q_side, kv_side, q_side, kv_side],
        out_specs=[q_tile, row],
        out_shape=[jax.ShapeDtypeStruct(qh.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads_q, s_pad), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="cca_flash_forward",
    )(qh, kh, vh, qs, ks, qi, ki)
    return out[:, :, :seq_q].transpose(0, 2, 1, 3), (qh, kh, vh, qs, ks, qi, ki, out, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def flash_attention(q, k, v, q_segments, kv_segments, q_index, kv_index, block_q=128, block_k=128,
                    interpret=False):
    """See the module docstring."""
    return _forward(q, k, v, q_segments, kv_segments, q_index, kv_index, block_q, block_k, interpret)[0]


def _flash_fwd(q, k, v, q_segments, kv_segments, q_index, kv_index, block_q, block_k, interpret):
    out, residuals = _forward(q, k, v, q_segments, kv_segments, q_index, kv_index, block_q, block_k, interpret)
    return out, (residuals, q.shape[1], k.shape[1], (q_segments, kv_segments, q_index, kv_index))


def _flash_bwd(block_q, block_k, interpret, saved, d_out):
    (qh, kh, vh, qs, ks, qi, ki, out, lse), seq_q, seq_k, side = saved
    batch, heads_q, s_pad, head_dim = qh.shape
    heads_kv, t_pad = kh.shape[1], kh.shape[2]
    groups = heads_q // heads_kv
    scale = head_dim**-0.5
    do = _pad_to(d_out.transpose(0, 2, 1, 3), 2, s_pad, 0).astype(qh.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, Hq, S']
    q_tile, kv_all, q_side, kv_side, row = _specs(heads_q, heads_kv, s_pad, t_pad, head_dim, block_q)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=block_k, scale=scale),
        grid=(batch, heads_q, s_pad // block_q),
        in_specs=[q_tile, kv_all, kv_all, q_side, kv_side, q_side, kv_side, q_tile, row, row],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qh.shape, qh.dtype),
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="cca_flash_dq",
    )(qh, kh, vh, qs, ks, qi, ki, do, lse, delta)

    # dk, dv: one program per (batch, KV head, key tile), reading the G query heads of its group whole.
    group_q = pl.BlockSpec((None, groups, s_pad, head_dim), lambda b, h, j: (b, h, 0, 0))
    k_tile = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j: (b, h, j, 0))
    q_all = pl.BlockSpec((None, s_pad), lambda b, h, j: (b, 0))
    kv_tile_side = pl.BlockSpec((None, block_k), lambda b, h, j: (b, j))
    group_rows = pl.BlockSpec((None, groups, s_pad), lambda b, h, j: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, block_q=block_q, scale=scale),
        grid=(batch, heads_kv, t_pad // block_k),
        in_specs=[group_q, k_tile, k_tile, q_all, kv_tile_side, q_all, kv_tile_side, group_q, group_rows,
                  group_rows],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, kh.dtype), jax.ShapeDtypeStruct(vh.shape, vh.dtype)],
        interpret=interpret,
        compiler_params=compiler_params(interpret),
        name="cca_flash_dkv",
    )(qh, kh, vh, qs, ks, qi, ki, do, lse, delta)

    unpad = lambda x, n: x[:, :, :n].transpose(0, 2, 1, 3)  # noqa: E731
    zeros = tuple(jnp.zeros(x.shape, jax.dtypes.float0) for x in side)  # integer inputs have no cotangent
    return (unpad(dq, seq_q), unpad(dk, seq_k), unpad(dv, seq_k), *zeros)


flash_attention.defvjp(_flash_fwd, _flash_bwd)
