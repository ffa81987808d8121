"""What the sharded-loading tests share (in-process and in the two-process workers, so no torch here):
`fsdp_shardings(mesh)`, the embedding and the experts split over the mesh's "fsdp" axis and everything else
replicated, and `counted_reads()`, the bytes `zaya_jax.hf_io` reads from the files per tensor name."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from zaya_jax import hf_io

FSDP_SPECS = {"embed": P(None, "fsdp"), "gate_up": P(None, None, "fsdp", None), "down": P(None, None, None, "fsdp")}


def fsdp_shardings(mesh: Mesh) -> Callable[[nnx.State], Any]:
    """load_pretrained's `shardings`: the abstract state -> a NamedSharding per parameter (FSDP_SPECS by name)."""
    def shardings(state: nnx.State) -> Any:
        return jax.tree_util.tree_map_with_path(
            lambda keys, leaf: NamedSharding(mesh, FSDP_SPECS.get(str(keys[-1].key), P())), nnx.to_pure_dict(state))
    return shardings


@contextlib.contextmanager
def counted_reads() -> Iterator[dict[str, int]]:
    """Within the block, every block hf_io reads from a safetensors file is counted: yields {name: bytes read}."""
    reads: dict[str, int] = {}
    original = hf_io._SafetensorsFiles.read

    def counting_read(self, name, index):
        block = original(self, name, index)
        reads[name] = reads.get(name, 0) + block.nbytes
        return block

    hf_io._SafetensorsFiles.read = counting_read
    try:
        yield reads
    finally:
        hf_io._SafetensorsFiles.read = original
