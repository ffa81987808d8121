"""ZAYA1's PID-style router-bias balancer: per-layer expert-selection biases driven towards uniform expert load.

Every MoE layer l routes each token to one of C = E + 1 classes (E real experts, then the "skip" class, the LAST
index). A bias vector b_l [C] (float32, not a gradient-trained parameter) is added to the router probabilities for
expert *selection only*. After each global batch the biases take one AdamW step on the error signal

    grad b_{l,e} = p_{l,e} - 1/E        (e < E)

where p_{l,e} is the fraction of this batch's expert-routed tokens that layer l sent to expert e (ZAYA1-8B report
§II-A2). An over-used expert gets a positive error and its bias is pushed down; an under-used one is pushed up. The
skip bias starts at -1 and is, by default, never updated (`include_skip=False`); with `include_skip=True` the skip
class is balanced too: fractions over all C classes, target 1/C.

Shapes (L = MoE layers, C = E + 1 classes):
    choices [L, B, S] int   -> expert_counts -> counts [L, C] float32
    biases  [L, C] float32, BalancerState(step [], mu [L, C], nu [L, C])
    balancer_update(config, state, biases, counts) -> (biases [L, C], state, metrics {name: [L]})

The AdamW step (bias-corrected moments in float32, decoupled decay multiplied by lr, as torch.optim.AdamW):
    t = step + 1;  mu = b1 mu + (1 - b1) g;  nu = b2 nu + (1 - b2) g^2
    b <- b - lr * ( (mu / (1 - b1^t)) / (sqrt(nu / (1 - b2^t)) + eps) + weight_decay * b )
The published report gives no hyper-parameters; the defaults (lr 1e-3, betas 0.9/0.999, eps 1e-8, no decay) follow
a public third-party reimplementation.

Everything here is pure JAX without Python side effects: `balancer_update` can be jitted with `config` static
(`jax.jit(balancer_update, static_argnums=0)`; the config is a frozen, hashable dataclass).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class BalancerConfig:
    """Hyper-parameters of the router-bias balancer (see the module docstring for the update rule)."""

    enabled: bool = True  # update the router balancing biases every step (False: they stay as loaded)
    lr: float = 1e-3  # AdamW learning rate of the bias update (error = expert fraction - 1/E)
    b1: float = 0.9  # first-moment decay of the bias update
    b2: float = 0.999  # second-moment decay of the bias update
    eps: float = 1e-8  # epsilon of the bias update
    weight_decay: float = 0.0  # decay of the biases towards 0
    include_skip: bool = False  # balance the skip class too (fractions over E + 1 classes, target 1/(E + 1))

    def __post_init__(self) -> None:
        for name in ("enabled", "include_skip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"BalancerConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("lr", "b1", "b2", "eps", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"BalancerConfig.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.lr <= 0:
            raise ValueError(f"BalancerConfig.lr must be > 0, got {self.lr}")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"BalancerConfig.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.eps <= 0:
            raise ValueError(f"BalancerConfig.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"BalancerConfig.weight_decay must be >= 0, got {self.weight_decay}")


class BalancerState(NamedTuple):
    """AdamW state of the balancer, for all MoE layers at once.

    step: int32 [] — balancer updates taken so far (shared by all layers: it drives the bias correction).
    mu, nu: float32 [L, C] — first and second moments of the error signal.
    """

    step: jax.Array
    mu: jax.Array
    nu: jax.Array


def init_balancer(num_layers: int, num_classes: int) -> BalancerState:
    """Zero AdamW state for `num_layers` MoE layers of `num_classes` = E + 1 router classes."""
    _check_sizes(num_layers, num_classes)
    # Two distinct buffers: a train step that donates its state cannot donate one buffer twice.
    shape = (num_layers, num_classes)
    return BalancerState(step=jnp.zeros((), jnp.int32), mu=jnp.zeros(shape, jnp.float32), nu=jnp.zeros(shape, jnp.float32))


def init_biases(num_layers: int, num_classes: int, skip_bias: float = -1.0) -> jax.Array:
    """Initial balancing biases [L, C]: 0 for the real experts, `skip_bias` (ZAYA1: -1) for the last (skip) class."""
    _check_sizes(num_layers, num_classes)
    biases = jnp.zeros((num_layers, num_classes), jnp.float32)
    return biases.at[:, -1].set(skip_bias)


def expert_counts(choices: jax.Array, num_classes: int, mask: jax.Array | None = None) -> jax.Array:
    """Tokens per router class and layer: choices int [L, B, S] (values 0..E, E = skip) -> counts float32 [L, C].

    `mask` (1 = count, 0 = ignore, e.g. padding) is either per token, [B, S], shared by all layers, or per layer,
    with the full shape of `choices`. A trailing top-k axis, choices [L, B, S, K], is accepted as well (a [B, S]
    mask then covers all K choices of a token). Choices outside 0..C-1 are not counted.

    Counts are plain sums over tokens, so counts computed on separate data shards add up to the global batch's
    counts: the distributed step computes them per shard and `jax.lax.psum`s them over the data axes before calling
    `balancer_update`, which is what makes the balancing act on the *global* batch. float32 counts are exact up to
    2^24 tokens per class and layer; beyond that they round, which is harmless for the fractions derived from them.
    """
    if choices.ndim < 2:
        raise ValueError(f"expert_counts: choices must be [L, ...tokens], got shape {choices.shape}")
    # A one-hot compare + reduce, not a scatter-add: XLA fuses it into the reduction (the [.., C] one-hot is never
    # materialised), and it avoids the heavily contended atomics a scatter into C bins would be on accelerators.
    hits = choices[..., None] == jnp.arange(num_classes, dtype=choices.dtype)
    weights = hits.astype(jnp.float32)
    if mask is not None:
        mask = jnp.asarray(mask, jnp.float32)
        if mask.ndim != choices.ndim:
            if mask.ndim >= choices.ndim or mask.shape != choices.shape[1 : 1 + mask.ndim]:
                raise ValueError(
                    f"expert_counts: mask shape {mask.shape} is neither choices' shape {choices.shape} nor its "
                    f"token shape {choices.shape[1:]} (or a leading part of it)"
                )
            mask = mask.reshape((1,) + mask.shape + (1,) * (choices.ndim - 1 - mask.ndim))
        weights = weights * mask[..., None]
    return weights.sum(axis=tuple(range(1, choices.ndim)))


def balancer_update(
    config: BalancerConfig,
    state: BalancerState,
    biases: jax.Array,
    counts: jax.Array,
) -> tuple[jax.Array, BalancerState, dict[str, jax.Array]]:
    """One balancer step: biases [L, C] f32, counts [L, C] (global batch) -> (new biases, new state, metrics).

    The error signal is p - 1/N over the N balanced classes (the E real experts, or all C with `include_skip`),
    with p normalised over the tokens routed to those classes. Normalising over routed tokens, rather than over all
    tokens, keeps the error zero-sum: the balancer only redistributes load among experts and exerts no hidden
    pressure on the skip rate, which the router learns by gradient.

    Columns that are not balanced (the skip class unless `include_skip`) keep their bias and moments bit-for-bit.
    A layer whose balanced classes received no tokens in this batch is left unchanged (bias and moments); the
    shared `step` still advances, so the bias correction stays a function of the global step.

    With `config.enabled` False this is a no-op on biases *and* state (`step` does not advance either), so
    switching the balancer on later starts from a fresh bias correction; metrics are still computed.

    metrics (each float32 [L]), from the real experts' load fractions p (normalised over expert-routed tokens):
        routing_entropy  H(p) / ln E (1 = uniform, 0 = one expert takes everything; 0 log 0 = 0; 1 when E = 1)
        max_load, min_load  largest / smallest p_e (uniform: both 1/E)
        bias_range       max - min of the real experts' biases after the update
        skip_fraction    tokens routed to the skip class / all counted tokens
    A layer with no counted tokens reports 0 for every metric.
    """
    biases = jnp.asarray(biases, jnp.float32)
    counts = jnp.asarray(counts, jnp.float32)
    if biases.ndim != 2 or counts.shape != biases.shape:
        raise ValueError(
            f"balancer_update: biases and counts must both be [L, C], got {biases.shape} and {counts.shape}"
        )
    num_classes = biases.shape[-1]
    if num_classes < 2:
        raise ValueError(f"balancer_update: need >= 2 router classes (E >= 1 experts + skip), got {num_classes}")

    if config.enabled:
        new_biases, new_state = _adamw_step(config, state, biases, counts)
    else:
        new_biases, new_state = biases, state
    return new_biases, new_state, routing_metrics(counts, new_biases)


def routing_metrics(counts: jax.Array, biases: jax.Array) -> dict[str, jax.Array]:
    """The balancer's metrics (see `balancer_update`) from counts [L, C] and biases [L, C]; each value is [L]."""
    counts = jnp.asarray(counts, jnp.float32)
    num_experts = counts.shape[-1] - 1
    expert = counts[:, :num_experts]
    expert_total = expert.sum(axis=-1, keepdims=True)
    p = expert / jnp.maximum(expert_total, 1.0)
    safe_p = jnp.where(p > 0, p, 1.0)
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(safe_p), 0.0), axis=-1)
    if num_experts > 1:
        entropy = entropy / math.log(num_experts)
    else:
        # A single expert is trivially balanced (ln 1 = 0 would divide by zero).
        entropy = jnp.where(expert_total[:, 0] > 0, 1.0, 0.0)
    all_total = counts.sum(axis=-1)
    expert_biases = jnp.asarray(biases, jnp.float32)[:, :num_experts]
    return {
        "routing_entropy": entropy,
        "max_load": p.max(axis=-1),
        "min_load": p.min(axis=-1),
        "bias_range": expert_biases.max(axis=-1) - expert_biases.min(axis=-1),
        "skip_fraction": counts[:, num_experts] / jnp.maximum(all_total, 1.0),
    }


def _adamw_step(
    config: BalancerConfig, state: BalancerState, biases: jax.Array, counts: jax.Array
) -> tuple[jax.Array, BalancerState]:
    num_classes = biases.shape[-1]
    balanced = jnp.arange(num_classes) < (num_classes if config.include_skip else num_classes - 1)  # [C]
    num_balanced = num_classes if config.include_skip else num_classes - 1
    balanced_counts = jnp.where(balanced, counts, 0.0)
    total = balanced_counts.sum(axis=-1, keepdims=True)  # [L, 1]
    fraction = balanced_counts / jnp.maximum(total, 1.0)
    grad = jnp.where(balanced, fraction - 1.0 / num_balanced, 0.0)
    # Without tokens a layer has no load signal; stepping it anyway would let stale momentum move its biases.
    update = balanced & (total > 0)  # [L, C]

    step = state.step + 1
    t = step.astype(jnp.float32)
    mu = config.b1 * state.mu + (1.0 - config.b1) * grad
    nu = config.b2 * state.nu + (1.0 - config.b2) * grad * grad
    mu_hat = mu / (1.0 - config.b1**t)
    nu_hat = nu / (1.0 - config.b2**t)
    delta = config.lr * (mu_hat / (jnp.sqrt(nu_hat) + config.eps) + config.weight_decay * biases)
    new_biases = jnp.where(update, biases - delta, biases)
    new_state = BalancerState(
        step=step,
        mu=jnp.where(update, mu, state.mu),
        nu=jnp.where(update, nu, state.nu),
    )
    return new_biases, new_state


def _check_sizes(num_layers: int, num_classes: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2 (E >= 1 experts + the skip class), got {num_classes}")
