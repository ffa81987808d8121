"""Decode attention in Pallas: one new token per row against the compressed KV cache.

    decode_attention(q [B, Hq, D], k_cache [B, Hkv, T, D], v_cache [B, Hkv, T, D], valid [B, T] int,
                     position: int32 [], *, block_k, interpret) -> [B, Hq, D]

`position` is the cache slot of the new token (the same for every row: prompts are left-padded to one length, see
zaya_jax/cache.py); its K/V are already written there. The token of row b sees slot t when t <= position and
valid[b, t] == 1, so each row's own length (left padding) is respected. One program per (row, KV head) holds the
G = Hq / Hkv query heads of the group as a [G, D] tile, so every cached key and value is read once per group, and
walks only the key tiles up to `position` (the rest of the cache is unwritten). Online softmax in float32,
scores scaled by 1/sqrt(D): the same function as xla_attention with one query at q_start = position.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from zaya_jax.kernels import compiler_params, online_softmax, scalars_spec, softmax_init
from zaya_jax.masking import MASKED_SCORE



def _decode_kernel(pos_ref, q_ref, k_ref, v_ref, valid_ref, o_ref, *, block_k, scale):
    position = pos_ref[0]
    q = q_ref[...]  # [G, D]
    groups, head_dim = q.shape

    def body(j, carry):
        tile = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        s = jax.lax.dot_general(q, k_ref[tile, :], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
        slots = j * block_k + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
        s = jnp.where((valid_ref[:, tile] == 1) & (slots <= position), s, MASKED_SCORE)
        return online_softmax(carry, s, v_ref[tile, :])

    last = jnp.minimum(position // block_k + 1, k_ref.shape[0] // block_k)
    acc, _, l = jax.lax.fori_loop(0, last, body, softmax_init(groups, head_dim))
    o_ref[...] = (acc / l).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_k", "interpret"))
def decode_attention(q: jax.Array, k_cache: jax.Array, v_cache: jax.Array, valid: jax.Array, position: jax.Array,
                     *, block_k: int = 128, interpret: bool = False) -> jax.Array:
    """See the module docstring."""
    batch, heads_q, head_dim = q.shape
    heads_kv, slots = k_cache.shape[1], k_cache.shape[2]
    groups = heads_q // heads_kv
    padded = -(-slots // block_k) * block_k
    if padded != slots:  # slots past the cache are never read as visible: valid is 0 there
        widths = ((0, 0), (0, 0), (0, padded - slots), (0, 0))
        k_cache, v_cache = jnp.pad(k_cache, widths), jnp.pad(v_cache, widths)
        valid = jnp.pad(valid, ((0, 0), (0, padded - slots)))
    qg = q.reshape(batch, heads_kv, groups, head_dim)
    kv_spec = pl.BlockSpec((None, None, padded, head_dim), lambda b, h: (b, h, 0, 0))
    q_spec = pl.BlockSpec((None, None, groups, head_dim), lambda b, h: (b, h, 0, 0))
    valid_spec = pl.BlockSpec((None, 1, padded), lambda b, h: (b, 0, 0))  # a [1, T] row per batch row
    out = pl.pallas_call(
        functools.partial(_decode_kernel, block_k=block_k, scale=head_dim**-0.5),
        grid=(batch, heads_kv),
        in_specs=[scalars_spec(interpret), q_spec, kv_spec, kv_spec, valid_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
        compiler_params=compiler_params(interpret, 2, "cca_decode_attention"),
        name="cca_decode_attention",
    )(jnp.reshape(position, (1,)).astype(jnp.int32), qg, k_cache, v_cache, valid.astype(jnp.int32)[:, None, :])
    return out.reshape(batch, heads_q, head_dim)
