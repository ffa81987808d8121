"""The MoE block: the router, the SwiGLU experts' weights, and the token dispatch that `config.moe_impl` names.

    x [B, S, H] (normed), router_state [B, S, R] -> y [B, S, H], new router state, choice [B, S], dropped []

On one device the experts run as `zaya_jax.experts` computes them ("sorted": grouped matmul, or with fewer tokens
than experts each token's gathered expert weights; "dense": every expert;
"padded": capacity-padded einsum; "expert_parallel" needs a mesh). Under a mesh (`jax.set_mesh` with the
logical-axis rules installed, see `zaya_jax.axis_rules`), "sorted" and "expert_parallel" dispatch on every device
only the tokens it holds (`zaya_jax.parallel.expert_dispatch.experts_sharded`), the tokens being split over the
mesh axes of the logical "batch" and "length" axes: "sorted" moves tokens across the experts' mesh axis only when
that has size > 1 (dropless, by `expert_parallel_transport`); "expert_parallel" always runs expert parallelism over
it (size 1 included) and may have a capacity. "dense" and "padded" are partitioned by the compiler.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.axis_rules import installed_rules, mesh_axes, rule_axes
from zaya_jax.config import ZayaConfig
from zaya_jax.experts import experts_dense, experts_gathered, experts_padded, experts_sorted
from zaya_jax.layers import compute_dtype, dense_init
from zaya_jax.parallel.expert_dispatch import experts_sharded
from zaya_jax.router import Router


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
        x = x.astype(dtype)
        gate_up, down = self.experts.gate_up[...].astype(dtype), self.experts.down[...].astype(dtype)
        # The skip class (index E) runs through expert 0 with weight 0, except in "padded", where it takes no slot.
        expert = jnp.where(choice == cfg.num_experts, 0, choice)
        with jax.named_scope("experts"):
            if cfg.moe_impl == "padded":
                y, dropped = experts_padded(x.reshape(b * s, h), choice.reshape(-1), weight.reshape(-1), gate_up,
                                            down, group_size=s, capacity_factor=cfg.expert_capacity_factor)
            elif cfg.moe_impl == "dense":
                y = experts_dense(x.reshape(b * s, h), expert.reshape(-1), weight.reshape(-1), gate_up, down)
                dropped = jnp.zeros((), jnp.int32)
            else:
                y, dropped = _dispatch(cfg, x, expert, weight, gate_up, down)
        return y.reshape(b, s, h), router_state, choice, dropped


def _dispatch(cfg: ZayaConfig, x: jax.Array, expert: jax.Array, weight: jax.Array, gate_up: jax.Array,
              down: jax.Array) -> tuple[jax.Array, jax.Array]:
    """moe_impl "sorted" or "expert_parallel" on x [B, S, H], expert [B, S], weight [B, S] (and gate_up, down)
    -> (y [B, S, H], dropped)."""
    b, s, h = x.shape
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        if cfg.moe_impl == "expert_parallel":
            raise ValueError("moe_impl 'expert_parallel' needs a mesh with an 'expert' axis: call the model under "
                             "sharding.use_mesh(mesh) (zaya-train does)")
        # Fewer tokens than experts (decoding, short prompts): gathering their experts' weights reads less than the
        # grouped matmul, which on XLA:CPU computes every expert for every token.
        dispatch = experts_gathered if b * s < gate_up.shape[0] else experts_sorted
        y = dispatch(x.reshape(b * s, h), expert.reshape(-1), weight.reshape(-1), gate_up, down)
        return y.reshape(b, s, h), jnp.zeros((), jnp.int32)
    token_axes = mesh_axes(("batch", "length"), mesh)
    to_devices, from_devices = _device_order(mesh, b, s)
    x, expert, weight = to_devices(x), to_devices(expert), to_devices(weight)
    if cfg.moe_impl == "expert_parallel":
        named = tuple(a for a in rule_axes(installed_rules().get("expert")) if a in mesh.axis_names)
        if len(named) != 1:
            raise ValueError(f"moe_impl 'expert_parallel' needs the experts on one mesh axis; the logical-axis rules "
                             f"put them on {named or 'none'} of the mesh axes {mesh.axis_names}")
        expert_axis = named[0]
    else:
        split = mesh_axes(("expert",), mesh)
        if len(split) > 1:
            raise ValueError(f"expert dispatch: the experts are split over several mesh axes {split}; one is supported")
        expert_axis = split[0] if split else None
    y, dropped = experts_sharded(x, expert, weight, gate_up, down, mesh=mesh, token_axes=token_axes,
                                 expert_axis=expert_axis, transport=cfg.expert_parallel_transport,
                                 capacity_factor=cfg.expert_capacity_factor)
    return from_devices(y), dropped


def _device_order(mesh, b: int, s: int):
    """(to, back): [B, S, ...] -> the tokens [B * S, ...] in the order that makes each device's [B/p, S/q] tile
    (rows over the p-way "batch" axes, sequence over the q-way "length" axes) one contiguous block, block i * q + j
    on device (i, j), which is how the dispatch splits its token axis; and back. Without a sequence split that is
    the row-by-row order; with one, the row-by-row order would cut across the tiles and the compiler would gather
    the tokens to reorder them."""
    p = math.prod(mesh.shape[a] for a in mesh_axes(("batch",), mesh))
    q = math.prod(mesh.shape[a] for a in mesh_axes(("length",), mesh))
    if q == 1 or b % p or s % q:  # not split, or too few rows to split (decoding): the dispatch pads them
        return (lambda a: a.reshape(b * s, *a.shape[2:])), (lambda a: a.reshape(b, s, *a.shape[1:]))

    def to(a: jax.Array) -> jax.Array:
        return a.reshape(p, b // p, q, s // q, *a.shape[2:]).swapaxes(1, 2).reshape(b * s, *a.shape[2:])

    def back(a: jax.Array) -> jax.Array:
        return a.reshape(p, q, b // p, s // q, *a.shape[1:]).swapaxes(1, 2).reshape(b, s, *a.shape[1:])

    return to, back
