"""The decode state of CCA: what one layer keeps per sequence between tokens (reference section 3.4).

    LayerCache (stacked over layers in `Cache`, leading axis L):
        k     [B, Hkv, T, D]   keys after QK-norm, temperature and RoPE        T = max_len slots
        v     [B, Hkv, T, D]   values (first half of the heads: current token, second: previous token)
        conv  [B, K, C]        the last K = (k_dw - 1) + (k_gr - 1) pre-conv [q | k] columns
        value [B, Hkv*D/2]     the previous token's delayed value projection x_{t-1} W_v_del
    Cache = (layers: LayerCache [L, ...], valid [B, T] int32 (1 = a real token in that slot), length: int32 [])

Both recurrent states are zero after a call that ends on left padding: the first real token has no history.
Every row writes the same slot at each step (prompts are left-padded to one length), so `length` is one scalar.
The K/V part costs 2 * Hkv * D values per layer per token: 512 for ZAYA1-8B, 40 KiB per token over 40 layers in
bf16; conv and value states are per sequence, not per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from zaya_jax.config import ZayaConfig
from zaya_jax.layers import compute_dtype


class LayerCache(NamedTuple):
    k: jax.Array
    v: jax.Array
    conv: jax.Array
    value: jax.Array


class Cache(NamedTuple):
    layers: LayerCache  # each field with a leading layer axis
    valid: jax.Array  # [B, T] int32
    length: jax.Array  # int32 []: slots written so far


def init_cache(config: ZayaConfig, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> Cache:
    """An empty cache for `batch` sequences of up to `max_len` tokens (prompt + generated)."""
    dtype = compute_dtype(config) if dtype is None else dtype
    layers, kv, d = config.num_layers, config.kv_heads, config.head_dim
    return Cache(
        layers=LayerCache(
            k=jnp.zeros((layers, batch, kv, max_len, d), dtype),
            v=jnp.zeros((layers, batch, kv, max_len, d), dtype),
            # The recurrent states stay float32, as ZAYA1's serving stacks keep them.
            conv=jnp.zeros((layers, batch, config.conv_history, config.conv_channels), jnp.float32),
            value=jnp.zeros((layers, batch, kv * d // 2), jnp.float32),
        ),
        valid=jnp.zeros((batch, max_len), jnp.int32),
        length=jnp.zeros((), jnp.int32),
    )


def kv_bytes_per_token(cache: Cache) -> int:
    """Bytes of K and V one token occupies across all layers (from the cache's shapes)."""
    k, v = cache.layers.k, cache.layers.v
    slots = k.shape[3]
    return (k.size * k.dtype.itemsize + v.size * v.dtype.itemsize) // (slots * k.shape[1])
