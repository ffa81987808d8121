"""The training state a run starts from, and the jitted step that takes it, built from a TrainConfig on a mesh.

    abstract_train_state(cfg, mesh) -> TrainSetup(graphdef, optimizer, state)
        state: a TrainState (train/step.py) whose every leaf is a jax.ShapeDtypeStruct(shape, dtype, sharding):
        params and balancing biases as the model creates them, the optimizer's and the balancer's state, step and
        rng, each with its NamedSharding on `mesh` (sharding/placement.py). Built with nnx.eval_shape and
        jax.eval_shape: nothing is allocated, so it describes models no device here could hold.
    initial_train_state(cfg, setup, model) -> TrainState of arrays, placed on the mesh by one jitted program, with
        exactly the setup's structure, shapes, dtypes and shardings (refused, with the leaves named, otherwise)
    abstract_batch(cfg, mesh) -> {name: ShapeDtypeStruct [B, S]}, B = train.batch_size split over the batch axes
    jit_train_step(cfg, setup, mesh) -> the jitted step: state donated, its output state placed like its input

train/loop.py builds every run from these, so `jit_train_step(cfg, setup, mesh).lower(setup.state,
abstract_batch(cfg, mesh))` (under `sharding.use_mesh(mesh)`) compiles the program a real run executes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from sharding import batch_shards, batch_sharding, train_state_shardings
from train.config import TrainConfig
from train.optim import make_optimizer, make_schedule
from train.step import BATCH_DTYPES, Batch, TrainState, layout_differences, make_train_step, new_train_state
from zaya_jax.model import ZayaForCausalLM
from zaya_jax.router import BalancingBias


class TrainSetup(NamedTuple):
    graphdef: nnx.GraphDef  # the model's structure: nnx.merge(graphdef, params, biases) is the model
    optimizer: optax.GradientTransformation
    state: TrainState  # leaves: jax.ShapeDtypeStruct with their shardings on the mesh


def abstract_train_state(cfg: TrainConfig, mesh: Mesh) -> TrainSetup:
    """The run's training state as shapes, dtypes and shardings on `mesh`, without allocating it."""
    model = nnx.eval_shape(lambda: ZayaForCausalLM(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, params, biases = nnx.split(model, nnx.Param, BalancingBias)
    optimizer = make_optimizer(cfg.optimizer, params)
    shapes = jax.eval_shape(functools.partial(new_train_state, optimizer=optimizer, seed=cfg.train.seed),
                            params, biases)
    shardings = train_state_shardings(shapes, mesh)
    return TrainSetup(graphdef, optimizer, with_shardings(shapes, shardings))


def with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying their shardings, leaf by leaf."""
    return jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                        shapes, shardings)


def initial_train_state(cfg: TrainConfig, setup: TrainSetup, model: nnx.Module) -> TrainState:
    """`model` (already placed on the mesh; its buffers are donated) with fresh optimizer and balancer state, as
    arrays laid out exactly as `setup.state` describes."""
    graphdef, params, biases = nnx.split(model, nnx.Param, BalancingBias)
    if graphdef != setup.graphdef:
        raise ValueError("initial_train_state: the model's structure differs from the one its config describes "
                         "(the abstract state and the compiled step would not be the run's)")
    create = jax.jit(functools.partial(new_train_state, optimizer=setup.optimizer, seed=cfg.train.seed),
                     out_shardings=shardings_of(setup.state), donate_argnums=(0, 1))
    state = create(params, biases)
    differences = layout_differences(setup.state, state, shardings=True)
    if differences:
        raise ValueError(f"initial_train_state: the state differs from the abstract state: {'; '.join(differences)}")
    return state


def abstract_batch(cfg: TrainConfig, mesh: Mesh) -> Batch:
    """The step's batch as ShapeDtypeStructs [train.batch_size, data.seq_len], sharded like a run's batches."""
    check_batch_size(cfg, mesh)
    shape = (cfg.train.batch_size, cfg.data.seq_len)
    sharding = batch_sharding(mesh)
    return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for name, dtype in BATCH_DTYPES.items()}


def jit_train_step(cfg: TrainConfig, setup: TrainSetup, mesh: Mesh, *,
                   compiler_options: dict[str, Any] | None = None) -> Callable[[TrainState, Batch], Any]:
    """The run's step, jitted: (state, batch) -> (state, metrics); the input state is donated and the output state
    gets the input's shardings, so one compiled program serves every step. Call it under `sharding.use_mesh(mesh)`.

    `compiler_options`: XLA options for this program only (e.g. {"xla_backend_optimization_level": 0} where the
    program's buffers matter and its speed does not: it halves a CPU compile and leaves the memory analysis as is).
    """
    check_batch_size(cfg, mesh)
    step_fn = make_train_step(
        setup.graphdef, setup.optimizer, cfg.balancer, cfg.model.router_classes,
        accumulation_steps=cfg.train.accumulation_steps, z_loss=cfg.train.z_loss,
        learning_rate=make_schedule(cfg.optimizer), loss_chunk=cfg.train.loss_chunk,
    )
    shardings = shardings_of(setup.state)
    return jax.jit(step_fn, in_shardings=(shardings, batch_sharding(mesh)), out_shardings=(shardings, None),
                   donate_argnums=0, compiler_options=compiler_options)


def check_batch_size(cfg: TrainConfig, mesh: Mesh) -> None:
    shards = batch_shards(mesh) * cfg.train.accumulation_steps
    if cfg.train.batch_size % shards or cfg.train.batch_size % jax.process_count():
        raise ValueError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the batch shards of the mesh "
            f"({batch_shards(mesh)}) x train.accumulation_steps ({cfg.train.accumulation_steps}) and by the "
            f"process count ({jax.process_count()})"
        )


def device_bytes(tree: Any) -> int:
    """Bytes one device holds of a pytree of sharded arrays or ShapeDtypeStructs (every device holds one equal shard
    of each leaf: the sharding rules split only dimensions the mesh axes divide)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(tree))


def shardings_of(tree: Any) -> Any:
    """The `.sharding` of every leaf (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda leaf: leaf.sharding, tree)
