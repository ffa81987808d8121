"""The ZAYA1 router ("MoE++"): an MLP router with the EDA state carried between layers (reference section 4.1).

For x [B, S, H] (the RMS-normed MoE input) and the previous layer's router state r_prev [B, S, R]:

    r      = x W_down + b_down + eda_scale * r_prev          # EDA; r_prev is zero for the first layer
    logits = W_out gelu(W_2 gelu(W_1 RMSNorm(r) + b_1) + b_2)  # [B, S, E + 1]; the last class is "skip"
    probs  = softmax(logits) in float32
    choice = argmax(stop_gradient(probs) + balancing_bias)   # the bias steers selection only
    weight = probs[choice]                                   # not renormalized; gradients reach the router here

If the skip class wins, the token's MoE output is zero (weight 0), as transformers does. The balancing bias is a
`BalancingBias` variable, not an `nnx.Param`: the optimizer never sees it; the training loop's balancer updates it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.config import ZayaConfig
from zaya_jax.layers import RMSNorm, compute_dtype, constant_param, dense_init, matmul


class BalancingBias(nnx.Variable):
    """Per-class router bias for expert selection [E + 1] float32; updated by the balancer, never by gradients."""


class Router(nnx.Module):
    def __init__(self, config: ZayaConfig, *, rngs: nnx.Rngs):
        self.config = config
        r = config.router_hidden_size
        self.down_proj = dense_init(config, rngs, (config.hidden_size, r))
        self.down_proj_bias = constant_param(config, (r,), 0.0)
        # The first layer's scale multiplies the zero initial state: it is a placeholder, absent from checkpoints.
        self.eda_scale = constant_param(config, (r,), 1.0)
        self.norm = RMSNorm(config, r)
        self.fc1 = dense_init(config, rngs, (r, r))
        self.fc1_bias = constant_param(config, (r,), 0.0)
        self.fc2 = dense_init(config, rngs, (r, r))
        self.fc2_bias = constant_param(config, (r,), 0.0)
        self.out_proj = dense_init(config, rngs, (r, config.router_classes))
        bias = jnp.zeros((config.router_classes,), jnp.float32).at[-1].set(-1.0)
        self.balancing_bias = BalancingBias(bias)

    def __call__(
        self, x: jax.Array, router_state: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        """x [B, S, H], router_state [B, S, R] -> (probs [B, S, E+1] f32, choice [B, S] int32 in 0..E,
        weight [B, S] f32 (zero for the skip class), new router_state [B, S, R])."""
        dtype = compute_dtype(self.config)
        x = x.astype(dtype)
        state = matmul(x, self.down_proj[...]) + self.down_proj_bias[...].astype(dtype)
        state = state + router_state.astype(dtype) * self.eda_scale[...].astype(dtype)
        h = self.norm(state)
        h = jax.nn.gelu(matmul(h, self.fc1[...]) + self.fc1_bias[...].astype(dtype), approximate=False)
        h = jax.nn.gelu(matmul(h, self.fc2[...]) + self.fc2_bias[...].astype(dtype), approximate=False)
        logits = matmul(h, self.out_proj[...])
        probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
        choice = jnp.argmax(jax.lax.stop_gradient(probs) + self.balancing_bias[...], axis=-1).astype(jnp.int32)
        weight = jnp.take_along_axis(probs, choice[..., None], axis=-1)[..., 0]
        weight = jnp.where(choice == self.config.num_experts, 0.0, weight)
        return probs, choice, weight, state
