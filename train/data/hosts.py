"""Per-host data: the global batch is `read_shards` independent pipelines, each process running its share.

    global batch [B, L] = concat(shard 0 rows [B / R, L], shard 1 rows, ..., shard R-1 rows)      R = read_shards

Shard s reads the records s, s + R, s + 2R, ... (train/data/pipeline.py). Process p of P runs shards
p * R/P ... (p + 1) * R/P - 1 and contributes their rows, in order, as its part of the batch. Because the layout
depends on R and not on P, a run gives the same batches on 1 process x 8 devices as on 2 processes x 4, and a
checkpoint written by 2 processes resumes on 1: the iterator state is saved per shard.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np


class HostBatches:
    def __init__(self, make_iterator: Callable[[int, int, int], Iterator[dict[str, np.ndarray]]], *,
                 batch_size: int, read_shards: int, process_index: int, process_count: int):
        """make_iterator(shard_index, shard_count, rows) -> a checkpointable iterator of {key: [rows, L]} batches."""
        if read_shards % process_count:
            raise ValueError(f"data.read_shards ({read_shards}) must be a multiple of the process count "
                             f"({process_count})")
        if batch_size % read_shards:
            raise ValueError(f"train.batch_size ({batch_size}) must be divisible by data.read_shards ({read_shards})")
        per_process = read_shards // process_count
        self.shards = list(range(process_index * per_process, (process_index + 1) * per_process))
        rows = batch_size // read_shards
        self.iterators = {s: make_iterator(s, read_shards, rows) for s in self.shards}

    def __iter__(self) -> "HostBatches":
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        parts = [next(self.iterators[s]) for s in self.shards]
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def get_state(self) -> dict[str, Any]:
        """This process's shards' states, keyed by shard index (as strings: JSON keys)."""
        return {str(s): it.get_state() for s, it in self.iterators.items()}

    def set_state(self, states: dict[str, Any]) -> None:
        """Restores from the states of (at least) this process's shards, e.g. all shards' merged states."""
        missing = [s for s in self.shards if str(s) not in states]
        if missing:
            raise ValueError(f"data iterator state has no entry for shard(s) {missing}; it was saved with "
                             f"shards {sorted(states, key=int)} (data.read_shards must stay the same on resume)")
        for s, it in self.iterators.items():
            it.set_state(states[str(s)])
