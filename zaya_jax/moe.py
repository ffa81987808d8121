"""Top-1 mixture of SwiGLU experts: token dispatch and expert compute.

Expert weights (transformers' fused layout, stored input-major): gate_up [E, H, 2I] (first I outputs = gate,
second I = up), down [E, I, H]. For tokens x [T, H] routed to expert e_t with weight p_t:

    y_t = p_t * (silu(x_t Wg[e_t]) * (x_t Wu[e_t])) Wd[e_t]          # y [T, H]

Skip-class tokens arrive with p_t = 0 and any valid expert index; their output is zero. Two dropless
implementations compute the same y:
- `experts_sorted`: sort tokens by expert, grouped matmul (`jax.lax.ragged_dot`) over contiguous groups, unsort.
- `experts_dense`: every token through every expert, then select (E times the FLOPs; the reference).
and one with a capacity, which drops (and counts) the tokens past it:
- `experts_padded`: GShard-style. Tokens in groups (one batch row each); in every group expert e takes its first
  C = ceil(capacity_factor * group / E) tokens by position into a [G, E, C, H] buffer, and each matmul is one
  batched einsum over the experts. Under a mesh the buffer is pinned to experts-over-`expert`, so the compiler moves
  tokens to their experts' devices (an all-to-all) instead of gathering weights. On an H100 a capacity-padded
  per-expert einsum ran ZAYA-shaped experts at ~316 TFLOP/s forward + backward against ~43 for `ragged_dot`
  (issue #4's measurement), which is why it exists next to the dropless default.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.config import ZayaConfig
from zaya_jax.layers import compute_dtype, constrain, dense_init
from zaya_jax.router import Router


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
    h = _swiglu(jax.lax.ragged_dot(x[order], gate_up, group_sizes))
    y_sorted = jax.lax.ragged_dot(h, down, group_sizes)
    y = jnp.zeros_like(y_sorted).at[order].set(y_sorted)
    return y * weight[:, None].astype(y.dtype)


EXPERT_IMPLS = {"sorted": experts_sorted, "dense": experts_dense}


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


class Experts(nnx.Module):
    def __init__(self, config: ZayaConfig, *, rngs: nnx.Rngs):
        e, h, i = config.num_experts, config.hidden_size, config.expert_hidden_size
        self.gate_up = dense_init(config, rngs, (e, h, 2 * i))
        self.down = dense_init(config, rngs, (e, i, h))


class MoE(nnx.Module):
    """Router + experts: x [B, S, H] (normed), router_state [B, S, R] ->
    (y [B, S, H], new router state, choice [B, S], dropped tokens (int32 scalar; nonzero only with a capacity))."""

    def __init__(self, config: ZayaConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.router = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)

    def __call__(
        self, x: jax.Array, router_state: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        cfg = self.config
        dtype = compute_dtype(cfg)
        with jax.named_scope("router"):
            _, choice, weight, router_state = self.router(x, router_state)
        b, s, h = x.shape
        args = (
            x.astype(dtype).reshape(b * s, h),
            jnp.where(choice == cfg.num_experts, 0, choice).reshape(-1),
            weight.reshape(-1),
            self.experts.gate_up[...].astype(dtype),
            self.experts.down[...].astype(dtype),
        )
        with jax.named_scope("experts"):
            if cfg.moe_impl == "expert_parallel":
                y, dropped = _expert_parallel(cfg, *args)
            elif cfg.moe_impl == "padded":
                y, dropped = experts_padded(args[0], choice.reshape(-1), *args[2:], group_size=s,
                                            capacity_factor=cfg.expert_capacity_factor)
            else:
                y, dropped = EXPERT_IMPLS[cfg.moe_impl](*args), jnp.zeros((), jnp.int32)
        return y.reshape(b, s, h), router_state, choice, dropped


def _expert_parallel(cfg: ZayaConfig, *args: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Imported here: sharding/ builds on this package (placement imports the model), not the other way round.
    from sharding.expert_parallel import expert_parallel_ffn
    from sharding.rules import RULES

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or "expert" not in mesh.axis_names:
        raise ValueError("moe_impl 'expert_parallel' needs a mesh with an 'expert' axis: call the model under "
                         "jax.set_mesh(mesh) (zaya-train does)")
    return expert_parallel_ffn(
        *args, mesh=mesh, expert_axis="expert", token_axes=tuple(RULES["batch"]),
        transport=cfg.expert_parallel_transport, capacity_factor=cfg.expert_capacity_factor,
    )
