"""Tests for train/balancer.py: counts, the AdamW bias step against a float64 NumPy reference, metrics, and a
closed-loop simulation in which the balancer must equalise a router that strongly prefers one expert."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tolerances import ADAM_DEPTH, assert_float32_close
from train.balancer import (
    BalancerConfig,
    BalancerState,
    balancer_update,
    expert_counts,
    init_balancer,
    init_biases,
)

L, E = 3, 4
C = E + 1

# One compile per config instead of op-by-op dispatch (which compiles every primitive on first use).
_update = jax.jit(balancer_update, static_argnums=0)


def _np_adamw_reference(config: BalancerConfig, biases: np.ndarray, counts_seq: list[np.ndarray]) -> np.ndarray:
    """Independent float64 bias-corrected AdamW over the balancer's error signal, one row (layer) at a time."""
    b = biases.astype(np.float64).copy()
    n = C if config.include_skip else E
    m = np.zeros_like(b)
    v = np.zeros_like(b)
    for t, counts in enumerate(counts_seq, start=1):
        for layer in range(b.shape[0]):
            c = counts[layer, :n].astype(np.float64)
            if c.sum() == 0:
                continue
            g = c / c.sum() - 1.0 / n
            m[layer, :n] = config.b1 * m[layer, :n] + (1 - config.b1) * g
            v[layer, :n] = config.b2 * v[layer, :n] + (1 - config.b2) * g**2
            m_hat = m[layer, :n] / (1 - config.b1**t)
            v_hat = v[layer, :n] / (1 - config.b2**t)
            b[layer, :n] -= config.lr * (m_hat / (np.sqrt(v_hat) + config.eps) + config.weight_decay * b[layer, :n])
    return b


def _random_counts(rng: np.random.Generator, zero_layer: int | None = None) -> np.ndarray:
    counts = rng.integers(0, 200, size=(L, C)).astype(np.float32)
    if zero_layer is not None:
        counts[zero_layer] = 0.0
    return counts


@pytest.mark.parametrize(
    "config",
    [
        BalancerConfig(),
        BalancerConfig(lr=1e-2, b1=0.8, b2=0.99, weight_decay=0.1),
        BalancerConfig(lr=3e-3, include_skip=True),
    ],
    ids=["defaults", "decay", "include_skip"],
)
def test_update_matches_numpy_adamw(config: BalancerConfig) -> None:
    rng = np.random.default_rng(0)
    biases = np.asarray(init_biases(L, C)) + rng.normal(0, 0.05, (L, C)).astype(np.float32)
    biases[:, -1] = -1.0
    # Layer 1 gets no tokens on step 2: its bias and moments must stay put that step.
    counts_seq = [_random_counts(rng), _random_counts(rng, zero_layer=1), _random_counts(rng), _random_counts(rng)]

    state = init_balancer(L, C)
    b = jnp.asarray(biases)
    for counts in counts_seq:
        b, state, _ = _update(config, state, b, jnp.asarray(counts))
    assert int(state.step) == len(counts_seq)
    expected = _np_adamw_reference(config, biases, counts_seq)
    # float32 against float64: loads normalise C counts, then one AdamW step per batch (tests/tolerances.py).
    assert_float32_close(b, expected, terms=C, depth=ADAM_DEPTH * len(counts_seq))
    if not config.include_skip:
        assert np.all(np.asarray(b)[:, -1] == -1.0)
        assert np.all(np.asarray(state.mu)[:, -1] == 0.0)


def test_direction_over_used_expert_goes_down() -> None:
    counts = jnp.asarray([[70.0, 10.0, 10.0, 10.0, 5.0]])
    b, _, _ = _update(BalancerConfig(), init_balancer(1, C), init_biases(1, C), counts)
    b = np.asarray(b)[0]
    assert b[0] < 0 and np.all(b[1:E] > 0)
    # First Adam step moves every balanced bias by lr * |g| / (|g| + eps) regardless of the error's size: lr to within
    # eps / |g| (1e-8 / 0.05 here), far inside rtol 1e-4, which a wrong step size would leave.
    np.testing.assert_allclose(np.abs(b[:E]), 1e-3, rtol=1e-4)
    assert b[E] == -1.0


def test_zero_token_layer_unchanged() -> None:
    rng = np.random.default_rng(1)
    config = BalancerConfig(lr=1e-2)
    state = init_balancer(L, C)
    b = init_biases(L, C)
    b, state, _ = _update(config, state, b, jnp.asarray(_random_counts(rng)))
    counts = _random_counts(rng, zero_layer=2)
    counts[0, :E] = 0.0  # layer 0: only skipped tokens, so no expert load signal either
    counts[0, E] = 50.0
    b2, state2, metrics = _update(config, state, b, jnp.asarray(counts))
    for layer in (0, 2):
        np.testing.assert_array_equal(np.asarray(b2)[layer], np.asarray(b)[layer])
        np.testing.assert_array_equal(np.asarray(state2.mu)[layer], np.asarray(state.mu)[layer])
        np.testing.assert_array_equal(np.asarray(state2.nu)[layer], np.asarray(state.nu)[layer])
    assert not np.array_equal(np.asarray(b2)[1], np.asarray(b)[1])
    assert float(metrics["skip_fraction"][0]) == 1.0
    assert float(metrics["routing_entropy"][2]) == 0.0 and float(metrics["skip_fraction"][2]) == 0.0


def test_disabled_is_noop_but_reports_metrics() -> None:
    state = init_balancer(L, C)
    b = init_biases(L, C)
    counts = jnp.asarray(np.random.default_rng(2).integers(1, 100, (L, C)).astype(np.float32))
    b2, state2, metrics = _update(BalancerConfig(enabled=False), state, b, counts)
    np.testing.assert_array_equal(np.asarray(b2), np.asarray(b))
    assert int(state2.step) == 0
    assert set(metrics) == {"routing_entropy", "max_load", "min_load", "bias_range", "skip_fraction"}
    assert all(v.shape == (L,) for v in metrics.values())


def test_skip_bias_stays_minus_one_over_many_steps() -> None:
    rng = np.random.default_rng(3)
    config = BalancerConfig(lr=5e-2, weight_decay=0.5)
    state, b = init_balancer(L, C), init_biases(L, C)
    for _ in range(20):
        b, state, _ = _update(config, state, b, jnp.asarray(_random_counts(rng)))
    assert np.all(np.asarray(b)[:, -1] == -1.0)
    # ... and it does move once the skip class is balanced too.
    b2, _, _ = _update(BalancerConfig(include_skip=True), init_balancer(L, C), init_biases(L, C),
                               jnp.asarray(_random_counts(rng)))
    assert np.all(np.asarray(b2)[:, -1] != -1.0)


def test_expert_counts_matches_bincount() -> None:
    rng = np.random.default_rng(4)
    choices = rng.integers(0, C, size=(L, 2, 16)).astype(np.int32)
    counts = jax.jit(expert_counts, static_argnums=1)(jnp.asarray(choices), C)
    assert counts.dtype == jnp.float32 and counts.shape == (L, C)
    expected = np.stack([np.bincount(choices[layer].ravel(), minlength=C) for layer in range(L)])
    np.testing.assert_array_equal(np.asarray(counts), expected)


def test_expert_counts_mask() -> None:
    rng = np.random.default_rng(5)
    choices = rng.integers(0, C, size=(L, 2, 16)).astype(np.int32)
    token_mask = np.ones((2, 16), np.int32)
    token_mask[0, 10:] = 0  # padding
    token_mask[1, :3] = 0
    counts = jax.jit(expert_counts, static_argnums=1)(jnp.asarray(choices), C, jnp.asarray(token_mask))
    expected = np.stack([np.bincount(choices[layer][token_mask == 1], minlength=C) for layer in range(L)])
    np.testing.assert_array_equal(np.asarray(counts), expected)
    assert float(counts.sum()) == L * token_mask.sum()

    layer_mask = rng.integers(0, 2, size=choices.shape)
    counts = expert_counts(jnp.asarray(choices), C, jnp.asarray(layer_mask))
    expected = np.stack([np.bincount(choices[layer][layer_mask[layer] == 1], minlength=C) for layer in range(L)])
    np.testing.assert_array_equal(np.asarray(counts), expected)

    with pytest.raises(ValueError, match="mask shape"):
        expert_counts(jnp.asarray(choices), C, jnp.ones((3, 16)))


def test_expert_counts_sum_over_shards() -> None:
    rng = np.random.default_rng(6)
    choices = jnp.asarray(rng.integers(0, C, size=(L, 4, 8)).astype(np.int32))
    whole = expert_counts(choices, C)
    shards = expert_counts(choices[:, :2], C) + expert_counts(choices[:, 2:], C)
    np.testing.assert_array_equal(np.asarray(whole), np.asarray(shards))


def test_metrics_hand_values() -> None:
    counts = jnp.asarray(
        [
            [25.0, 25.0, 25.0, 25.0, 0.0],  # uniform
            [0.0, 80.0, 0.0, 0.0, 20.0],  # one-hot, 20% skipped
            [50.0, 50.0, 0.0, 0.0, 100.0],  # two of four experts, half skipped
        ]
    )
    biases = jnp.asarray(
        [[0.0, 0.0, 0.0, 0.0, -1.0], [0.3, -0.2, 0.1, 0.0, -1.0], [1.0, 1.0, 1.0, 1.0, -1.0]], jnp.float32
    )
    _, _, m = _update(BalancerConfig(enabled=False), init_balancer(3, C), biases, counts)
    # float32 against exact values: sums over the 4 experts, a division, a log (3 chained steps).
    for key, want in (("routing_entropy", [1.0, 0.0, math.log(2) / math.log(4)]), ("max_load", [0.25, 1.0, 0.5]),
                      ("min_load", [0.25, 0.0, 0.0]), ("bias_range", [0.0, 0.5, 0.0]),
                      ("skip_fraction", [0.0, 0.2, 0.5])):
        assert_float32_close(m[key], want, terms=4, depth=3, name=key)


def _simulate(config: BalancerConfig, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed per-token router probabilities that favour expert 0; selection = argmax(probs + bias)."""
    layers, tokens = 2, 4096
    logits = jax.random.normal(jax.random.key(0), (layers, tokens, C))
    probs = jax.nn.softmax(logits.at[..., 0].add(3.0), axis=-1)  # [2, 4096, C]

    @jax.jit
    def step(carry, _):
        biases, state = carry
        choices = jnp.argmax(probs + biases[:, None, :], axis=-1)  # [2, 4096]
        counts = expert_counts(choices[:, None, :], C)
        biases, state, metrics = balancer_update(config, state, biases, counts)
        return (biases, state), metrics["routing_entropy"]

    (biases, _), entropies = jax.lax.scan(step, (init_biases(layers, C), init_balancer(layers, C)), None, steps)
    return np.asarray(entropies), np.asarray(biases)


def test_closed_loop_balances_a_skewed_router() -> None:
    steps = 150  # with lr 1e-2 the entropy passes 0.99 after ~75 steps (a +3 logit on expert 0 to offset)
    entropies, biases = _simulate(BalancerConfig(lr=1e-2), steps)
    assert entropies[0].max() < 0.3  # the router alone is badly unbalanced
    assert np.all(entropies[-20:] > 0.95), entropies[-20:]
    assert np.all(biases[:, 0] < biases[:, 1:E].min(axis=1))  # the favoured expert was pushed down
    assert np.all(biases[:, -1] == -1.0)

    off, _ = _simulate(BalancerConfig(lr=1e-2, enabled=False), steps)
    assert np.all(off < 0.3)


def test_init_shapes() -> None:
    state = init_balancer(L, C)
    assert isinstance(state, BalancerState)
    assert state.step.dtype == jnp.int32 and state.step.shape == ()
    assert state.mu.shape == state.nu.shape == (L, C) and state.mu.dtype == jnp.float32
    b = init_biases(L, C)
    np.testing.assert_array_equal(np.asarray(b[:, :E]), 0.0)
    np.testing.assert_array_equal(np.asarray(b[:, E]), -1.0)
    # The state is a pytree that jit can carry.
    assert len(jax.tree.leaves(state)) == 3


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": -1e-3}, "lr"),
        ({"b1": 1.0}, "b1"),
        ({"b2": -0.1}, "b2"),
        ({"eps": 0.0}, "eps"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"lr": float("nan")}, "lr"),
        ({"enabled": 1}, "enabled"),
        ({"include_skip": "no"}, "include_skip"),
    ],
)
def test_config_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"BalancerConfig\.{field}\b"):
        BalancerConfig(**kwargs)


def test_bad_shapes() -> None:
    with pytest.raises(ValueError):
        init_balancer(0, C)
    with pytest.raises(ValueError):
        init_balancer(L, 1)
    with pytest.raises(ValueError, match="biases and counts"):
        balancer_update(BalancerConfig(), init_balancer(L, C), init_biases(L, C), jnp.zeros((L, C + 1)))
