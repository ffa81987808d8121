"""Top-1 mixture of SwiGLU experts: token dispatch and expert compute.

Expert weights (transformers' fused layout, stored input-major): gate_up [E, H, 2I] (first I outputs = gate,
second I = up), down [E, I, H]. For tokens x [T, H] routed to expert e_t with weight p_t:

    y_t = p_t * (silu(x_t Wg[e_t]) * (x_t Wu[e_t])) Wd[e_t]          # y [T, H]

Skip-class tokens arrive with p_t = 0 and any valid expert index; their output is zero. Two dropless
implementations compute the same y:
- `experts_sorted`: sort tokens by expert, grouped matmul (`jax.lax.ragged_dot`) over contiguous groups, unsort.
- `experts_dense`: every token through every expert, then select (E times the FLOPs; the reference).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.config import ZayaConfig
from zaya_jax.layers import compute_dtype, dense_init
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
