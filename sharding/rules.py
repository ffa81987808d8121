"""Logical axis names for every parameter and the one table that maps them to mesh axes.

Every parameter of `ZayaForCausalLM` gets a tuple of logical axis names, one per dimension, from `PARAM_AXES`
(keyed by the parameter's path with the leading `layers` stack axis included). `RULES` maps each logical name to
a mesh axis (or None: replicated): the parameters' names and those the model gives its activations and tokens
(`zaya_jax.axis_rules`), for which the table is installed around tracing (`sharding.use_mesh`). `partition_spec`
turns one parameter's logical axes into a `PartitionSpec` and raises a `ShardingRuleError` when two dimensions
would use the same mesh axis (a collision) or a dimension is not divisible by the mesh axes it is split over.

Default layout (MaxText-style FSDP + expert parallelism):
    embed    [V, H]                 ("vocab", "embed")          embed -> fsdp
    layers/* [L, ...]               "layers" leading, replicated (scanned)
    experts  [L, E, H, 2I], [L, E, I, H]   "expert" -> expert mesh axis, "embed" -> fsdp
    activations [B, S, ...]         "batch" -> (data, fsdp, expert): every device holds a slice of the batch;
                                    "length" -> context: with context > 1 each holds a slice of the sequence too
"""

from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from zaya_jax.axis_rules import mesh_axes, spec_entry

MESH_AXES = ("data", "fsdp", "context", "expert", "tensor")

# Logical axis -> mesh axis (or a tuple of mesh axes, or None = replicated).
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp", "expert"),
    "layers": None,
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": None,
    "conv_taps": None,
    "conv_groups": None,
    "head_dim": None,
    "expert": "expert",
    "expert_mlp": "tensor",
    "router": None,
    "router_classes": None,
    "norm": None,
    # The sequence of the activations is split over `context` (context parallelism, zaya_jax/parallel/context.py);
    # no parameter has a length axis, so parameters are never split over it.
    "length": "context",
    "activation_embed": None,
    # The padded experts' [G, E, C, H] buffer: groups over the data axes, experts over `expert`.
    "expert_groups": ("data", "fsdp"),
    "expert_slots": None,
    "expert_capacity": None,
}

# Parameter path (slash-joined, as in nnx.State) -> logical axes per dimension.
PARAM_AXES: dict[str, tuple[str, ...]] = {
    "embed": ("vocab", "embed"),
    "lm_head": ("embed", "vocab"),
    "input_affine/scale": ("norm",),
    "input_affine/bias": ("norm",),
    "final_norm/weight": ("norm",),
    "layers/input_norm/weight": ("layers", "norm"),
    "layers/post_attn_norm/weight": ("layers", "norm"),
    "layers/attn/q_proj": ("layers", "embed", "q_heads"),
    "layers/attn/k_proj": ("layers", "embed", "kv_heads"),
    "layers/attn/v_current": ("layers", "embed", "kv_heads"),
    "layers/attn/v_delayed": ("layers", "embed", "kv_heads"),
    "layers/attn/conv_depthwise": ("layers", "conv_taps", "norm"),
    "layers/attn/conv_depthwise_bias": ("layers", "norm"),
    "layers/attn/conv_grouped": ("layers", "conv_taps", "conv_groups", "head_dim", "head_dim"),
    "layers/attn/conv_grouped_bias": ("layers", "norm"),
    "layers/attn/temperature": ("layers", "kv_heads"),
    "layers/attn/o_proj": ("layers", "q_heads", "embed"),
    "layers/moe/router/down_proj": ("layers", "embed", "router"),
    "layers/moe/router/down_proj_bias": ("layers", "router"),
    "layers/moe/router/eda_scale": ("layers", "router"),
    "layers/moe/router/norm/weight": ("layers", "router"),
    "layers/moe/router/fc1": ("layers", "router", "router"),
    "layers/moe/router/fc1_bias": ("layers", "router"),
    "layers/moe/router/fc2": ("layers", "router", "router"),
    "layers/moe/router/fc2_bias": ("layers", "router"),
    "layers/moe/router/out_proj": ("layers", "router", "router_classes"),
    "layers/moe/router/balancing_bias": ("layers", "router_classes"),
    "layers/moe/experts/gate_up": ("layers", "expert", "embed", "expert_mlp"),
    "layers/moe/experts/down": ("layers", "expert", "expert_mlp", "embed"),
}
for _scale in ("post_attn_scale", "post_moe_scale"):
    for _part in ("hidden", "residual"):
        for _leaf in ("scale", "bias"):
            PARAM_AXES[f"layers/{_scale}/{_part}/{_leaf}"] = ("layers", "norm")


class ShardingRuleError(ValueError):
    """A parameter whose logical axes cannot be laid out on the mesh (collision, indivisible, unknown)."""


def path_name(path: tuple[Any, ...]) -> str:
    parts = []
    for key in path:
        for attr in ("key", "name", "idx"):
            if hasattr(key, attr):
                parts.append(str(getattr(key, attr)))
                break
        else:
            parts.append(str(key))
    return "/".join(p for p in parts if p != "value")


def partition_spec(
    name: str, shape: tuple[int, ...], mesh: Mesh, rules: dict[str, Any] | None = None
) -> PartitionSpec:
    """The PartitionSpec of parameter `name` with `shape` on `mesh` under `rules` (default `RULES`)."""
    rules = RULES if rules is None else rules
    if name not in PARAM_AXES:
        raise ShardingRuleError(f"{name}: no logical axes in sharding/rules.py PARAM_AXES")
    logical = PARAM_AXES[name]
    if len(logical) != len(shape):
        raise ShardingRuleError(f"{name}: {len(logical)} logical axes {logical} for a {len(shape)}-d shape {shape}")
    used: dict[str, str] = {}
    spec = []
    for dim, (axis, size) in enumerate(zip(logical, shape)):
        if axis not in rules:
            raise ShardingRuleError(f"{name}: logical axis {axis!r} has no rule in sharding/rules.py RULES")
        split = mesh_axes((axis,), mesh, rules)
        for mesh_axis in split:
            if mesh_axis in used:
                raise ShardingRuleError(
                    f"{name}: mesh axis {mesh_axis!r} used twice, by dim {used[mesh_axis]} and dim {dim} ({axis!r})"
                )
            used[mesh_axis] = f"{dim} ({axis!r})"
        ways = math.prod(mesh.shape[a] for a in split)
        if size % ways:
            raise ShardingRuleError(
                f"{name}: dim {dim} ({axis!r}, size {size}) is not divisible by mesh axes {split} ({ways} ways)"
            )
        spec.append(spec_entry(split))
    return PartitionSpec(*spec)


def state_shardings(state: Any, mesh: Mesh, rules: dict[str, Any] | None = None) -> Any:
    """A pytree of NamedShardings matching `state` (an nnx.State or any pytree keyed by parameter paths)."""

    def sharding(path, leaf):
        return NamedSharding(mesh, partition_spec(path_name(path), tuple(leaf.shape), mesh, rules))

    return jax.tree_util.tree_map_with_path(sharding, state)


def batch_sharding(mesh: Mesh, rules: dict[str, Any] | None = None) -> NamedSharding:
    """Sharding of a [B, S] batch array: B split over the "batch" rule's mesh axes, S over the "length" rule's
    (context parallelism; the batch is then in the dual-chunk layout, zaya_jax/parallel/context.py)."""
    rules = RULES if rules is None else rules
    return NamedSharding(mesh, PartitionSpec(*(spec_entry(mesh_axes((name,), mesh, rules))
                                               for name in ("batch", "length"))))


def batch_shards(mesh: Mesh, rules: dict[str, Any] | None = None) -> int:
    """How many ways the batch dimension is split (the product of the "batch" rule's mesh axes)."""
    return math.prod(mesh.shape[a] for a in mesh_axes(("batch",), mesh, RULES if rules is None else rules))


def context_shards(mesh: Mesh, rules: dict[str, Any] | None = None) -> int:
    """How many ways each sequence is split (the product of the "length" rule's mesh axes: context parallelism)."""
    return math.prod(mesh.shape[a] for a in mesh_axes(("length",), mesh, RULES if rules is None else rules))


def describe(state: Any, mesh: Mesh, rules: dict[str, Any] | None = None) -> str:
    """One line per parameter: path, shape, PartitionSpec (the golden file's format)."""
    lines = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        name = path_name(path)
        lines.append(f"{name} {tuple(leaf.shape)} {partition_spec(name, tuple(leaf.shape), mesh, rules)}")
    return "\n".join(lines) + "\n"

