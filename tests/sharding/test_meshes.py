"""Sharded training on 8 CPU devices equals the single-device run; parameters are created already sharded."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sharding import (RULES, MeshConfig, ShardingRuleError, batch_sharding, describe, init_sharded_model, make_mesh,
                      partition_spec, train_state_shardings, use_mesh)
from tests.tolerances import (ADAM_DEPTH, assert_float32_close, cross_entropy_bound, float32_bound, model_depth,
                              model_terms)
from train.balancer import BalancerConfig
from train.config import load_train_config
from train.data import ByteTokenizer, make_dataset
from train.data.sources import SyntheticSource
from train.optim import OptimizerConfig, make_optimizer
from train.step import init_train_state, make_train_step, step_batch, token_losses
from zaya_jax import init_model

# The tiny preset with 8 experts, so that expert=8 holds one expert per device.
CONFIG = load_train_config("configs/tiny.yaml").model.replace(num_experts=8)
MESHES = {
    "data8": MeshConfig(data=8),
    "data2_expert4": MeshConfig(data=2, expert=4),
    "fsdp2_expert4": MeshConfig(data=1, fsdp=2, expert=4),
    "expert8": MeshConfig(data=1, expert=8),
}
GOLDEN = os.path.join(os.path.dirname(__file__), "golden")


@pytest.fixture(scope="module")
def batch():
    raw = next(iter(make_dataset(SyntheticSource(seed=3), ByteTokenizer(), 64, 8, seed=3, num_threads=0)))
    return {k: jnp.asarray(v) for k, v in step_batch(raw).items()}


def _step_parts(model):
    params = nnx.state(model, nnx.Param)
    optimizer = make_optimizer(OptimizerConfig(lr=1e-3, warmup_steps=0, total_steps=10), params)
    graphdef, state = init_train_state(model, optimizer, seed=0)
    step = make_train_step(graphdef, optimizer, BalancerConfig(lr=1e-2), CONFIG.router_classes)
    return graphdef, state, step


def _loss(graphdef, params, biases, batch):
    nll, _, _ = token_losses(graphdef, params, biases, batch)
    return jnp.sum(nll * batch["target_mask"]) / jnp.sum(batch["target_mask"])


@pytest.fixture(scope="module")
def reference(batch):
    """Loss, gradients and one full training step on a single device."""
    graphdef, state, step = _step_parts(init_model(CONFIG, seed=0))
    loss, grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(
        graphdef, state.params, state.biases, batch)
    new_state, metrics = jax.jit(step)(state, batch)
    return jax.device_get((loss, grads, new_state, metrics))


@pytest.fixture(scope="module")
def reference_logits(batch):
    """The single-device model's logits [B, S, V] of the batch's tokens."""
    return np.asarray(init_model(CONFIG, seed=0)(batch["tokens"]))


CASES = [(name, "sorted", None) for name in MESHES] + [
    ("data2_expert4", "expert_parallel", "all_to_all"),
    ("fsdp2_expert4", "expert_parallel", "all_gather"),
    ("expert8", "expert_parallel", "all_to_all"),
    ("data2_expert4", "padded", None),
]


@pytest.mark.parametrize("mesh_name, moe_impl, transport", CASES)
def test_sharded_training_matches_single_device(mesh_name, moe_impl, transport, batch, reference, reference_logits):
    """GSPMD-partitioned experts ("sorted"; "padded" with room for every token, so dropless) and shard_map expert
    parallelism with each CPU transport."""
    mesh = make_mesh(MESHES[mesh_name])
    capacity = float(CONFIG.num_experts) if moe_impl == "padded" else None
    config = CONFIG.replace(moe_impl=moe_impl, expert_parallel_transport=transport or "all_to_all",
                            expert_capacity_factor=capacity)
    model = init_sharded_model(config, mesh, seed=0)
    graphdef, state, step = _step_parts(model)
    shardings = train_state_shardings(state, mesh)
    state = jax.device_put(state, shardings)
    sharded_batch = jax.device_put(batch, batch_sharding(mesh))

    with use_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(_loss, argnums=1), static_argnums=0)(
            graphdef, state.params, state.biases, sharded_batch)
        new_state, metrics = jax.jit(step, in_shardings=(shardings, batch_sharding(mesh)),
                                     out_shardings=(shardings, None))(state, sharded_batch)
    assert int(np.asarray(metrics["dropped_tokens"]).sum()) == 0  # dropless
    ref_loss, ref_grads, ref_state, ref_metrics = reference

    # The partitioned program sums over the hidden width, the tokens and the devices in another order than the
    # single-device one (tests/tolerances.py); the loss adds a log-sum-exp over the vocabulary and a token mean.
    seq, tokens = batch["tokens"].shape[1], int(batch["tokens"].size)
    assert abs(float(loss) - float(ref_loss)) <= cross_entropy_bound(
        max_abs_logit=float(np.abs(reference_logits).max()), loss=float(ref_loss), vocab=CONFIG.vocab_size,
        tokens=tokens, logits_bound=float32_bound(model_terms(CONFIG, seq), model_depth(CONFIG.num_layers)))
    terms = max(model_terms(CONFIG, seq), CONFIG.vocab_size, tokens)
    backward = model_depth(CONFIG.num_layers, backward=True) + 2
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True):
        assert_float32_close(got, want, terms=terms, depth=backward)
    # The balancer sees the global batch: its counts (as loads) and updated biases match exactly.
    np.testing.assert_allclose(np.asarray(metrics["expert_load"]), np.asarray(ref_metrics["expert_load"]))
    for got, want in zip(jax.tree.leaves(new_state), jax.tree.leaves(ref_state), strict=True):
        got, want = np.asarray(got), np.asarray(want)
        if got.dtype.kind == "f" and np.abs(want).max() > 0:  # AdamW's state and step on those gradients
            assert_float32_close(got, want, terms=terms, depth=backward + ADAM_DEPTH)
        else:  # counters, and zeros (the skip class's untouched bias moments)
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_parameters_are_created_sharded_and_golden(mesh_name):
    mesh = make_mesh(MESHES[mesh_name])
    model = init_sharded_model(CONFIG, mesh, seed=0)
    state = nnx.state(model)
    reference = nnx.state(init_model(CONFIG, seed=0))
    total = per_device = 0
    for (path, leaf), ref in zip(jax.tree_util.tree_flatten_with_path(state)[0], jax.tree.leaves(reference)):
        spec = leaf.sharding.spec
        ways = int(np.prod([mesh.shape[a] for entry in spec if entry for a in
                            ((entry,) if isinstance(entry, str) else entry)]))
        shard_bytes = leaf.addressable_shards[0].data.nbytes
        assert shard_bytes * ways == leaf.nbytes, (path, spec)  # each device holds exactly 1/ways of it
        total += leaf.nbytes
        per_device += shard_bytes
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(ref))  # same values as the unsharded init
    assert per_device < total or mesh_name == "data8"
    text = describe(state, mesh)
    path = os.path.join(GOLDEN, f"param_shardings_{mesh_name}.txt")
    if os.environ.get("UPDATE_GOLDEN"):
        with open(path, "w") as f:
            f.write(text)
    with open(path) as f:
        assert f.read() == text, f"sharding of the parameters changed; review and rerun with UPDATE_GOLDEN=1"


def test_rules_reject_collisions_and_indivisible_axes():
    mesh = make_mesh(MeshConfig(data=1, fsdp=2, expert=4))
    with pytest.raises(ShardingRuleError, match="not divisible by mesh axes \\('expert',\\)"):
        partition_spec("layers/moe/experts/down", (2, 6, 8, 8), mesh)
    colliding = {**RULES, "expert_mlp": "expert"}
    with pytest.raises(ShardingRuleError, match="mesh axis 'expert' used twice"):
        partition_spec("layers/moe/experts/down", (2, 8, 8, 8), mesh, colliding)
    with pytest.raises(ShardingRuleError, match="no logical axes"):
        partition_spec("layers/attn/new_thing", (2, 8), mesh)
    with pytest.raises(ValueError, match="multiply to 6, but there are 8 devices"):
        make_mesh(MeshConfig(data=3, expert=2))


def test_key_activations_carry_their_logical_layout(batch, reference_logits):
    mesh = make_mesh(MESHES["data2_expert4"])
    from zaya_jax.axis_rules import activation_spec

    assert activation_spec("residual", mesh, RULES) == PartitionSpec(("data", "expert"), None, None)
    assert activation_spec("logits", make_mesh(MeshConfig(data=4, tensor=2)), RULES) == PartitionSpec("data", None,
                                                                                                       "tensor")
    model = init_sharded_model(CONFIG, mesh, seed=0)
    graphdef, state = nnx.split(model)
    with use_mesh(mesh):
        logits = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids))(state, jax.device_put(batch["tokens"],
                                                                                              batch_sharding(mesh)))
    assert logits.sharding.is_equivalent_to(NamedSharding(mesh, PartitionSpec(("data", "expert"), None, None)), 3)
    assert_float32_close(logits, reference_logits, terms=model_terms(CONFIG, batch["tokens"].shape[1]),
                         depth=model_depth(CONFIG.num_layers))


def test_padded_experts_move_tokens_to_the_experts():
    """moe_impl "padded" on data=2 x expert=4: the forward's only collectives are two all-to-alls per layer (the
    [G, E, C, H] buffer out to its experts' devices and back); "sorted" moves tokens across the expert axis with
    all-to-alls too (its shard_map transport), and gathers nothing."""
    import re

    mesh = make_mesh(MESHES["data2_expert4"])
    ids = jax.device_put(jnp.zeros((8, 64), jnp.int32), batch_sharding(mesh))

    def collectives(**changes):
        graphdef, state = nnx.split(init_sharded_model(CONFIG.replace(**changes), mesh, seed=0))
        with use_mesh(mesh):
            hlo = jax.jit(lambda s, ids: nnx.merge(graphdef, s)(ids)).lower(state, ids).compile().as_text()
        return {op: len(re.findall(rf" {op}(-start)?\(", hlo)) for op in ("all-to-all", "all-gather", "all-reduce")}

    # One all-to-all each way in the scanned layer body.
    assert collectives(moe_impl="padded", expert_capacity_factor=1.25) == {"all-to-all": 2, "all-gather": 0,
                                                                            "all-reduce": 0}
    sorted_dispatch = collectives(moe_impl="sorted")
    assert sorted_dispatch["all-gather"] == 0 and sorted_dispatch["all-to-all"] > 0, sorted_dispatch
