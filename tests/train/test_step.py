"""The jitted train step: loss against an independent computation, accumulation, bad-step skipping, balancer."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tolerances import (assert_float32_close, cross_entropy_bound, float32_bound, model_depth, model_terms,
                              scaled_error)
from train.balancer import BalancerConfig
from train.config import load_train_config
from train.data import ByteTokenizer, generate_problems, make_dataset
from train.data.sources import SyntheticSource
from train.optim import OptimizerConfig, make_optimizer
from train.step import init_train_state, make_train_step, step_batch, token_losses
from zaya_jax import init_model

TINY = load_train_config("configs/tiny.yaml").model


def _batch(batch_size: int = 4, seq_len: int = 64, seed: int = 0) -> dict[str, jnp.ndarray]:
    ds = make_dataset(SyntheticSource(seed=seed), ByteTokenizer(), seq_len, batch_size, seed=seed, num_threads=0)
    raw = next(iter(ds))
    return {k: jnp.asarray(v) for k, v in step_batch(raw).items()}


def _setup(balancer=BalancerConfig(), accumulation_steps=1, model=None):
    """(graphdef, initial state, jitted step); steps for the default model are compiled once per module."""
    if model is None:
        return _default_setup(balancer, accumulation_steps)
    return _build(balancer, accumulation_steps, model)


@functools.lru_cache(maxsize=None)
def _default_setup(balancer, accumulation_steps):
    return _build(balancer, accumulation_steps, init_model(TINY, seed=0))


def _build(balancer, accumulation_steps, model):
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, total_steps=100), params)
    graphdef, state = init_train_state(model, optimizer, seed=0)
    step = jax.jit(make_train_step(graphdef, optimizer, balancer, TINY.router_classes,
                                   accumulation_steps=accumulation_steps, z_loss=1e-3))
    return graphdef, state, step


def test_loss_equals_masked_cross_entropy_from_the_logits():
    graphdef, state, step = _setup()
    batch = _batch()
    _, metrics = step(state, batch)
    model = nnx.merge(graphdef, state.params, state.biases)
    logits = np.asarray(model(batch["tokens"], segment_ids=batch["segment_ids"], positions=batch["positions"]),
                        np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    targets, mask = np.asarray(batch["targets"]), np.asarray(batch["target_mask"], np.float64)
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    assert mask.sum() > 50
    # The step's own float32 forward (the same model, another program), then a log-sum-exp over the vocabulary
    # and a mean over the tokens (tests/tolerances.py).
    want = (nll * mask).sum() / mask.sum()
    logits_bound = float32_bound(model_terms(TINY, logits.shape[1]), model_depth(TINY.num_layers))
    assert abs(float(metrics["loss"]) - want) <= cross_entropy_bound(
        max_abs_logit=float(np.abs(logits).max()), logits_bound=logits_bound, loss=want, vocab=TINY.vocab_size,
        tokens=int(mask.size))
    # z-loss squares log Z: twice the relative error of log Z, whose sums are the model's, the log-sum-exp's and
    # the tokens' mean.
    assert_float32_close(metrics["z_loss"], (log_z**2 * mask).sum() / mask.sum(),
                         terms=max(model_terms(TINY, logits.shape[1]), TINY.vocab_size, int(mask.size)),
                         depth=2 * (model_depth(TINY.num_layers) + 2), name="z_loss")


def test_accumulated_micro_batches_equal_one_batch():
    batch = _batch(batch_size=4)
    _, state, one = _setup(accumulation_steps=1)
    _, _, two = _setup(accumulation_steps=2)
    new_one, m_one = one(state, batch)
    new_two, m_two = two(state, batch)
    # Two micro-batch means averaged against one mean over all tokens: the same terms, summed in another order.
    assert_float32_close(m_one["loss"], m_two["loss"], terms=int(batch["target_mask"].size))
    np.testing.assert_allclose(np.asarray(m_one["expert_load"]), np.asarray(m_two["expert_load"]))
    # Adam divides by sqrt(nu): gradients that are ~0 in float32 become sign-like updates, so compare the updates
    # at 1% of the step size (lr 1e-3) rather than elementwise-relative.
    for a, b in zip(jax.tree.leaves(new_one.params), jax.tree.leaves(new_two.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new_one.params), jax.tree.leaves(state.params))]
    assert all(changed)


def test_non_finite_loss_skips_the_update():
    _, state, step = _setup()
    poisoned = jax.tree.map(lambda x: x, state.params)
    poisoned["final_norm"]["weight"][...] = poisoned["final_norm"]["weight"][...].at[0].set(jnp.nan)
    state = state._replace(params=poisoned)
    new_state, metrics = step(state, _batch())
    assert int(metrics["skipped"]) == 1 and not np.isfinite(float(metrics["loss"]))
    for a, b in zip(jax.tree.leaves((state.params, state.biases, state.opt_state, state.balancer)),
                    jax.tree.leaves((new_state.params, new_state.biases, new_state.opt_state, new_state.balancer))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(new_state.step) == 1


def test_biases_are_not_trained_by_the_optimizer_and_are_updated_by_the_balancer():
    _, state, step = _setup()
    new_state, metrics = step(state, _batch())
    old_bias = np.asarray(jax.tree.leaves(state.biases)[0])
    new_bias = np.asarray(jax.tree.leaves(new_state.biases)[0])
    load = np.asarray(metrics["expert_load"])
    # AdamW's first step moves every expert's bias by ~lr against the sign of (load - 1/E).
    expected = old_bias[:, :-1] - 1e-3 * np.sign(load - 1.0 / TINY.num_experts)
    # Adam's first step is lr * g / (|g| + eps): off the sign by lr * eps / |g| < 1e-9 here; float32 keeps a bias
    # of magnitude <= 1 to within its spacing at 1 (1.2e-7).
    np.testing.assert_allclose(new_bias[:, :-1], expected, atol=1e-6)
    assert (new_bias[:, -1] == -1.0).all()


def _collapsed_model(seed: int = 0):
    """Every layer's router sends all tokens to expert 0 at init: one hidden unit of the router MLP is pinned at
    gelu(4) ~ 4 by its bias and feeds expert 0's logit (+3.2), while the scaled-up output matrix keeps the
    per-token preferences diverse (a router whose tokens all score alike cannot be split by any bias)."""
    model = init_model(TINY, seed=seed)
    router = model.layers.moe.router
    router.fc2_bias[...] = router.fc2_bias[...].at[:, 0].set(4.0)
    router.out_proj[...] = (router.out_proj[...] * 30.0).at[:, 0, 0].add(0.8)
    return model


BALANCER_STEPS = 200


@pytest.mark.parametrize("enabled", [True, False])
def test_balancer_lifts_a_collapsed_router_to_uniform_load(enabled):
    """Tiny preset, 4 x 128 tokens per step, model lr 1e-3, balancer lr 0.01: every layer's normalized routing
    entropy starts at 0 and passes 0.95 within 200 steps with the balancer on; off, it stays collapsed."""
    graphdef, state, step = _setup(balancer=BalancerConfig(enabled=enabled, lr=0.01), model=_collapsed_model())
    ds = iter(make_dataset(SyntheticSource(seed=1), ByteTokenizer(), 128, 4, seed=1, num_threads=0))
    entropies = []
    for _ in range(BALANCER_STEPS):
        raw = next(ds)
        state, metrics = step(state, {k: jnp.asarray(v) for k, v in step_batch(raw).items()})
        entropies.append(np.asarray(metrics["routing_entropy"]))
    entropies = np.stack(entropies)  # [steps, layers]
    assert entropies[0].max() < 0.05, entropies[0]  # the init really is collapsed
    if enabled:
        assert (entropies.max(axis=0) > 0.95).all(), entropies.max(axis=0)
        # Adam on the biases at a constant lr keeps oscillating around balance; on average it stays near it.
        assert (entropies[-50:].mean(axis=0) > 0.7).all(), entropies[-50:].mean(axis=0)
    else:
        assert entropies.max() < 0.6, entropies.max(axis=0)


def test_bf16_compute_with_fp32_master_weights_and_muon():
    """Muon + AdamW groups on the real parameter tree, bfloat16 compute, float32 master weights."""
    bf16 = TINY.replace(dtype="bfloat16")
    model = init_model(bf16, seed=0)
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(OptimizerConfig(name="muon", lr=1e-3, warmup_steps=0, total_steps=10), params)
    graphdef, state = init_train_state(model, optimizer, seed=0)
    step = jax.jit(make_train_step(graphdef, optimizer, BalancerConfig(), bf16.router_classes))
    batch = _batch()
    new_state, metrics = step(state, batch)
    _, _, fp32_step = _setup()
    _, fp32_metrics = fp32_step(_setup()[1], batch)  # same seed-0 weights, float32 compute
    # bfloat16 compute rounds each chained step's activations to 8 significant bits (2^-8 near 1); the loss
    # averages the rounding over many tokens, so a few roundings' worth bounds it: 4 x 2^-8 < 2e-2.
    assert scaled_error(metrics["loss"], fp32_metrics["loss"]) <= 2e-2
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(new_state.params))
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(params))]
    assert min(moved) > 0


def test_chunked_lm_head_loss_equals_the_whole_computation_and_its_gradients():
    graphdef, state, _ = _setup()
    batch = _batch(batch_size=2, seq_len=64)

    def mean_loss(params, chunk):
        nll, log_z, _ = token_losses(graphdef, params, state.biases, batch, chunk)
        return jnp.sum(nll * batch["target_mask"]) / jnp.sum(batch["target_mask"]) + 1e-3 * jnp.mean(log_z**2)

    value_and_grad = jax.jit(jax.value_and_grad(mean_loss), static_argnums=1)
    whole, whole_grads = value_and_grad(state.params, 0)
    chunked = value_and_grad.lower(state.params, 24).compile()  # 24 does not divide 64: the last chunk is padded
    loss, grads = chunked(state.params)
    # The same model in two programs; the chunked loss sums the tokens per chunk and then the chunks.
    logits = nnx.merge(graphdef, state.params, state.biases)(batch["tokens"], segment_ids=batch["segment_ids"],
                                                              positions=batch["positions"])
    logits_bound = float32_bound(model_terms(TINY, 64), model_depth(TINY.num_layers))
    # Doubled for the z-loss term: its weight 1e-3 times d(log Z^2) = 2 log Z (~11 here) is < 1 per unit error.
    assert abs(float(loss) - float(whole)) <= 2 * cross_entropy_bound(
        max_abs_logit=float(jnp.abs(logits).max()), logits_bound=logits_bound, loss=float(whole),
        vocab=TINY.vocab_size, tokens=2 * 64)
    terms = max(model_terms(TINY, 64), TINY.vocab_size, 2 * 64)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(whole_grads)):
        assert_float32_close(g, w, terms=terms, depth=model_depth(TINY.num_layers, backward=True) + 2)
    # The chunked step never holds [B, S, V] logits: no buffer of that size in the compiled backward.
    vocab = TINY.vocab_size
    hlo = chunked.as_text()
    assert f"f32[2,64,{vocab}]" not in hlo and f"f32[2,24,{vocab}]" in hlo
