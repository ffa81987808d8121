"""Compressed Convolutional Attention (CCA) with GQA heads, as ZAYA1 runs it (reference section 3.3).

For x [B, S, H] (the RMS-normed layer input), with Hq query heads, Hkv KV heads, head dim D, C = (Hq + Hkv) * D:

    q0 = x Wq [B, S, Hq*D]           k0 = x Wk [B, S, Hkv*D]           P = [q0 | k0]  [B, S, C]
    conv stack, padded once on the left by K = (k_dw - 1) + (k_gr - 1):
        Z_t = b_gr + sum_j2 W_gr[j2] (b_dw + sum_j1 w_dw[j1] * P_{t - K + j1 + j2})     (grouped: one group per head)
    q-k mean: qm = (q0 + k0 repeated over its query group) / 2,  km = mean of qm over the group
    q = Z_q + qm  [B, S, Hq, D]       k = Z_k + km  [B, S, Hkv, D]
    value shift: v = [x_t Wv_cur | x_{t-1} Wv_del] -> [B, S, Hkv, D]  (first half of the KV heads: current token)
    QK-norm: q <- sqrt(D) q / |q|,  k <- sqrt(D) k / |k| * temperature[kv head]  (linear temperature, no exp)
    partial NeoX RoPE on the first rotary_dim dims of every head, then causal GQA attention, then o = attn Wo.

Packed documents and left padding: a column P_{t-d} (and x_{t-1} for the value shift) only reaches position t when
both carry the same segment id; otherwise it counts as the zero padding a document sees at its start. The conv
biases still enter at every tap, exactly as transformers' pad-once convolution does for the first tokens. So each
document inside a packed row computes exactly what it computes alone, and left-padded rows equal transformers'
`conv_mask` zeroing.

`conv_history` [B, K, C] and `value_history` [B, Hkv*D/2] carry the state of earlier tokens (cached decoding, and
each chunk of a context-parallel sequence: zaya_jax/parallel/context.py); zeros mean "start of sequence".
`prologue_reference` is everything from q0, k0 to the attention's q and k, in XLA; with attention_impl "pallas"
the fused kernel of zaya_jax/kernels/cca_prologue.py computes it instead (`fused_prologue_after`, the history
included) for every call of more than one token: training, context-parallel chunks, prefill.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.attention import attend, attend_cached, pallas_interpret
from zaya_jax.cache import LayerCache
from zaya_jax.config import ZayaConfig
from zaya_jax.kernels import check_tiles
from zaya_jax.kernels.cca_prologue import PrologueParams, fused_prologue
from zaya_jax.layers import (apply_partial_rope, compute_dtype, constant_param, dense_init, matmul,
                             rotary_embedding)
from zaya_jax.parallel.context import attend_chunks, context_split, exchange_halo, over_context


class CCAttention(nnx.Module):
    """One CCA attention block: x [B, S, H] -> [B, S, H]."""

    def __init__(self, config: ZayaConfig, *, rngs: nnx.Rngs):
        self.config = config
        hidden, d = config.hidden_size, config.head_dim
        q_width, kv_width = config.query_heads * d, config.kv_heads * d
        groups = config.query_heads + config.kv_heads
        self.q_proj = dense_init(config, rngs, (hidden, q_width))
        self.k_proj = dense_init(config, rngs, (hidden, kv_width))
        self.v_current = dense_init(config, rngs, (hidden, kv_width // 2))
        self.v_delayed = dense_init(config, rngs, (hidden, kv_width // 2))
        # Depthwise conv: [kernel, C]; grouped conv: [kernel, groups, D_in, D_out] (one group per head).
        self.conv_depthwise = dense_init(config, rngs, (config.conv_kernel_depthwise, config.conv_channels))
        self.conv_depthwise_bias = constant_param(config, (config.conv_channels,), 0.0)
        self.conv_grouped = dense_init(config, rngs, (config.conv_kernel_grouped, groups, d, d))
        self.conv_grouped_bias = constant_param(config, (config.conv_channels,), 0.0)
        # transformers initialises the temperature to 0, which zeroes every key; 1 leaves the QK-normed keys as is.
        self.temperature = constant_param(config, (config.kv_heads,), 1.0)
        self.o_proj = dense_init(config, rngs, (q_width, hidden))

    def project(
        self,
        x: jax.Array,
        segment_ids: jax.Array,
        positions: jax.Array,
        conv_history: jax.Array | None = None,
        value_history: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]:
        """x [B, S, H] -> q [B, S, Hq, D], k [B, S, Hkv, D], v [B, S, Hkv, D] (post norm, temperature and RoPE),
        and the recurrent state after the last token: (conv history [B, K, C], value history [B, Hkv*D/2])."""
        cfg = self.config
        check_tiles(cfg)  # attention_impl "pallas": the sizes the kernels can tile on the platform lowered for
        dtype = compute_dtype(cfg)
        b, s, _ = x.shape
        d, hkv = cfg.head_dim, cfg.kv_heads
        x = x.astype(dtype)
        q0 = matmul(x, self.q_proj[...])
        k0 = matmul(x, self.k_proj[...])
        cos, sin = rotary_embedding(positions, cfg.rotary_dim, cfg.rope_theta)
        params = PrologueParams(self.conv_depthwise[...], self.conv_depthwise_bias[...], self.conv_grouped[...],
                                self.conv_grouped_bias[...], self.temperature[...])
        if cfg.attention_impl == "pallas" and s > 1:  # one decoded token: a kernel tile would hold one row
            q, k = fused_prologue_after(conv_history, q0, k0, segment_ids, cos, sin, params)
        else:
            q, k = prologue_reference(q0, k0, segment_ids, cos, sin, params, conv_history)

        v_cur = matmul(x, self.v_current[...])
        v_del = matmul(x, self.v_delayed[...])
        if value_history is None:
            value_history = jnp.zeros_like(v_del[:, 0])
        prev = jnp.concatenate([value_history[:, None].astype(dtype), v_del[:, :-1]], axis=1)
        same_as_prev = jnp.concatenate(
            [jnp.ones((b, 1), bool), segment_ids[:, 1:] == segment_ids[:, :-1]], axis=1
        )
        v_prev = jnp.where(same_as_prev[..., None], prev, 0)
        v = jnp.concatenate([v_cur, v_prev], axis=-1).reshape(b, s, hkv, d)

        packed = jnp.concatenate([q0, k0], axis=-1)
        if conv_history is None:
            conv_history = jnp.zeros((b, cfg.conv_history, cfg.conv_channels), dtype)
        return q, k, v, (self._next_conv_history(packed, segment_ids, conv_history), v_del[:, -1])

    def _next_conv_history(self, packed: jax.Array, segment_ids: jax.Array, history: jax.Array) -> jax.Array:
        """The last K pre-conv columns as the next token sees them: columns of another document are zero."""
        pad = self.config.conv_history
        if pad == 0:
            return history
        extended = jnp.concatenate([history.astype(packed.dtype), packed], axis=1)[:, -pad:]
        seg_ext = jnp.concatenate([jnp.repeat(segment_ids[:, :1], pad, axis=1), segment_ids], axis=1)[:, -pad:]
        return jnp.where((seg_ext == segment_ids[:, -1:])[..., None], extended, 0)

    def __call__(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array,
                 sequence_index: jax.Array | None = None) -> jax.Array:
        """x [B, S, H], segment_ids [B, S], positions [B, S] -> [B, S, H].

        Under a context-parallel mesh (zaya_jax/parallel/context.py) the tokens are in the dual-chunk layout and
        `sequence_index` [B, S] is each one's real index (required there); otherwise they are in order."""
        split = context_split()
        if split is None:
            q, k, v, _ = self.project(x, segment_ids, positions)
            out = attend(q, k, v, segment_ids, segment_ids, 0, self.config.attention_impl)
            return self._output(out)
        if sequence_index is None:
            raise ValueError("context parallelism: the batch must carry sequence_index (the real index of every "
                             "token in the dual-chunk layout; zaya_jax.parallel.context)")
        mesh, axis = split
        shards = mesh.shape[axis]
        graphdef, state = nnx.split(self)

        def body(state, x, segment_ids, positions, sequence_index):
            attn = nnx.merge(graphdef, state)
            q, k, v = attn._project_chunks(x, segment_ids, positions, axis, shards)
            return (attend_chunks(q, k, v, segment_ids, sequence_index, self.config.attention_impl, axis, shards),)

        impl = self.config.attention_impl
        interpreted = impl == "pallas" and pallas_interpret(impl) is not False
        (out,) = over_context(body, mesh, axis, (state, x, segment_ids, positions, sequence_index),
                              (False, True, True, True, True), (4,), every_axis_manual=impl == "cudnn" or interpreted)
        return self._output(out)

    def _project_chunks(self, x: jax.Array, segment_ids: jax.Array, positions: jax.Array, axis: str,
                        shards: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`project` of this context shard's two chunks (inside shard_map over `axis`): x [B, 2c, H], segment_ids,
        positions [B, 2c] -> q, k, v as `project`'s, each chunk started from the state of the chunk before it in
        the real sequence, received from its shard by `exchange_halo`: its last K pre-conv columns (those of
        another document zeroed), its last delayed value and last segment id. Only those K columns move."""
        cfg = self.config
        dtype = compute_dtype(cfg)
        b, local, h = x.shape
        c, pad = local // 2, cfg.conv_history
        if c < max(pad, 1):
            raise ValueError(f"context parallelism: chunks of {c} tokens are shorter than the convolution history "
                             f"of {pad} columns; use a longer sequence or fewer context shards")
        chunks = lambda a: a.reshape(b * 2, c, *a.shape[2:])  # noqa: E731  two chunks per row -> two rows
        x, segment_ids, positions = chunks(x.astype(dtype)), chunks(segment_ids), chunks(positions)
        tail_x = x[:, c - pad:]
        packed_tail = jnp.concatenate([matmul(tail_x, self.q_proj[...]), matmul(tail_x, self.k_proj[...])], axis=-1)
        zeros = jnp.zeros((b * 2, pad, cfg.conv_channels), dtype)
        tails = (self._next_conv_history(packed_tail, segment_ids[:, c - pad:], zeros),
                 matmul(x[:, -1], self.v_delayed[...]), segment_ids[:, -1])
        tails = jax.tree.map(lambda a: a.reshape(b, 2, *a.shape[1:]), tails)
        conv, value, previous_segment = jax.tree.map(lambda a: a.reshape(b * 2, *a.shape[2:]),
                                                     exchange_halo(tails, axis, shards))
        # The previous chunk's state reaches this chunk only inside one document (as in `prologue_reference`).
        same = previous_segment == segment_ids[:, 0]
        conv = jnp.where(same[:, None, None], conv, 0)
        value = jnp.where(same[:, None], value, 0)
        q, k, v, _ = self.project(x, segment_ids, positions, conv, value)
        unchunk = lambda a: a.reshape(b, local, *a.shape[2:])  # noqa: E731
        return unchunk(q), unchunk(k), unchunk(v)

    def cached(
        self, x: jax.Array, positions: jax.Array, valid: jax.Array, cache: LayerCache, start: jax.Array
    ) -> tuple[jax.Array, LayerCache]:
        """Attention of S new tokens written at cache slots start..start+S-1 (the same slots for every row).

        x [B, S, H]; positions [B, S] (RoPE); valid [B, T] int: 1 where a slot holds a real token (the new slots
        included; 0 for left padding). -> (out [B, S, H], updated cache).
        """
        s = x.shape[1]
        segment_ids = jax.lax.dynamic_slice_in_dim(valid, start, s, axis=1)
        q, k, v, (conv, value) = self.project(x, segment_ids, positions, cache.conv, cache.value)
        keys = jax.lax.dynamic_update_slice_in_dim(cache.k, k.transpose(0, 2, 1, 3).astype(cache.k.dtype), start, 2)
        values = jax.lax.dynamic_update_slice_in_dim(cache.v, v.transpose(0, 2, 1, 3).astype(cache.v.dtype), start, 2)
        out = attend_cached(q, keys, values, segment_ids, valid, start, self.config.attention_impl)
        # A call that ends on left padding leaves no history: the next call's first real token starts its sequence
        # (its conv sees zero columns, its value shift a zero value), as transformers zeroes padded inputs. Kept,
        # the padding's columns would count as that token's history, since history takes the first new token's id.
        ends_real = (segment_ids[:, -1] != 0)[:, None]
        conv = jnp.where(ends_real[..., None], conv, 0)
        value = jnp.where(ends_real, value, 0)
        return self._output(out), LayerCache(keys, values, conv.astype(cache.conv.dtype),
                                             value.astype(cache.value.dtype))

    def _output(self, out: jax.Array) -> jax.Array:
        dtype = compute_dtype(self.config)
        return matmul(out.reshape(*out.shape[:2], -1).astype(dtype), self.o_proj[...])


def fused_prologue_after(history: jax.Array | None, q0: jax.Array, k0: jax.Array, segment_ids: jax.Array,
                         cos: jax.Array, sin: jax.Array, params: PrologueParams) -> tuple[jax.Array, jax.Array]:
    """`prologue_reference(q0, k0, segment_ids, cos, sin, params, history)` by the fused Pallas kernel
    (zaya_jax/kernels/cca_prologue.py). The kernel takes no history, so the K history columns [B, K, C] go in front
    of the sequence as K rows of its first token's document (`prologue_reference` gives them that id too), and
    their outputs are dropped; the kernel's backward carries their gradient to `history`."""
    interpret = pallas_interpret("pallas")
    block_s = 16 if interpret is not False else 64
    if history is None:
        return fused_prologue(q0, k0, segment_ids, cos, sin, params, block_s, interpret)
    pad, q_width = history.shape[1], q0.shape[-1]
    history = history.astype(q0.dtype)
    before = lambda rows, x: jnp.concatenate([rows, x], axis=1)  # noqa: E731
    first = lambda x: jnp.repeat(x[:, :1], pad, axis=1)  # noqa: E731  (cos, sin of these rows: their outputs drop)
    q, k = fused_prologue(before(history[..., :q_width], q0), before(history[..., q_width:], k0),
                          before(first(segment_ids), segment_ids), before(first(cos), cos), before(first(sin), sin),
                          params, block_s, interpret)
    return q[:, pad:], k[:, pad:]


def prologue_reference(q0: jax.Array, k0: jax.Array, segment_ids: jax.Array, cos: jax.Array, sin: jax.Array,
                       params: PrologueParams, history: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The CCA prologue in XLA (module docstring): q0 [B, S, Hq*D], k0 [B, S, Hkv*D], cos/sin [B, S, R], the conv
    history [B, K, C] of earlier tokens (None: zeros) -> q [B, S, Hq, D], k [B, S, Hkv, D] after the convolutions,
    q-k mean, QK-norm, temperature and RoPE. Every size comes from the shapes; the Pallas kernel equals this."""
    dtype = q0.dtype
    b, s, q_width = q0.shape
    k_dw, c = params.w_dw.shape
    k_gr, groups, d, _ = params.w_gr.shape
    hq, hkv = q_width // d, k0.shape[2] // d
    pad = (k_dw - 1) + (k_gr - 1)
    packed = jnp.concatenate([q0, k0], axis=-1)
    if history is None:
        history = jnp.zeros((b, pad, c), dtype)
    extended = jnp.concatenate([history.astype(dtype), packed], axis=1)  # [B, pad + S, C]
    # History columns belong to the first token's document (they are zeros at a sequence start).
    seg_ext = jnp.concatenate([jnp.repeat(segment_ids[:, :1], pad, axis=1), segment_ids], axis=1)
    shifted = []  # shifted[d][t] = P_{t-d}, zero when t-d is in another document
    for shift in range(pad + 1):
        cols = jax.lax.dynamic_slice_in_dim(extended, pad - shift, s, axis=1)
        same = jax.lax.dynamic_slice_in_dim(seg_ext, pad - shift, s, axis=1) == segment_ids
        shifted.append(jnp.where(same[..., None], cols, 0))
    w_dw, b_dw, w_gr = params.w_dw.astype(dtype), params.b_dw.astype(dtype), params.w_gr.astype(dtype)
    z = jnp.zeros((b, s, groups, d), jnp.float32)
    for j2 in range(k_gr):
        depthwise = b_dw + sum(w_dw[j1] * shifted[pad - j1 - j2] for j1 in range(k_dw))
        # Products in the compute dtype (as transformers' conv), taps summed in float32.
        tap = jnp.einsum("bsgi,gio->bsgo", depthwise.reshape(b, s, groups, d), w_gr[j2])
        z = z + tap.astype(jnp.float32)
    z = (z.reshape(b, s, c) + params.b_gr.astype(jnp.float32)).astype(dtype)

    q_mean = 0.5 * (q0.reshape(b, s, hkv, hq // hkv, d) + k0.reshape(b, s, hkv, 1, d))
    q = (z[..., : hq * d].reshape(b, s, hkv, hq // hkv, d) + q_mean).reshape(b, s, hq, d)
    k = z[..., hq * d:].reshape(b, s, hkv, d) + q_mean.mean(axis=3)

    # L2-normalize every head to norm sqrt(D) (no learned weight), then scale keys by the temperature.
    eps = jnp.finfo(dtype).eps

    def l2(t: jax.Array) -> jax.Array:
        t32 = t.astype(jnp.float32)
        return t32 * (d**0.5 / jnp.maximum(jnp.sqrt(jnp.sum(t32 * t32, axis=-1, keepdims=True)), eps))

    q = l2(q).astype(dtype)
    k = (l2(k) * params.temperature.astype(jnp.float32)[:, None]).astype(dtype)
    return apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
