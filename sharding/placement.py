"""Placing the model and its training state on a mesh.

- `init_sharded_model(config, mesh, seed)`: the model initialised by one jitted program whose outputs already carry
  their NamedShardings, so no device ever materialises a whole parameter that the rules split.
- `train_state_shardings(state, mesh)`: a NamedSharding for every leaf of a TrainState. Parameters follow
  sharding/rules.py; optimizer moments mirror their parameter (matched by the parameter path their own path ends
  with); everything else (step, rng, balancer moments, scalars) is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import PARAM_AXES, partition_spec, path_name, state_shardings
from zaya_jax.config import ZayaConfig
from zaya_jax.model import ZayaForCausalLM


def init_sharded_model(config: ZayaConfig, mesh: Mesh, seed: int = 0,
                       rules: dict[str, Any] | None = None) -> ZayaForCausalLM:
    abstract = nnx.eval_shape(lambda: ZayaForCausalLM(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = state_shardings(abstract_state, mesh, rules)
    create = jax.jit(
        lambda key: nnx.state(ZayaForCausalLM(config, rngs=nnx.Rngs(key))),
        out_shardings=shardings,
        compiler_options={"xla_backend_optimization_level": 0},
    )
    return nnx.merge(graphdef, create(jax.random.key(seed)))


def train_state_shardings(state: Any, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    replicated = NamedSharding(mesh, PartitionSpec())

    def sharding(path, leaf):
        name = path_name(path)
        parts = name.split("/")
        for start in range(len(parts)):
            suffix = "/".join(parts[start:])
            if suffix in PARAM_AXES and len(PARAM_AXES[suffix]) == len(leaf.shape):
                return NamedSharding(mesh, partition_spec(suffix, tuple(leaf.shape), mesh, rules))
        return replicated

    return jax.tree_util.tree_map_with_path(sharding, state)
