"""Model structure: parameter counts, the scan over layers, expert dispatch and the functional (split/merge) use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zaya_jax import BalancingBias, ZayaForCausalLM, init_model, load_preset, parameter_counts
from tests.tolerances import EXPERT_DEPTH, EXPERT_GRAD_DEPTH, assert_float32_close, model_depth, model_terms
from zaya_jax.experts import experts_dense, experts_gathered, experts_padded, experts_sorted


def test_zaya1_8b_parameter_counts_without_allocating():
    counts = parameter_counts(load_preset("zaya1-8b"))
    assert round(counts.total / 1e9, 2) == 8.84
    assert round(counts.active_non_embedding / 1e9, 3) == 0.754
    # Independent count from the reference's per-block figures (section 1.5), not from the model code.
    cca, expert, router, embed = 5_575_682, 12_582_912, 660_992, 262272 * 2048
    norms_and_scales = 2 * 2048 + 8 * 2048
    per_layer_shared = cca + router + norms_and_scales
    layers = 40
    non_embedding = layers * (per_layer_shared + 16 * expert) - 256 + 3 * 2048  # layer 0: no EDA scale; + input affine, final norm
    assert counts.non_embedding == non_embedding
    assert counts.total == non_embedding + embed
    assert counts.active_non_embedding == layers * (per_layer_shared + expert) - 256 + 3 * 2048


def test_layers_run_as_one_scan_so_the_program_does_not_grow_with_depth():
    def program_size(num_layers: int) -> int:
        config = load_preset("tiny").replace(num_layers=num_layers)
        model = nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))
        graphdef, state = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, jnp.zeros((1, 8), jnp.int32))
        return len(jaxpr.jaxpr.eqns)

    assert program_size(4) == program_size(40)


def make_routed_tokens():
    """37 tokens of width 8 routed among 4 experts of 6 units: (x, expert, weight, gate_up, down)."""
    rng = np.random.default_rng(0)
    tokens, hidden, inner, experts = 37, 8, 6, 4
    x = jnp.asarray(rng.normal(size=(tokens, hidden)), jnp.float32)
    expert = jnp.asarray(rng.integers(0, experts, tokens), jnp.int32)
    weight = jnp.asarray(rng.uniform(size=tokens), jnp.float32)
    gate_up = jnp.asarray(rng.normal(size=(experts, hidden, 2 * inner)), jnp.float32)
    down = jnp.asarray(rng.normal(size=(experts, inner, hidden)), jnp.float32)
    return x, expert, weight, gate_up, down


@pytest.fixture(scope="module")
def routed_tokens():
    return make_routed_tokens()


def test_sorted_dispatch_matches_dense_and_numpy_float64(routed_tokens):
    x, expert, weight, gate_up, down = map(np.asarray, routed_tokens)
    inner = down.shape[1]
    ref = np.zeros_like(x, np.float64)
    for t in range(x.shape[0]):  # float64 loop over tokens, independent of both implementations
        h = x[t].astype(np.float64) @ gate_up[expert[t]].astype(np.float64)
        gate, up = h[:inner], h[inner:]
        ref[t] = weight[t] * ((gate / (1 + np.exp(-gate)) * up) @ down[expert[t]])
    for fn in (experts_sorted, experts_gathered, experts_dense):
        assert_float32_close(fn(*routed_tokens), ref, terms=x.shape[1], depth=EXPERT_DEPTH, name=fn.__name__)


def _cotangent(shape) -> jnp.ndarray:
    # A linear loss with random weights: every output element gets its own cotangent, and the gradients are as
    # well conditioned as the outputs (a loss like sum(sin(y)) would amplify y's rounding by max |y|).
    return jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)


def test_sorted_dispatch_gradients_match_dense(routed_tokens):
    cotangent = _cotangent(routed_tokens[0].shape)

    def loss(fn, x, weight, gate_up, down):
        y = fn(x, routed_tokens[1], weight, gate_up, down)
        return jnp.sum(y * cotangent)

    args = (routed_tokens[0], *routed_tokens[2:])
    g_dense = jax.grad(lambda *a: loss(experts_dense, *a), argnums=(0, 1, 2, 3))(*args)
    for fn in (experts_sorted, experts_gathered):
        grads = jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2, 3))(*args)
        for name, a, b in zip(("x", "weight", "gate_up", "down"), grads, g_dense):
            # gate_up's and down's gradients sum over every token.
            assert_float32_close(a, b, terms=len(args[0]), depth=EXPERT_GRAD_DEPTH, name=f"{fn.__name__} {name}")


def _padded_reference(x, expert, weight, gate_up, down, group_size, capacity):
    """float64 loop: within each group, expert e serves its first `capacity` tokens by position; the skip class
    (id E) and tokens past capacity get 0. -> (y, kept mask)."""
    num_experts, inner = gate_up.shape[0], down.shape[1]
    y, kept = np.zeros(x.shape, np.float64), np.zeros(len(x), bool)
    for start in range(0, len(x), group_size):
        served = [0] * num_experts
        for t in range(start, start + group_size):
            if expert[t] == num_experts or served[expert[t]] == capacity:
                continue
            served[expert[t]] += 1
            kept[t] = True
            h = x[t].astype(np.float64) @ gate_up[expert[t]].astype(np.float64)
            gate, up = h[:inner], h[inner:]
            y[t] = weight[t] * ((gate / (1 + np.exp(-gate)) * up) @ down[expert[t]])
    return y, kept


def test_padded_experts_drop_past_capacity_and_count_it(routed_tokens):
    """Groups of 8 tokens, 4 experts, capacity factor 1 (2 slots per expert per group), two skip-class tokens."""
    x, expert, weight, gate_up, down = routed_tokens
    x, weight = x[:32], weight[:32]
    expert = np.asarray(expert[:32]).copy()
    expert[[3, 17]] = 4  # the skip class takes no slot
    ref, kept = _padded_reference(*map(np.asarray, (x, expert, weight, gate_up, down)), group_size=8, capacity=2)
    assert 0 < (~kept).sum() - 2 < 30  # some routed tokens are dropped, most are not
    y, dropped = experts_padded(x, jnp.asarray(expert), weight, gate_up, down, group_size=8, capacity_factor=1.0)
    assert int(dropped) == int((~kept).sum()) - 2
    assert_float32_close(y, ref, terms=x.shape[1], depth=EXPERT_DEPTH)

    # Gradients: those of the dense reference with the unserved tokens' weights zeroed, except d/dweight of an
    # unserved token, which is 0 (its output does not depend on its weight).
    cotangent = _cotangent(x.shape)

    def loss(fn, x, weight, gate_up, down):
        return jnp.sum(fn(x, weight, gate_up, down) * cotangent)

    padded = lambda x, w, gu, d: experts_padded(x, jnp.asarray(expert), w, gu, d, group_size=8,  # noqa: E731
                                                capacity_factor=1.0)[0]
    dense = lambda x, w, gu, d: experts_dense(x, jnp.asarray(np.where(kept, expert, 0)), w * kept, gu, d)  # noqa: E731
    got = jax.grad(lambda *a: loss(padded, *a), argnums=(0, 1, 2, 3))(x, weight, gate_up, down)
    want = list(jax.grad(lambda *a: loss(dense, *a), argnums=(0, 1, 2, 3))(x, weight, gate_up, down))
    want[1] = want[1] * kept
    for name, a, b in zip(("x", "weight", "gate_up", "down"), got, want):
        assert_float32_close(a, b, terms=len(x), depth=EXPERT_GRAD_DEPTH, name=name)


def test_padded_experts_with_room_for_every_token_equal_sorted(routed_tokens):
    x, expert, weight = (a[:36] for a in routed_tokens[:3])  # 3 groups of 12
    gate_up, down = routed_tokens[3:]
    y, dropped = experts_padded(x, expert, weight, gate_up, down, group_size=12, capacity_factor=4.0)
    assert int(dropped) == 0
    assert_float32_close(y, experts_sorted(x, expert, weight, gate_up, down), terms=x.shape[1], depth=EXPERT_DEPTH)


def test_functional_use_and_balancing_bias_is_not_a_param():
    config = load_preset("tiny")
    model = init_model(config)
    graphdef, params, biases = nnx.split(model, nnx.Param, BalancingBias)
    bias_leaves = jax.tree.leaves(biases)
    assert [b.shape for b in bias_leaves] == [(config.num_layers, config.router_classes)]
    assert all(np.asarray(bias_leaves[0])[:, -1] == -1.0)
    assert not any(x.shape == (config.num_layers, config.router_classes) for x in jax.tree.leaves(params))

    @jax.jit
    def forward(params, biases, ids):
        return nnx.merge(graphdef, params, biases)(ids, return_choices=True)

    ids = jnp.asarray(np.random.default_rng(0).integers(0, config.vocab_size, (2, 12)))
    out = forward(params, biases, ids)
    assert out.logits.shape == (2, 12, config.vocab_size) and out.choices.shape == (config.num_layers, 2, 12)
    # A large bias on expert 2 of layer 1 makes every token of that layer choose it: selection reads the bias.
    pushed = jax.tree.map(lambda b: b.at[1, 2].set(10.0), biases)
    choices = np.asarray(forward(params, pushed, ids).choices)
    assert (choices[1] == 2).all() and not (np.asarray(out.choices)[1] == 2).all()
    # The bias is selection-only: its gradient through the loss is zero.
    grads = jax.grad(lambda b: forward(params, b, ids).logits.sum())(biases)
    assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))


def test_remat_policies_give_the_same_gradients():
    config = load_preset("tiny")
    ids = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (1, 10)))
    grads = []
    for policy in ("none", "full", "dots"):
        model = init_model(config.replace(remat_policy=policy), seed=3)
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        g = jax.jit(jax.grad(lambda p: nnx.merge(graphdef, p, rest)(ids).std()))(params)
        grads.append(jax.tree.leaves(g))
    for other in grads[1:]:  # the same sums, which XLA may fuse and order differently around the remat boundaries
        for a, b in zip(grads[0], other):
            assert_float32_close(a, b, terms=model_terms(config, ids.shape[1]),
                                 depth=model_depth(config.num_layers, backward=True))
