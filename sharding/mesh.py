"""The device mesh: named axes (data, fsdp, context, expert, tensor) sized from the run's sharding settings.

    MeshConfig(data=-1, fsdp=1, context=1, expert=1, tensor=1)
        ->  jax.sharding.Mesh of shape [data, fsdp, context, expert, tensor]

Later axes hold nearer devices (the innermost, `tensor` and `expert`, move the most bytes; `context` the K/V
all-gather and the convolution halo).

One axis may be -1: it takes every device the others leave. The product must equal the number of devices
(all processes' devices in a multi-host run), or the mesh is refused with the sizes named.

`use_mesh(mesh)` is the context the model is traced in on that mesh: JAX's current mesh plus the logical-axis
rules (sharding/rules.py RULES) installed for the model (`zaya_jax.axis_rules`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Iterator

import jax
from jax.sharding import AxisType, Mesh

from sharding.rules import MESH_AXES, RULES
from zaya_jax.axis_rules import Rules, use_rules


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = -1  # data-parallel ways (-1: every device the other axes leave)
    fsdp: int = 1  # ways parameters and optimizer state are sharded (ZeRO-3 style), batch split too
    context: int = 1  # ways each sequence is split (context parallelism: zaya_jax/parallel/context.py)
    expert: int = 1  # ways the experts are split (expert parallelism); the batch is split over it as well
    tensor: int = 1  # tensor-parallel ways (hidden and head dimensions of the matrices)

    def __post_init__(self) -> None:
        sizes = [getattr(self, a) for a in MESH_AXES]
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError("mesh: at most one axis may be -1 (fill the remaining devices)")
        for axis, size in zip(MESH_AXES, sizes):
            if size != -1 and size < 1:
                raise ValueError(f"mesh.{axis} must be >= 1 or -1, got {size}")

    def resolve(self, num_devices: int) -> dict[str, int]:
        sizes = {a: getattr(self, a) for a in MESH_AXES}
        fixed = math.prod(s for s in sizes.values() if s != -1)
        for axis, size in sizes.items():
            if size == -1:
                if num_devices % fixed:
                    raise ValueError(f"mesh: {num_devices} devices cannot be split into {sizes} (fixed part {fixed})")
                sizes[axis] = num_devices // fixed
        if math.prod(sizes.values()) != num_devices:
            raise ValueError(f"mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, "
                             f"but there are {num_devices} devices")
        return sizes


def make_mesh(config: MeshConfig | None = None, devices: list | None = None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = (config or MeshConfig()).resolve(len(devices))
    # Auto axes: the compiler propagates shardings from the parameters and the batch (GSPMD).
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                         axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules | None = None) -> Iterator[Mesh]:
    """Trace and run the model on `mesh` inside this block: it is JAX's current mesh (`jax.set_mesh`), and the
    logical-axis rules (`rules`, default RULES) are installed for the model's activations and token dispatch."""
    with jax.set_mesh(mesh), use_rules(RULES if rules is None else rules):
        yield mesh
