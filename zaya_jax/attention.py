"""The attention interface: causal GQA softmax attention inside CCA's compressed latent.

    attend(q [B, S, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, D], q_segments [B, S], kv_segments [B, T],
           q_index [B, S], kv_index [B, T], impl) -> [B, S, Hq, D]

Query head h reads KV head h // (Hq // Hkv). A query attends to a key when both carry the same segment id (packed
documents and left padding never mix) and the key's sequence index is not later than the query's (causal; sequence
indices, not RoPE positions, which restart per packed document). Scores are scaled by 1/sqrt(D); softmax runs in
float32. `impl="xla"` is the plain reference every kernel is
tested against; kernels register further implementations in `ATTENTION_IMPLS`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

_MASKED = -1e30  # finite, so a fully masked row (never produced here: a token always sees itself) cannot NaN

AttentionFn = Callable[..., jax.Array]


def xla_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array,
    kv_segments: jax.Array,
    q_index: jax.Array,
    kv_index: jax.Array,
) -> jax.Array:
    """Reference attention materializing the [B, Hkv, G, S, T] score tensor (see module docstring for shapes)."""
    batch, seq, q_heads, head_dim = q.shape
    kv_heads = k.shape[2]
    groups = q_heads // kv_heads
    qg = q.reshape(batch, seq, kv_heads, groups, head_dim)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k, preferred_element_type=jnp.float32) * (head_dim**-0.5)
    allowed = (q_segments[:, :, None] == kv_segments[:, None, :]) & (
        kv_index[:, None, :] <= q_index[:, :, None]
    )
    scores = jnp.where(allowed[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, seq, q_heads, head_dim).astype(q.dtype)


ATTENTION_IMPLS: dict[str, AttentionFn] = {"xla": xla_attention}


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array,
    kv_segments: jax.Array,
    q_index: jax.Array,
    kv_index: jax.Array,
    impl: str = "xla",
) -> jax.Array:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not available; available: {', '.join(ATTENTION_IMPLS)}")
    return ATTENTION_IMPLS[impl](q, k, v, q_segments, kv_segments, q_index, kv_index)
