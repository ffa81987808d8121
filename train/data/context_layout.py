"""A packed batch laid out for the step: every [B, S] array in the dual-chunk order of the mesh's context shards,
with each token's real index.

    context_layout({name: [B, S]}, shards) -> {name: [B, S] reordered along S, ..., "sequence_index": [B, S] int32}

The order is `zaya_jax.parallel.context.dual_chunk_order` (shard i of N gets real chunks i and 2N-1-i of 2N), so
each context shard gets an equal share of the causal attention work; with one shard it is the identity. Targets
and target masks were made in real order (next token inside a document) and travel with their token, so the
summed loss is unchanged; segment ids and RoPE positions travel too, and `sequence_index` gives the model the real
order back for the causal mask and the convolution halo.
"""

from __future__ import annotations

import numpy as np

from zaya_jax.parallel.context import to_dual_chunks


def context_layout(batch: dict[str, np.ndarray], shards: int) -> dict[str, np.ndarray]:
    """The batch's [B, S] arrays in the dual-chunk layout over `shards` context shards, plus "sequence_index"."""
    if "sequence_index" in batch:
        raise ValueError("context_layout: the batch already carries sequence_index (laid out twice?)")
    shapes = {name: np.shape(x) for name, x in batch.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 2:
        raise ValueError(f"context_layout: every batch array must be [B, S] of one shape, got {shapes}")
    rows, length = next(iter(shapes.values()))
    index = np.broadcast_to(np.arange(length, dtype=np.int32), (rows, length))
    laid = {name: to_dual_chunks(np.asarray(x), shards) for name, x in batch.items()}
    laid["sequence_index"] = to_dual_chunks(index, shards)
    return laid
