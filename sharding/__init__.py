"""How the model spreads over devices: the mesh, the logical-axis rules, placement of the training state."""

from sharding.mesh import MeshConfig, make_mesh, use_mesh
from sharding.placement import init_sharded_model, train_state_shardings
from sharding.rules import (PARAM_AXES, RULES, ShardingRuleError, batch_shards, batch_sharding, context_shards,
                            describe, partition_spec)

__all__ = [
    "MeshConfig",
    "PARAM_AXES",
    "RULES",
    "ShardingRuleError",
    "batch_shards",
    "batch_sharding",
    "context_shards",
    "describe",
    "init_sharded_model",
    "make_mesh",
    "partition_spec",
    "train_state_shardings",
    "use_mesh",
]
