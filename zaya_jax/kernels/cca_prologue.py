"""The CCA prologue fused in one Pallas kernel: causal convolutions, q-k mean, QK L2-norm with temperature and
partial RoPE, from the two projections to the q and k that attention reads.

    fused_prologue(q0 [B, S, Hq*D], k0 [B, S, Hkv*D], segment_ids [B, S], cos [B, S, R], sin [B, S, R],
                   params: PrologueParams, *, block_s, interpret) -> q [B, S, Hq, D], k [B, S, Hkv, D]

The function of `zaya_jax.cca.prologue_reference` with no earlier tokens (training and full forwards). Calls of more
than one token with a conv history (context-parallel chunks, a prefill against a cache) run this kernel through
`zaya_jax.cca.fused_prologue_after`, which puts the history rows in front; one-token decoding keeps the reference.
One program per (batch row, tile of block_s positions, KV group) reads the group's G query heads and its KV head
from the packed [q0 | k0] columns, with the K = (k_dw - 1) + (k_gr - 1) columns before the tile, once: the depthwise
conv, the per-head grouped conv, the q-k mean, the norm, the temperature and the rotation all happen on that tile in
registers / VMEM, and only q and k are written. Columns of another document (segment id) count as the zero
padding a document sees at its start.

Backward (`jax.custom_vjp`): a second kernel with the same grid recomputes the tile's pre-norm q and k from the
saved inputs and goes back through RoPE, the norm and temperature, the q-k mean and the grouped conv, writing the
gradients of the depthwise outputs, the q-k mean's direct gradients of q0 and k0, and per-tile partial sums of the
grouped weights, biases and temperature; XLA sums the partials and applies the depthwise conv's transpose (an
elementwise stencil over the K + 1 shifts, masked by document). cos and sin get zero gradients: they come from
integer positions.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from zaya_jax.kernels import compiler_params, scalars_spec


class PrologueParams(NamedTuple):
    w_dw: jax.Array  # [k_dw, C] depthwise taps
    b_dw: jax.Array  # [C]
    w_gr: jax.Array  # [k_gr, Hq + Hkv, D, D] grouped taps, one group per head
    b_gr: jax.Array  # [C]
    temperature: jax.Array  # [Hkv]


def _shifted(cur_ref, prev_ref, same_ref, col, shift, *, block_s, head_dim, dtype):
    """Rows t - shift of the tile for one head's columns [col, col + D): [bs, D] in dtype, zero where row t - shift
    is another document or before the sequence (same_ref[shift] == 0). Rows before the tile come from the previous
    tile's block; the shift is a 0/1 matrix product (exact: one nonzero per row, float32 accumulation), the one
    row shift both Mosaic and Triton compile (an unaligned slice is refused by Mosaic, value slicing by Triton)."""
    cols = pl.ds(col, head_dim)
    cur = cur_ref[:, cols].astype(dtype)
    if shift:
        t = jax.lax.broadcasted_iota(jnp.int32, (block_s, block_s), 0)
        r = jax.lax.broadcasted_iota(jnp.int32, (block_s, block_s), 1)
        precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
        pick = lambda rows, x: jnp.dot(jnp.where(rows, 1.0, 0.0).astype(dtype), x,  # noqa: E731
                                       preferred_element_type=jnp.float32, precision=precision)
        cur = (pick(r == t - shift, cur) + pick(r == t - shift + block_s, prev_ref[:, cols].astype(dtype)))
    return jnp.where(same_ref[shift] != 0, cur, 0).astype(dtype)


def _group_tile(q_ref, q_prev_ref, k_ref, k_prev_ref, same_ref, w_dw_ref, b_dw_ref, w_gr_ref, b_gr_ref, *, block_s,
                heads_q, head_dim, groups, k_dw, k_gr, dtype):
    """The group's pre-norm q and k on this tile, recomputed from the group's q0 / k0 columns (forward and
    backward).

    -> (u [G + 1] of [bs, D] in dtype (the G query heads, then the KV head), depthwise[j2] [G + 1] of [bs, D],
        the group's weights w_gr[j2][G + 1] of [D, D]). Every head's columns are loaded from the refs rather than
    sliced out of a loaded value, which the Triton lowering does not support."""
    g = pl.program_id(2)
    history = k_dw - 1 + k_gr - 1
    d = head_dim
    # (tile refs, first column in the block, first column in [q0 | k0] (the conv parameters), head index)
    heads = [(q_ref, q_prev_ref, h * d, pl.multiple_of(g * groups * d + h * d, d), g * groups + h)
             for h in range(groups)]
    heads.append((k_ref, k_prev_ref, 0, pl.multiple_of(heads_q * d + g * d, d), heads_q + g))

    u, depthwise, weights, p0 = [], [[] for _ in range(k_gr)], [[] for _ in range(k_gr)], []
    for cur_ref, prev_ref, col, param_col, head in heads:
        shifted = [_shifted(cur_ref, prev_ref, same_ref, col, shift, block_s=block_s, head_dim=d, dtype=dtype)
                   for shift in range(history + 1)]  # P_{t - shift}, zero across a document boundary
        cols = pl.ds(param_col, d)
        b_dw = b_dw_ref[:, cols].astype(jnp.float32)  # [1, D]
        acc = jnp.zeros((block_s, d), jnp.float32)
        for j2 in range(k_gr):
            # Elementwise math in float32 (the Triton lowering has no bf16 arithmetic), then the compute dtype.
            dw = (b_dw + sum(w_dw_ref[pl.ds(j1, 1), cols].astype(jnp.float32) * shifted[history - j1 - j2].astype(jnp.float32)
                             for j1 in range(k_dw))).astype(dtype)
            w = w_gr_ref[j2, head].astype(dtype)
            depthwise[j2].append(dw)
            weights[j2].append(w)
            # Products in the compute dtype, taps summed in float32 (as the reference).
            acc += jnp.dot(dw, w, preferred_element_type=jnp.float32).astype(dtype).astype(jnp.float32)
        u.append((acc + b_gr_ref[:, cols].astype(jnp.float32)).astype(dtype))
        p0.append(shifted[0])
    # Arithmetic in float32, rounded to the compute dtype where the reference rounds.
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    q_means = [(0.5 * (f32(p0[h]) + f32(p0[groups]))).astype(dtype) for h in range(groups)]
    k_mean = (sum(f32(m) for m in q_means) / groups).astype(dtype)
    u_q = [(f32(u[h]) + f32(q_means[h])).astype(dtype) for h in range(groups)]
    return u_q + [(f32(u[groups]) + f32(k_mean)).astype(dtype)], depthwise, weights


def _rotate(x, rotate_ref):
    """x @ R: rotate-half on the rotary dims as a signed permutation matrix (exact; no value slicing)."""
    # Exact in bf16 (one +-1 per column, float32 accumulation); float32 asks for full precision (not tf32).
    precision = jax.lax.Precision.HIGHEST if x.dtype == jnp.float32 else None
    return jnp.dot(x, rotate_ref[...].astype(x.dtype), preferred_element_type=jnp.float32, precision=precision)


def _forward_kernel(q0_ref, q0_prev_ref, k0_ref, k0_prev_ref, same_ref, cos_ref, sin_ref, rotate_ref, w_dw_ref,
                    b_dw_ref, w_gr_ref, b_gr_ref, temp_ref, q_ref, k_ref, *, eps, **dims):
    d, groups = dims["head_dim"], dims["groups"]
    dtype = q_ref.dtype
    u, _, _ = _group_tile(q0_ref, q0_prev_ref, k0_ref, k0_prev_ref, same_ref, w_dw_ref, b_dw_ref, w_gr_ref,
                          b_gr_ref, dtype=dtype, **dims)
    # cos / sin are [bs, D]: 1 / 0 past the rotary dims, so RoPE is x * cos + (x R) * sin over the whole head
    # (rounded to the compute dtype as the reference rounds them).
    cos = cos_ref[...].astype(dtype).astype(jnp.float32)
    sin = sin_ref[...].astype(dtype).astype(jnp.float32)

    def finish(x, scale):
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        x = (x32 * (d**0.5 / jnp.maximum(norm, eps)) * scale).astype(dtype)
        return (x.astype(jnp.float32) * cos + _rotate(x, rotate_ref) * sin).astype(dtype)

    for h in range(groups):
        q_ref[:, h * d:(h + 1) * d] = finish(u[h], 1.0)
    k_ref[...] = finish(u[groups], temp_ref[pl.program_id(2)])


def _backward_kernel(q0_ref, q0_prev_ref, k0_ref, k0_prev_ref, same_ref, cos_ref, sin_ref, rotate_ref, w_dw_ref,
                     b_dw_ref, w_gr_ref, b_gr_ref, temp_ref, dq_ref, dk_ref, d_dw_q_ref, d_dw_k_ref, direct_q_ref, direct_k_ref, dw_q_ref, dw_k_ref, db_q_ref,
                     db_k_ref, dtemp_ref, *, eps, **dims):
    """Per tile: back through RoPE, the norm and temperature, the q-k mean and the grouped conv. Writes the
    gradients of the depthwise outputs (the depthwise conv's transpose is an elementwise stencil, left to XLA),
    the q-k mean's direct gradients of q0 / k0, this tile's partial sums of the grouped weights and biases, and
    the temperature's gradient per row."""
    d, groups, k_gr = dims["head_dim"], dims["groups"], dims["k_gr"]
    dtype = q0_ref.dtype
    u, depthwise, weights = _group_tile(q0_ref, q0_prev_ref, k0_ref, k0_prev_ref, same_ref, w_dw_ref, b_dw_ref,
                                        w_gr_ref, b_gr_ref, dtype=dtype, **dims)
    cos, sin = cos_ref[...].astype(jnp.float32), sin_ref[...].astype(jnp.float32)
    temperature = temp_ref[pl.program_id(2)]

    def back(x, d_out, scale):
        """d(out)/d(u) for out = RoPE(sqrt(D) * scale * u / max(|u|, eps)) -> (du, per-row d(out) . out / scale
        [bs, 1])."""
        do = d_out.astype(jnp.float32)
        # out = n cos + (n R) sin  ->  dn = do cos + (do sin) R^T
        dn = do * cos + jax.lax.dot_general(do * sin, rotate_ref[...].astype(jnp.float32), (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)
        x32 = x.astype(jnp.float32)
        r = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        unit = x32 / jnp.maximum(r, eps)
        c = d**0.5 * scale
        du = jnp.where(r > eps, (c / jnp.maximum(r, eps)) * (dn - unit * jnp.sum(unit * dn, axis=-1, keepdims=True)),
                       (c / eps) * dn)
        return du, jnp.sum(dn * unit, axis=-1, keepdims=True) * d**0.5

    du = [back(u[h], dq_ref[:, h * d:(h + 1) * d], 1.0)[0] for h in range(groups)]
    du_k, dtemp = back(u[groups], dk_ref[...], temperature)
    du.append(du_k)
    dtemp_ref[...] = dtemp
    d_mean = [du[h] + du_k / groups for h in range(groups)]  # k_mean = mean over the group's q means
    for h in range(groups):
        direct_q_ref[:, h * d:(h + 1) * d] = 0.5 * d_mean[h]
    direct_k_ref[...] = 0.5 * sum(d_mean)
    for h in range(groups + 1):
        dz = du[h]
        q_head = h < groups
        bias_ref, col = (db_q_ref, h * d) if q_head else (db_k_ref, 0)
        bias_ref[:, col:col + d] = jnp.sum(dz, axis=0, keepdims=True)
        for j2 in range(k_gr):
            w_ref, d_dw_ref = (dw_q_ref, d_dw_q_ref) if q_head else (dw_k_ref, d_dw_k_ref)
            w_ref[j2, h if q_head else 0] = jax.lax.dot_general(
                depthwise[j2][h].astype(jnp.float32), dz, (((0,), (0,)), ((), ())),
                preferred_element_type=jnp.float32)
            d_dw_ref[:, j2, col:col + d] = jax.lax.dot_general(
                dz, weights[j2][h].astype(jnp.float32), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


class _Layout(NamedTuple):
    """The padded kernel inputs and the static sizes, shared by the forward and backward calls."""

    q0: jax.Array  # [B, S', Hq * D]: the sequence padded to whole tiles
    k0: jax.Array  # [B, S', Hkv * D]
    same: jax.Array  # [B, K + 1, S', 1] int32: 1 where row t - shift is in row t's document (shift = axis 1)
    cos: jax.Array  # [B, S', D] float32 (1 past the rotary dims)
    sin: jax.Array  # [B, S', D] float32 (0 past the rotary dims)
    rotate: jax.Array  # [D, D]: x @ rotate = rotate_half(x) on the rotary dims, 0 elsewhere
    dims: dict
    seq: int
    padded: int


def _history_padded(q0, k0, segment_ids, history: int) -> tuple[jax.Array, jax.Array]:
    """[q0 | k0] with `history` zero rows before the sequence [B, K + S, C], and the segment ids over the same rows
    [B, K + S] (the history rows carry the first token's id: they are the zero padding a document starts with)."""
    packed = jnp.pad(jnp.concatenate([q0, k0], axis=-1), ((0, 0), (history, 0), (0, 0)))
    seg = jnp.concatenate([jnp.repeat(segment_ids[:, :1], history, axis=1), segment_ids], axis=1)
    return packed, seg.astype(jnp.int32)


def _layout(q0, k0, segment_ids, cos, sin, params: PrologueParams, block_s: int) -> _Layout:
    batch, seq, q_width = q0.shape
    k_dw, _ = params.w_dw.shape
    k_gr, _, head_dim, _ = params.w_gr.shape
    heads_q, heads_kv = q_width // head_dim, k0.shape[2] // head_dim
    history = k_dw - 1 + k_gr - 1
    if history > block_s:
        raise ValueError(f"fused_prologue: block_s ({block_s}) must be at least the conv history "
                         f"(k_dw - 1) + (k_gr - 1) = {history}: a tile reads its history from the previous tile")
    padded = -(-seq // block_s) * block_s
    pad_rows = lambda x, value=0: jnp.pad(x, ((0, 0), (0, padded - seq)) + ((0, 0),) * (x.ndim - 2),  # noqa: E731
                                          constant_values=value)
    seg = segment_ids.astype(jnp.int32)
    # same[b, shift, t]: row t - shift exists and is in row t's document (padding rows: id -1, their own document).
    def same_document(shift):  # [B, S] for rows t >= shift; False before
        rows = max(seq - shift, 0)
        return jnp.pad(seg[:, :rows] == seg[:, seq - rows:], ((0, 0), (seq - rows, 0)))

    same = jnp.stack([same_document(shift) for shift in range(history + 1)], axis=1).astype(jnp.int32)
    same = jnp.pad(same, ((0, 0), (0, 0), (0, padded - seq)))[..., None]
    rotary = cos.shape[-1]
    # Full-width cos / sin: 1 and 0 on the dims RoPE leaves alone.
    widen = lambda x, fill: jnp.pad(x.astype(jnp.float32), ((0, 0), (0, padded - seq), (0, head_dim - rotary)),  # noqa: E731
                                    constant_values=fill)
    half = rotary // 2
    index = jnp.arange(half)
    rotate = (jnp.zeros((head_dim, head_dim), jnp.float32)  # x R = rotate_half(x) on the rotary dims
              .at[index + half, index].set(-1.0).at[index, index + half].set(1.0))
    dims = dict(block_s=block_s, heads_q=heads_q, head_dim=head_dim, groups=heads_q // heads_kv, k_dw=k_dw,
                k_gr=k_gr)
    return _Layout(pad_rows(q0), pad_rows(k0), same, widen(cos, 1.0), widen(sin, 0.0), rotate, dims, seq, padded)


def _kernel_params(params: PrologueParams) -> PrologueParams:
    """The parameters as the kernels read them: biases as [1, C] rows, the temperature as float32 scalars."""
    return params._replace(b_dw=params.b_dw[None], b_gr=params.b_gr[None],
                           temperature=params.temperature.astype(jnp.float32))


def _in_specs(lay: _Layout, params: PrologueParams, interpret):
    d, g, bs = lay.dims["head_dim"], lay.dims["groups"], lay.dims["block_s"]
    shifts = lay.same.shape[1]
    whole = lambda shape: pl.BlockSpec(shape, lambda b, i, h: (0,) * len(shape))  # noqa: E731
    # Each program reads its tile and the tile before it (the first tile reads itself there: `same` masks it).
    tile = lambda width: pl.BlockSpec((None, bs, width), lambda b, i, h: (b, i, h))  # noqa: E731
    previous = lambda width: pl.BlockSpec((None, bs, width),  # noqa: E731
                                          lambda b, i, h: (b, jnp.maximum(i - 1, 0), h))
    return [tile(g * d), previous(g * d), tile(d), previous(d),
            pl.BlockSpec((None, shifts, bs, 1), lambda b, i, h: (b, 0, i, 0)),
            pl.BlockSpec((None, bs, d), lambda b, i, h: (b, i, 0)),
            pl.BlockSpec((None, bs, d), lambda b, i, h: (b, i, 0)),
            whole((d, d))] + [whole(p.shape) for p in params[:-1]] + [scalars_spec(interpret)]


def _grid(lay: _Layout, heads_kv: int):
    return (lay.q0.shape[0], lay.padded // lay.dims["block_s"], heads_kv)


def _fused_forward(q0, k0, segment_ids, cos, sin, params: PrologueParams, block_s: int, interpret):
    lay = _layout(q0, k0, segment_ids, cos, sin, params, block_s)
    batch, d, g = q0.shape[0], lay.dims["head_dim"], lay.dims["groups"]
    heads_q, heads_kv = lay.dims["heads_q"], k0.shape[2] // d
    dtype = q0.dtype
    kernel_params = _kernel_params(params)
    q, k = pl.pallas_call(
        functools.partial(_forward_kernel, eps=float(jnp.finfo(dtype).eps), **lay.dims),
        grid=_grid(lay, heads_kv),
        in_specs=_in_specs(lay, kernel_params, interpret),
        out_specs=[pl.BlockSpec((None, block_s, g * d), lambda b, i, h: (b, i, h)),
                   pl.BlockSpec((None, block_s, d), lambda b, i, h: (b, i, h))],
        out_shape=[jax.ShapeDtypeStruct((batch, lay.padded, heads_q * d), dtype),
                   jax.ShapeDtypeStruct((batch, lay.padded, heads_kv * d), dtype)],
        interpret=interpret,
        compiler_params=compiler_params(interpret, 3, "cca_prologue"),
        name="cca_prologue",
    )(lay.q0, lay.q0, lay.k0, lay.k0, lay.same, lay.cos, lay.sin, lay.rotate, *kernel_params)
    seq = lay.seq
    return q[:, :seq].reshape(batch, seq, heads_q, d), k[:, :seq].reshape(batch, seq, heads_kv, d)


def _fused_backward(q0, k0, segment_ids, cos, sin, params: PrologueParams, dq, dk, block_s: int, interpret):
    lay = _layout(q0, k0, segment_ids, cos, sin, params, block_s)
    batch, seq, d, g = q0.shape[0], lay.seq, lay.dims["head_dim"], lay.dims["groups"]
    k_dw, k_gr = lay.dims["k_dw"], lay.dims["k_gr"]
    heads_q, heads_kv = lay.dims["heads_q"], k0.shape[2] // d
    tiles = lay.padded // block_s
    pad_rows = lambda x: jnp.pad(x.reshape(batch, seq, -1), ((0, 0), (0, lay.padded - seq), (0, 0)))  # noqa: E731
    f32 = jnp.float32
    tile = lambda width: pl.BlockSpec((None, block_s, width), lambda b, i, h: (b, i, h))  # noqa: E731
    kernel_params = _kernel_params(params)
    outputs = pl.pallas_call(
        functools.partial(_backward_kernel, eps=float(jnp.finfo(q0.dtype).eps), **lay.dims),
        grid=_grid(lay, heads_kv),
        in_specs=_in_specs(lay, kernel_params, interpret) + [tile(g * d), tile(d)],
        out_specs=[
            pl.BlockSpec((None, block_s, k_gr, g * d), lambda b, i, h: (b, i, 0, h)),  # d depthwise, q columns
            pl.BlockSpec((None, block_s, k_gr, d), lambda b, i, h: (b, i, 0, h)),  # d depthwise, k columns
            tile(g * d), tile(d),  # the q-k mean's direct gradients of q0, k0
            pl.BlockSpec((None, None, k_gr, g, d, d), lambda b, i, h: (b, i, 0, h, 0, 0)),  # per-tile d w_gr
            pl.BlockSpec((None, None, k_gr, 1, d, d), lambda b, i, h: (b, i, 0, h, 0, 0)),
            pl.BlockSpec((None, None, 1, g * d), lambda b, i, h: (b, i, 0, h)),  # per-tile d b_gr
            pl.BlockSpec((None, None, 1, d), lambda b, i, h: (b, i, 0, h)),
            pl.BlockSpec((None, None, block_s, 1), lambda b, i, h: (b, h, i, 0)),  # d temperature per row
        ],
        out_shape=[
            jax.ShapeDtypeStruct((batch, lay.padded, k_gr, heads_q * d), f32),
            jax.ShapeDtypeStruct((batch, lay.padded, k_gr, heads_kv * d), f32),
            jax.ShapeDtypeStruct((batch, lay.padded, heads_q * d), f32),
            jax.ShapeDtypeStruct((batch, lay.padded, heads_kv * d), f32),
            jax.ShapeDtypeStruct((batch, tiles, k_gr, heads_q, d, d), f32),
            jax.ShapeDtypeStruct((batch, tiles, k_gr, heads_kv, d, d), f32),
            jax.ShapeDtypeStruct((batch, tiles, 1, heads_q * d), f32),
            jax.ShapeDtypeStruct((batch, tiles, 1, heads_kv * d), f32),
            jax.ShapeDtypeStruct((batch, heads_kv, lay.padded, 1), f32),
        ],
        interpret=interpret,
        compiler_params=compiler_params(interpret, 3, "cca_prologue_backward"),
        name="cca_prologue_backward",
    )(lay.q0, lay.q0, lay.k0, lay.k0, lay.same, lay.cos, lay.sin, lay.rotate, *kernel_params, pad_rows(dq),
      pad_rows(dk))
    d_dw_q, d_dw_k, direct_q, direct_k, dw_q, dw_k, db_q, db_k, dtemp = outputs

    # The depthwise conv's transpose, an elementwise stencil over the K + 1 shifts (XLA fuses it):
    # D_j2(t) = b_dw + sum_j1 w_dw[j1] * m_s(t) P(t - s), s = K - j1 - j2, m_s = same document.
    history = k_dw - 1 + k_gr - 1
    d_dw = jnp.concatenate([d_dw_q, d_dw_k], axis=-1)[:, :seq]  # [B, S, k_gr, C]
    ext, seg = _history_padded(q0, k0, segment_ids, history)
    ext = ext.astype(f32)
    here = seg[:, history:]
    w_dw = params.w_dw.astype(f32)
    d_ext = jnp.zeros(ext.shape, f32)
    d_w_dw = [jnp.zeros(w_dw.shape[1:], f32) for _ in range(k_dw)]
    for shift in range(history + 1):
        same = (jax.lax.dynamic_slice_in_dim(seg, history - shift, seq, axis=1) == here)[..., None]
        column = jnp.where(same, jax.lax.dynamic_slice_in_dim(ext, history - shift, seq, axis=1), 0)
        d_column = jnp.zeros((batch, seq, ext.shape[-1]), f32)
        for j1 in range(k_dw):
            j2 = history - shift - j1
            if 0 <= j2 < k_gr:
                d_column += w_dw[j1] * d_dw[:, :, j2]
                d_w_dw[j1] += jnp.sum(d_dw[:, :, j2] * column, axis=(0, 1))
        d_ext = d_ext.at[:, history - shift:history - shift + seq].add(jnp.where(same, d_column, 0))
    d_packed = d_ext[:, history:]
    dq0 = d_packed[..., :heads_q * d] + direct_q[:, :seq]
    dk0 = d_packed[..., heads_q * d:] + direct_k[:, :seq]
    d_params = PrologueParams(
        w_dw=jnp.stack(d_w_dw),
        b_dw=jnp.sum(d_dw, axis=(0, 1, 2)),
        w_gr=jnp.concatenate([dw_q.sum((0, 1)), dw_k.sum((0, 1))], axis=1),
        b_gr=jnp.concatenate([db_q.sum((0, 1, 2)), db_k.sum((0, 1, 2))]),
        temperature=dtemp.sum((0, 2, 3)),
    )
    d_params = PrologueParams(*(x.astype(p.dtype) for x, p in zip(d_params, params)))
    return dq0.astype(q0.dtype), dk0.astype(k0.dtype), d_params


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def fused_prologue(q0, k0, segment_ids, cos, sin, params, block_s=64, interpret=False):
    """See the module docstring."""
    return _fused_forward(q0, k0, segment_ids, cos, sin, params, block_s, interpret)


def _fwd(q0, k0, segment_ids, cos, sin, params, block_s, interpret):
    out = _fused_forward(q0, k0, segment_ids, cos, sin, params, block_s, interpret)
    return out, (q0, k0, segment_ids, cos, sin, params)


def _bwd(block_s, interpret, saved, cotangents):
    q0, k0, segment_ids, cos, sin, params = saved
    dq, dk = cotangents
    dq0, dk0, d_params = _fused_backward(q0, k0, segment_ids, cos, sin, params, dq, dk, block_s, interpret)
    # cos and sin come from integer positions: nothing upstream of them is differentiable.
    zero = jnp.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq0, dk0, zero, jnp.zeros_like(cos), jnp.zeros_like(sin), d_params


fused_prologue.defvjp(_fwd, _bwd)
