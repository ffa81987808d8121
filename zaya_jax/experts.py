"""Top-1 mixture of SwiGLU experts on one device's tokens: token dispatch and expert compute.

Expert weights (transformers' fused layout, stored input-major): gate_up [E, H, 2I] (first I outputs = gate,
second I = up), down [E, I, H]. For tokens x [T, H] routed to expert e_t with weight p_t:

    y_t = p_t * (silu(x_t Wg[e_t]) * (x_t Wu[e_t])) Wd[e_t]          # y [T, H]

Skip-class tokens arrive with p_t = 0 and any valid expert index; their output is zero. Three dropless
implementations compute the same y:
- `experts_sorted`: sort tokens by expert, grouped matmul (`jax.lax.ragged_dot`) over contiguous groups, unsort.
- `experts_gathered`: each token's own expert's weights gathered ([T, H, 2I] and [T, I, H]), then one batched
  matmul: reads T experts' weights instead of all E, which is what a few tokens (decoding, short prompts) need on
  a backend where `ragged_dot` computes every expert (XLA:CPU: 16x the work of one token's expert at T = 1).
- `experts_dense`: every token through every expert, then select (E times the FLOPs; the reference).
and one with a capacity, which drops (and counts) the tokens past it:
- `experts_padded`: GShard-style. Tokens in groups (one batch row each); in every group expert e takes its first
  C = ceil(capacity_factor * group / E) tokens by position into a [G, E, C, H] buffer, and each matmul is one
  batched einsum over the experts. Under a mesh the buffer is pinned to experts-over-`expert`, so the compiler moves
  tokens to their experts' devices (an all-to-all) instead of gathering weights. On an H100 a capacity-padded
  per-expert einsum ran ZAYA-shaped experts at ~316 TFLOP/s forward + backward against ~43 for `ragged_dot`
  (issue #4's measurement), which is why it exists next to the dropless default.

Under a mesh, `zaya_jax.parallel.expert_dispatch` runs `experts_sorted` on each device's own tokens; `zaya_jax.moe`
picks the implementation.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from zaya_jax.layers import constrain


def _swiglu(gate_up: jax.Array) -> jax.Array:
    gate, up = jnp.split(gate_up, 2, axis=-1)
    return jax.nn.silu(gate) * up


def experts_dense(
    x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """x [T, H], expert [T] int, weight [T] -> y [T, H], computing all experts for every token."""
    h = _swiglu(jnp.einsum("th,ehf->tef", x, gate_up))
    y_all = jnp.einsum("tei,eih->teh", h, down)
    y = jnp.take_along_axis(y_all, expert[:, None, None], axis=1)[:, 0]
    return y * weight[:, None].astype(y.dtype)


def experts_sorted(
    x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """x [T, H], expert [T] int, weight [T] -> y [T, H] via a grouped matmul over tokens sorted by expert."""
    num_experts = gate_up.shape[0]
    order = jnp.argsort(expert, stable=True)
    group_sizes = jnp.bincount(expert, length=num_experts).astype(jnp.int32)
    # float32 accumulation asked for explicitly, so XLA:CPU does not convert every expert's weights to float32.
    h = _swiglu(jax.lax.ragged_dot(x[order], gate_up, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype))
    y_sorted = jax.lax.ragged_dot(h, down, group_sizes, preferred_element_type=jnp.float32).astype(x.dtype)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    return y * weight[:, None].astype(y.dtype)


def experts_gathered(
    x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array, down: jax.Array
) -> jax.Array:
    """x [T, H], expert [T] int in [0, E), weight [T] -> y [T, H] through each token's gathered expert weights."""
    h = _swiglu(jnp.einsum("th,thf->tf", x, gate_up[expert], preferred_element_type=jnp.float32).astype(x.dtype))
    y = jnp.einsum("ti,tih->th", h, down[expert], preferred_element_type=jnp.float32).astype(x.dtype)
    return y * weight[:, None].astype(y.dtype)


def capacity_slots(tokens: int, buckets: int, capacity_factor: float) -> int:
    """Slots per bucket when `tokens` tokens share `buckets` buckets (experts, or destination shards):
    ceil(capacity_factor * tokens / buckets), clipped to [1, tokens] (no bucket can receive more)."""
    return max(1, min(tokens, math.ceil(capacity_factor * tokens / buckets)))


def bucket_slots(bucket: jax.Array, num_buckets: int, capacity: int) -> tuple[jax.Array, jax.Array]:
    """Each token's slot in a [num_buckets * capacity] buffer (plus one trash slot at num_buckets * capacity).

    bucket [..., T] int (an expert, or a destination shard; ids outside [0, num_buckets), such as the skip class,
    get no slot) -> (slot [..., T] int32, kept [..., T] bool). A token's slot is bucket * capacity + its rank among
    the earlier tokens of its bucket along T (first come by position); tokens past capacity go to the trash slot,
    which callers cut off so that those tokens read back zero."""
    one_hot = jax.nn.one_hot(bucket, num_buckets, dtype=jnp.int32)  # all zero outside [0, num_buckets)
    rank = jnp.sum(jnp.cumsum(one_hot, axis=-2) * one_hot, axis=-1) - 1
    kept = (rank >= 0) & (rank < capacity)
    return jnp.where(kept, bucket * capacity + rank, num_buckets * capacity).astype(jnp.int32), kept


def experts_padded(
    x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array, down: jax.Array, *, group_size: int,
    capacity_factor: float,
) -> tuple[jax.Array, jax.Array]:
    """x [T, H], expert [T] int (E = no expert: the skip class, which takes no slot), weight [T], groups of
    `group_size` consecutive tokens -> (y [T, H], dropped tokens int32 []). A token past its expert's capacity in
    its group gets y = 0 (and no gradient), as a skipped token does."""
    t, h = x.shape
    num_experts = gate_up.shape[0]
    groups = t // group_size
    capacity = capacity_slots(group_size, num_experts, capacity_factor)
    expert = expert.reshape(groups, group_size)
    slot, kept = bucket_slots(expert, num_experts, capacity)  # per group; the skip class takes no slot
    trash = num_experts * capacity
    # Per group (vmapped, so the partitioner sees each group write only its own rows): a scatter-add (slots are
    # unique but the trash one), whose transpose is a plain gather.
    fill = jax.vmap(lambda rows, slots: jnp.zeros((trash + 1, h), x.dtype).at[slots].add(rows))
    buffer = fill(x.reshape(groups, group_size, h), slot)
    buffer = constrain(buffer[:, :trash].reshape(groups, num_experts, capacity, h), "dispatch")
    hidden = _swiglu(jnp.einsum("gech,ehf->gecf", constrain(buffer, "expert_buffer"), gate_up))
    out = constrain(constrain(jnp.einsum("geci,eih->gech", hidden, down), "expert_buffer"), "dispatch")
    out = jnp.concatenate([out.reshape(groups, trash, h), jnp.zeros((groups, 1, h), out.dtype)], axis=1)
    y = jax.vmap(lambda rows, slots: rows[slots])(out, slot).reshape(t, h)
    dropped = jnp.sum((expert < num_experts) & ~kept).astype(jnp.int32)
    return y * weight[:, None].astype(y.dtype), dropped
