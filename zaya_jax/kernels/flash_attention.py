"""Flash attention for CCA's GQA heads in Pallas: forward, and a backward of two kernels under `jax.custom_vjp`.

    flash_attention(q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D], q_segments [B, S], kv_segments [B, T],
                    q_start: int32 [], *, block_q, block_k, interpret) -> [B, S, Hq, D]

The same function as `zaya_jax.attention.xla_attention`: query i sits at sequence index q_start + i (the same
start for every row), key j at index j; query head h reads KV head h // (Hq / Hkv); a query sees a key when both
carry the same segment id and the key's index is not later than the query's; scores scaled by 1/sqrt(D), softmax
in float32. Nothing of size S x T is materialised: each program holds one [block_q, D] query tile and walks the
keys in [block_k, D] tiles with the online softmax (FlashAttention-2), keeping the row log-sum-exp for the
backward.

Kernels (grids; every program works on one batch row and one head):
    forward   (B, Hq, S / block_q)    out, lse [B, Hq, S, 1]
    dq        (B, Hq, S / block_q)    dq = sum over key tiles of dS K / sqrt(D)
    dk, dv    sums over the G query heads of the group and over query tiles, in one of two layouts (DKV_LAYOUTS,
              picked by `dkv_layout_for` the platform being lowered for):
      "query_loop" (GPU)  (B, Hkv, T / block_k): the program reads its group's [G, S, D] queries and output
                          gradients and [G, S, 1] row statistics whole and loops over them (Triton's blocks are
                          pointers: nothing of size S is copied);
      "query_grid" (TPU)  (B, Hkv, T / block_k, G, S / block_q), the last two axes sequential: one [block_q, D]
                          query tile per program, dk and dv summed in float32 VMEM scratch, so the VMEM a program
                          holds does not grow with S (Mosaic copies every block into VMEM).
with dS = P * (dP - delta), P = exp(scores - lse), dP = dO V^T, delta = rowsum(dO * O).

Sequence indices come from the program ids and q_start, so tile skipping is exact: the forward and dq kernels stop
after the last key tile a query tile can see, the dk/dv kernel starts at the first query tile that can see its key
tile. Segment ids travel as [B, S, 1] columns (queries) and [B, 1, T] rows (keys), row statistics as [.., S, 1]
columns: block shapes that satisfy Mosaic's (8, 128) tiling rule as well as Triton's.

S and T need not be multiples of the tiles: inputs are padded, with segment ids no real token carries.
`interpret=True` runs the kernels in the Pallas interpreter (CPU tests); on GPU they lower through Triton, on TPU
through Mosaic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from zaya_jax.kernels import compiler_params, online_softmax, scalars_spec, softmax_init, target_platform
from zaya_jax.masking import MASKED_SCORE

_Q_PAD, _KV_PAD = -2, -3  # segment ids of padding rows: they match nothing real and not each other


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def _pad_to(x: jax.Array, axis: int, size: int, value) -> jax.Array:
    if x.shape[axis] == size:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def _scores(q, k, q_seg, kv_seg, q_first, k_first, scale):
    """q [bq, D], k [bk, D], q_seg [bq, 1], kv_seg [1, bk]; the tiles' first sequence indices -> masked scaled
    scores [bq, bk] float32."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    q_idx = q_first + jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    kv_idx = k_first + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    return jnp.where((q_seg == kv_seg) & (kv_idx <= q_idx), s, MASKED_SCORE)


def _visible_key_tiles(start, block_q, block_k, num_k):
    """Key tiles [0, last) hold every key the program's query tile can see."""
    last_query = start + (pl.program_id(2) + 1) * block_q - 1
    return jnp.minimum(last_query // block_k + 1, num_k)


def _forward_kernel(start_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, block_k, scale):
    q, q_seg = q_ref[...], qs_ref[...]
    block_q, head_dim = q.shape
    start = start_ref[0]
    q_first = start + pl.program_id(2) * block_q

    def body(j, carry):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        s = _scores(q, k_ref[tile, :], q_seg, ks_ref[:, tile], q_first, j * block_k, scale)
        return online_softmax(carry, s, v_ref[tile, :])

    last = _visible_key_tiles(start, block_q, block_k, k_ref.shape[0] // block_k)
    acc, m, l = jax.lax.fori_loop(0, last, body, softmax_init(block_q, head_dim))
    o_ref[...] = (acc / l).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _dq_kernel(start_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dq_ref, *, block_k, scale):
    q, do, q_seg = q_ref[...], do_ref[...], qs_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    block_q = q.shape[0]
    start = start_ref[0]
    q_first = start + pl.program_id(2) * block_q

    def body(j, dq):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        k, v = k_ref[tile, :], v_ref[tile, :]
        p = jnp.exp(_scores(q, k, q_seg, ks_ref[:, tile], q_first, j * block_k, scale) - lse)
        dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        return dq + jnp.dot((p * (dp - delta)).astype(k.dtype), k, preferred_element_type=jnp.float32)

    last = _visible_key_tiles(start, block_q, block_k, k_ref.shape[0] // block_k)
    dq = jax.lax.fori_loop(0, last, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _first_visible_query_tile(start, k_first, block_q, num_q):
    """The first query tile holding a query at or after sequence index k_first: the tiles before it see no key of
    a key tile starting there."""
    return jnp.clip((k_first - start) // block_q, 0, num_q)


def _dkv_tile(dk, dv, q, do, q_seg, lse, delta, k, v, kv_seg, q_first, k_first, scale):
    """Adds one query tile's contribution to a key tile's float32 accumulators (dk / scale, dv) [bk, D]: q, do
    [bq, D], q_seg, lse, delta [bq, 1]; k, v [bk, D], kv_seg [1, bk]. Each product is added to its accumulator as
    it is made: with the products made first and added after, Triton asked for 263680 bytes of shared memory on
    an H100 (which has 232448)."""
    p = jnp.exp(_scores(q, k, q_seg, kv_seg, q_first, k_first, scale) - lse)
    dv = dv + jax.lax.dot_general(p.astype(do.dtype), do, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    dk = dk + jax.lax.dot_general((p * (dp - delta)).astype(q.dtype), q, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
    return dk, dv


def _dkv_loop_kernel(start_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                     block_q, scale):
    """The "query_loop" layout: the group's [G, S, D] queries whole, looped over inside the program."""
    k, v, kv_seg = k_ref[...], v_ref[...], ks_ref[...]
    block_k = k.shape[0]
    groups, seq_q = q_ref.shape[0], q_ref.shape[1]
    num_q = seq_q // block_q
    start = start_ref[0]
    k_first = pl.program_id(2) * block_k
    first = _first_visible_query_tile(start, k_first, block_q, num_q)

    def head(g, carry):
        def body(i, carry):
            tile = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
            return _dkv_tile(*carry, q_ref[g, tile, :], do_ref[g, tile, :], qs_ref[tile, :], lse_ref[g, tile, :],
                             delta_ref[g, tile, :], k, v, kv_seg, start + i * block_q, k_first, scale)

        return jax.lax.fori_loop(first, num_q, body, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, groups, head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dkv_grid_kernel(start_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref,
                     dk_acc, dv_acc, *, scale):
    """The "query_grid" layout: one [block_q, D] query tile of one head per program; grid axes 3 (query head of
    the group) and 4 (query tile) are sequential, summing into the float32 scratch accumulators dk_acc, dv_acc."""
    g, i = pl.program_id(3), pl.program_id(4)
    block_q, block_k = q_ref.shape[0], k_ref.shape[0]
    start = start_ref[0]
    k_first = pl.program_id(2) * block_k

    @pl.when((g == 0) & (i == 0))
    def _zero():
        dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
        dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)

    @pl.when(i >= _first_visible_query_tile(start, k_first, block_q, pl.num_programs(4)))
    def _accumulate():
        dk_acc[...], dv_acc[...] = _dkv_tile(dk_acc[...], dv_acc[...], q_ref[...], do_ref[...], qs_ref[...],
                                             lse_ref[...], delta_ref[...], k_ref[...], v_ref[...], ks_ref[...],
                                             start + i * block_q, k_first, scale)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _write():
        dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _layout(q, k, v, q_segments, kv_segments, q_start, block_q, block_k):
    """[B, S, H, D] -> padded [B, H, S', D]; segment ids as [B, S', 1] / [B, 1, T']; the start as [1] int32."""
    s_pad, t_pad = _round_up(q.shape[1], block_q), _round_up(k.shape[1], block_k)
    qh = _pad_to(q.transpose(0, 2, 1, 3), 2, s_pad, 0)
    kh = _pad_to(k.transpose(0, 2, 1, 3), 2, t_pad, 0)
    vh = _pad_to(v.transpose(0, 2, 1, 3), 2, t_pad, 0)
    qs = _pad_to(q_segments.astype(jnp.int32), 1, s_pad, _Q_PAD)[:, :, None]
    ks = _pad_to(kv_segments.astype(jnp.int32), 1, t_pad, _KV_PAD)[:, None, :]
    return jnp.reshape(q_start, (1,)).astype(jnp.int32), qh, kh, vh, qs, ks


def _specs(heads_q, heads_kv, s_pad, t_pad, head_dim, block_q, interpret):
    groups = heads_q // heads_kv
    q_tile = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i: (b, h, i, 0))
    kv_all = pl.BlockSpec((None, None, t_pad, head_dim), lambda b, h, i: (b, h // groups, 0, 0))
    q_side = pl.BlockSpec((None, block_q, 1), lambda b, h, i: (b, i, 0))
    kv_side = pl.BlockSpec((None, 1, t_pad), lambda b, h, i: (b, 0, 0))
    row = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i: (b, h, i, 0))
    return scalars_spec(interpret), q_tile, kv_all, q_side, kv_side, row


def _forward(q, k, v, q_segments, kv_segments, q_start, block_q, block_k, interpret, dkv_layout):
    if dkv_layout not in (None, *DKV_LAYOUTS):  # checked here, where the forward and the backward pass through
        raise ValueError(f"flash_attention: dkv_layout {dkv_layout!r} is not one of {DKV_LAYOUTS} (or None: the "
                         "one for the platform being lowered for)")
    batch, seq_q, heads_q, head_dim = q.shape
    heads_kv = k.shape[2]
    inputs = _layout(q, k, v, q_segments, kv_segments, q_start, block_q, block_k)
    qh, kh = inputs[1], inputs[2]
    s_pad, t_pad = qh.shape[2], kh.shape[2]
    start, q_tile, kv_all, q_side, kv_side, row = _specs(heads_q, heads_kv, s_pad, t_pad, head_dim, block_q,
                                                         interpret)
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, block_k=block_k, scale=head_dim**-0.5),
        grid=(batch, heads_q, s_pad // block_q),
        in_specs=[start, q_tile, kv_all, kv_all, q_side, kv_side],
        out_specs=[q_tile, row],
        out_shape=[jax.ShapeDtypeStruct(qh.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads_q, s_pad, 1), jnp.float32)],
        interpret=interpret,
        compiler_params=compiler_params(interpret, 3, "cca_flash_forward"),
        name="cca_flash_forward",
    )(*inputs)
    return out[:, :, :seq_q].transpose(0, 2, 1, 3), (inputs, out, lse)


def _dkv_loop(inputs, do, lse, delta, groups, block_q, block_k, scale, interpret):
    """dk, dv [B, Hkv, T', D] in the "query_loop" layout: grid (B, Hkv, T' / block_k), every axis parallel."""
    start, qh, kh = inputs[0], inputs[1], inputs[2]
    batch, heads_kv, t_pad, head_dim = kh.shape
    s_pad = qh.shape[2]
    group_q = pl.BlockSpec((None, groups, s_pad, head_dim), lambda b, h, j: (b, h, 0, 0))
    k_tile = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j: (b, h, j, 0))
    q_side_all = pl.BlockSpec((None, s_pad, 1), lambda b, h, j: (b, 0, 0))
    kv_side_tile = pl.BlockSpec((None, 1, block_k), lambda b, h, j: (b, 0, j))
    group_rows = pl.BlockSpec((None, groups, s_pad, 1), lambda b, h, j: (b, h, 0, 0))
    return pl.pallas_call(
        functools.partial(_dkv_loop_kernel, block_q=block_q, scale=scale),
        grid=(batch, heads_kv, t_pad // block_k),
        in_specs=[scalars_spec(interpret), group_q, k_tile, k_tile, q_side_all, kv_side_tile, group_q, group_rows,
                  group_rows],
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(kh.shape, kh.dtype)] * 2,
        interpret=interpret,
        compiler_params=compiler_params(interpret, 3, "cca_flash_dkv"),
        name="cca_flash_dkv",
    )(*inputs, do, lse, delta)


def _dkv_grid(inputs, do, lse, delta, groups, block_q, block_k, scale, interpret):
    """dk, dv [B, Hkv, T', D] in the "query_grid" layout: grid (B, Hkv, T' / block_k, G, S' / block_q), the last two
    axes sequential. The start slot is prefetched to scalar memory so the index maps can clamp the query tiles a key
    tile cannot see to the first one it can: their blocks are not fetched again (Pallas skips the copy when a block
    index repeats) and the kernel skips their work."""
    start, qh, kh = inputs[0], inputs[1], inputs[2]
    batch, heads_kv, t_pad, head_dim = kh.shape
    num_q = qh.shape[2] // block_q

    def query_tile(i, j, start_ref):
        first = _first_visible_query_tile(start_ref[0], j * block_k, block_q, num_q)
        return jnp.minimum(jnp.maximum(i, first), num_q - 1)  # num_q when no query sees the key tile

    q_tile = pl.BlockSpec((None, None, block_q, head_dim),
                          lambda b, h, j, g, i, s: (b, h * groups + g, query_tile(i, j, s), 0))
    k_tile = pl.BlockSpec((None, None, block_k, head_dim), lambda b, h, j, g, i, s: (b, h, j, 0))
    q_side = pl.BlockSpec((None, block_q, 1), lambda b, h, j, g, i, s: (b, query_tile(i, j, s), 0))
    kv_side = pl.BlockSpec((None, 1, block_k), lambda b, h, j, g, i, s: (b, 0, j))
    row = pl.BlockSpec((None, None, block_q, 1), lambda b, h, j, g, i, s: (b, h * groups + g, query_tile(i, j, s), 0))
    return pl.pallas_call(
        functools.partial(_dkv_grid_kernel, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1,
            grid=(batch, heads_kv, t_pad // block_k, groups, num_q),
            in_specs=[q_tile, k_tile, k_tile, q_side, kv_side, q_tile, row, row],
            out_specs=[k_tile, k_tile],
            scratch_shapes=[pltpu.VMEM((block_k, head_dim), jnp.float32)] * 2),
        out_shape=[jax.ShapeDtypeStruct(kh.shape, kh.dtype)] * 2,
        interpret=interpret,
        compiler_params=compiler_params(interpret, 5, "cca_flash_dkv", sequential=2),
        name="cca_flash_dkv",
    )(start, *inputs[1:], do, lse, delta)


# The dk/dv kernel's layouts (see the module docstring); `dkv_layout_for` picks one per platform.
_DKV = {"query_loop": _dkv_loop, "query_grid": _dkv_grid}
DKV_LAYOUTS = tuple(_DKV)


def dkv_layout_for(platform: str) -> str:
    """The dk/dv layout for the platform the kernels are lowered for: "query_grid" on TPU (Mosaic copies every
    block into VMEM, and the whole-sequence blocks of "query_loop" outgrow it from S = 4096; see docs/kernels.md),
    "query_loop" elsewhere (Triton has no sequential grid axes or scratch, and its blocks are pointers, not copies;
    the interpreter on a CPU)."""
    return "query_grid" if platform == "tpu" else "query_loop"


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def flash_attention(q, k, v, q_segments, kv_segments, q_start, block_q=128, block_k=128, interpret=False,
                    dkv_layout=None):
    """See the module docstring. `dkv_layout`: one of DKV_LAYOUTS, or None for `dkv_layout_for` the platform
    being lowered for."""
    return _forward(q, k, v, q_segments, kv_segments, q_start, block_q, block_k, interpret, dkv_layout)[0]


def _flash_fwd(q, k, v, q_segments, kv_segments, q_start, block_q, block_k, interpret, dkv_layout):
    out, residuals = _forward(q, k, v, q_segments, kv_segments, q_start, block_q, block_k, interpret, dkv_layout)
    return out, (residuals, q.shape[1], k.shape[1], (q_segments, kv_segments, q_start))


def _flash_bwd(block_q, block_k, interpret, dkv_layout, saved, d_out):
    (inputs, out, lse), seq_q, seq_k, side = saved
    qh, kh = inputs[1], inputs[2]
    batch, heads_q, s_pad, head_dim = qh.shape
    heads_kv, t_pad = kh.shape[1], kh.shape[2]
    groups = heads_q // heads_kv
    scale = head_dim**-0.5
    do = _pad_to(d_out.transpose(0, 2, 1, 3), 2, s_pad, 0).astype(qh.dtype)
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), axis=-1, keepdims=True)  # [B, Hq, S', 1]
    start, q_tile, kv_all, q_side, kv_side, row = _specs(heads_q, heads_kv, s_pad, t_pad, head_dim, block_q,
                                                         interpret)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, block_k=block_k, scale=scale),
        grid=(batch, heads_q, s_pad // block_q),
        in_specs=[start, q_tile, kv_all, kv_all, q_side, kv_side, q_tile, row, row],
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(qh.shape, qh.dtype),
        interpret=interpret,
        compiler_params=compiler_params(interpret, 3, "cca_flash_dq"),
        name="cca_flash_dq",
    )(*inputs, do, lse, delta)

    dkv = _DKV[dkv_layout or dkv_layout_for(target_platform())]
    dk, dv = dkv(inputs, do, lse, delta, groups, block_q, block_k, scale, interpret)
    unpad = lambda x, n: x[:, :, :n].transpose(0, 2, 1, 3)  # noqa: E731
    zeros = tuple(jnp.zeros(jnp.shape(x), jax.dtypes.float0) for x in side)  # integer inputs have no cotangent
    return (unpad(dq, seq_q), unpad(dk, seq_k), unpad(dv, seq_k), *zeros)


flash_attention.defvjp(_flash_fwd, _flash_bwd)
