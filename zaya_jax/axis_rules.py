"""The logical-axis rules the model reads under a mesh: which mesh axes each of its logical axis names maps to.

The model names the axes of its arrays, not mesh axes: its key activations (`ACTIVATION_AXES`, e.g. the residual
stream [B, S, H] is ("batch", "length", "activation_embed")) and the tokens its expert dispatch splits ("batch",
"length"). Which mesh axes those names map to is the business of whoever builds the mesh (a zaya-train run:
`sharding/rules.py` RULES), who installs the table around tracing:

    with jax.set_mesh(mesh), use_rules(rules):      # sharding.use_mesh(mesh) does both
        jax.jit(step)(...)

    rules: {logical name: mesh axis | sequence of mesh axes | None (replicated)}

The installed table is part of jit's cache key (`jax.make_user_context`), so a function traced under one table is
traced again under another. Without a mesh the model reads no rules (one device: nothing to lay out).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping, Sequence

import jax
from jax.sharding import PartitionSpec

Rules = Mapping[str, "str | Sequence[str] | None"]

# Logical axes of the key activations (what zaya_jax.layers.constrain pins inside the model under a mesh).
ACTIVATION_AXES: dict[str, tuple[str, ...]] = {
    "residual": ("batch", "length", "activation_embed"),  # [B, S, H] float32 residual stream
    "logits": ("batch", "length", "vocab"),  # [B, S, V]
    "tokens": ("batch", "length"),  # [B, S] ids, segment ids, positions
    # The padded experts' [G, E, C, H] buffer (experts.py): filled where its tokens are ("dispatch": groups like the
    # batch), then resharded to experts over `expert` ("expert_buffer"), which the compiler does with an all-to-all.
    "dispatch": ("batch", "expert_slots", "expert_capacity", "activation_embed"),
    "expert_buffer": ("expert_groups", "expert", "expert_capacity", "activation_embed"),
}

# The installed table, frozen so that jit can hash it: ((logical name, (mesh axis, ...)), ...), or None.
_INSTALLED = jax.make_user_context(default_value=None)


def rule_axes(target: str | Sequence[str] | None) -> tuple[str, ...]:
    """One rule's target (None, a mesh axis, or several) as a tuple of mesh axis names."""
    if target is None:
        return ()
    return (target,) if isinstance(target, str) else tuple(target)


@contextlib.contextmanager
def use_rules(rules: Rules) -> Iterator[None]:
    """Installs `rules` for whatever is traced inside the block."""
    with _INSTALLED(tuple(sorted((name, rule_axes(target)) for name, target in rules.items()))):
        yield


def installed_rules() -> dict[str, tuple[str, ...]]:
    """The installed table ({logical name: mesh axes}); an error when none is."""
    frozen = _INSTALLED.value
    if frozen is None:
        raise ValueError("zaya_jax runs under a mesh but no logical-axis rules are installed: trace it inside "
                         "sharding.use_mesh(mesh), or zaya_jax.axis_rules.use_rules(rules) next to jax.set_mesh(mesh)")
    return dict(frozen)


def mesh_axes(names: Sequence[str], mesh: Any, rules: Rules | None = None) -> tuple[str, ...]:
    """The mesh axes that the logical axes `names` map to under `rules` (default: the installed ones), in order,
    leaving out those of size 1 or absent from `mesh` (concrete or abstract): they split nothing."""
    table = installed_rules() if rules is None else rules
    sizes = dict(mesh.shape)
    found: list[str] = []
    for name in names:
        if name not in table:
            raise ValueError(f"logical axis {name!r} has no rule; rules exist for {sorted(table)}")
        found += [a for a in rule_axes(table[name]) if sizes.get(a, 1) > 1]
    return tuple(found)


def spec_entry(axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """One PartitionSpec entry for a dimension split over `axes` (None: not split)."""
    return None if not axes else (axes[0] if len(axes) == 1 else axes)


def activation_spec(kind: str, mesh: Any, rules: Rules | None = None) -> PartitionSpec:
    """The PartitionSpec of activation `kind` (a key of ACTIVATION_AXES) on `mesh` under `rules` (default: the
    installed ones); an error when two of its dimensions would use one mesh axis."""
    spec, used = [], set()
    for axis in ACTIVATION_AXES[kind]:
        axes = mesh_axes((axis,), mesh, rules)
        if used & set(axes):
            raise ValueError(f"activation {kind}: mesh axes {sorted(used & set(axes))} used twice")
        used |= set(axes)
        spec.append(spec_entry(axes))
    return PartitionSpec(*spec)
