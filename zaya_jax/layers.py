"""Small building blocks shared by the ZAYA1 layers.

- `RMSNorm`: T5-style, `weight * x / rms(x)`, statistics in float32, no bias. x [..., D] -> [..., D].
- `Affine`: ZAYA's learned `(h + bias) * scale` on a [..., D] stream (the embedding's input affine).
- `ResidualScaling`: `(h + b_h) * s_h + (res + b_r) * s_r`, the learned residual merge; the residual stream is float32.
- `rotary_embedding` / `apply_partial_rope`: NeoX (rotate-half) RoPE on the first `rotary_dim` dims of each head.
- `dense_init`, `DTYPES`: the initializer and dtype table every module uses.
- `matmul`: x [..., in] @ w [in, out] in x's dtype with float32 accumulation (what every projection uses).
- `constrain`: pins a key activation to its logical layout (the installed `zaya_jax.axis_rules`) under a mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from zaya_jax.axis_rules import activation_spec
from zaya_jax.config import ZayaConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def param_dtype(config: ZayaConfig) -> jnp.dtype:
    return DTYPES[config.param_dtype]


def compute_dtype(config: ZayaConfig) -> jnp.dtype:
    return DTYPES[config.dtype]


def dense_init(config: ZayaConfig, rngs: nnx.Rngs, shape: tuple[int, ...]) -> nnx.Param:
    """A weight drawn from N(0, initializer_range^2), as transformers initialises ZAYA's linears and experts."""
    value = config.initializer_range * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(param_dtype(config)))


def constant_param(config: ZayaConfig, shape: tuple[int, ...], value: float) -> nnx.Param:
    return nnx.Param(jnp.full(shape, value, param_dtype(config)))


class RMSNorm(nnx.Module):
    """x [..., D] -> weight * x / sqrt(mean(x^2) + eps), in float32, cast back to x's dtype before the weight."""

    def __init__(self, config: ZayaConfig, size: int):
        self.weight = constant_param(config, (size,), 1.0)
        self.eps = config.rms_norm_eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * normed.astype(x.dtype)


class Affine(nnx.Module):
    """h [..., D] -> (h + bias) * scale (bias before scale, as ZAYA's checkpoints define it)."""

    def __init__(self, config: ZayaConfig, size: int):
        self.scale = constant_param(config, (size,), 1.0)
        self.bias = constant_param(config, (size,), 0.0)

    def __call__(self, h: jax.Array) -> jax.Array:
        return (h + self.bias[...].astype(h.dtype)) * self.scale[...].astype(h.dtype)


class ResidualScaling(nnx.Module):
    """Learned residual merge: h [..., D] (layer output) and residual [..., D] (float32) -> new float32 residual."""

    def __init__(self, config: ZayaConfig):
        self.hidden = Affine(config, config.hidden_size)
        self.residual = Affine(config, config.hidden_size)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.hidden(h).astype(jnp.float32) + self.residual(residual.astype(jnp.float32))


def constrain(x: jax.Array, kind: str) -> jax.Array:
    """Pins activation `kind` (a key of `zaya_jax.axis_rules.ACTIVATION_AXES`) to its layout under the installed
    logical-axis rules when the model runs under a mesh (`jax.set_mesh`); a no-op on one device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(kind, mesh))


def matmul(x: jax.Array, w: jax.Array, *, transpose_w: bool = False, out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [..., in] @ w [in, out] (w [out, in] with transpose_w) -> [..., out] in `out_dtype` (default x's dtype).

    The products accumulate in float32 and are rounded once, which is what a bfloat16 matmul does on every backend;
    asking for it explicitly matters on XLA:CPU, which otherwise runs a bfloat16-output matmul by converting the
    whole weight to float32 first. A single row (batch-1 decoding) is computed as two, because XLA:CPU sends a
    one-row bfloat16 matmul down the same convert-the-weight path: measured 5-10x slower than its bfloat16 kernel
    for the [2048, 262272] LM head."""
    single_row = x.ndim >= 2 and x.size == x.shape[-1]
    if single_row:
        x = jnp.concatenate([x, x], axis=0)
    spec = "...i,oi->...o" if transpose_w else "...i,io->...o"
    out = jnp.einsum(spec, x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    return (out[:1] if single_row else out).astype(x.dtype if out_dtype is None else out_dtype)


def rotary_embedding(positions: jax.Array, rotary_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """positions [B, S] int -> (cos, sin), each [B, S, rotary_dim] float32 (frequencies repeated for rotate-half)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_partial_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [B, S, heads, head_dim]; rotates x[..., :rotary_dim] (NeoX rotate-half), leaves the rest unchanged."""
    rotary_dim = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    rot, passthrough = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    return jnp.concatenate([rot * cos + rotated_half * sin, passthrough], axis=-1)
