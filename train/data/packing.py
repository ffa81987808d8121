"""Packing variable-length examples into fixed-length rows, and next-token targets.

An *example* is ``{"tokens": int [n], "loss_mask": float [n]}`` with
``1 <= n <= L``. A packed *row* holds whole examples side by side::

    tokens      int32   [L]  example tokens, 0 on padding
    segment_ids int32   [L]  1, 2, 3, ... per example in the row, 0 on padding
    positions   int32   [L]  0..n-1 within each example, 0 on padding
    loss_mask   float32 [L]  the examples' masks, 0 on padding

Examples are never split across rows: an example longer than L is an error
(reasoning samples are cut to fit by ``trimming.trim_sample`` beforehand).
Rows are filled by first-fit-decreasing over a buffer of examples: sort by
length (longest first, ties by arrival order so it is deterministic), put
each example into the first row with room, open a new row if none has.

Targets convention: position t is trained to predict token t+1 only when both
are in the same (non-padding) segment, weighted by the loss mask *of token
t+1* (the mask marks tokens that are training targets). ``next_token_targets``
builds ``targets[t] = tokens[t+1]`` and that mask.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Example = Mapping[str, np.ndarray]


def _check_length(n: int, seq_len: int, index: int) -> None:
    if n == 0:
        raise ValueError(f"example {index} is empty; packing needs at least one token")
    if n > seq_len:
        raise ValueError(
            f"example {index} has {n} tokens > row length {seq_len}; documents are never split "
            "across rows, so over-long examples must be trimmed before packing "
            "(train.data.trimming.trim_sample, i.e. make_dataset(trim=True))"
        )


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign item indices to bins of ``capacity``; returns bins in opening order.

    Inside a bin, items are in placement order (longest first).
    """
    for i, n in enumerate(lengths):
        _check_length(int(n), capacity, i)
    # Stable sort on -length: equal lengths keep arrival order.
    order = sorted(range(len(lengths)), key=lambda i: -int(lengths[i]))
    bins: list[list[int]] = []
    free = np.empty(0, dtype=np.int64)
    for i in order:
        n = int(lengths[i])
        fits = np.flatnonzero(free >= n)
        if fits.size:
            b = int(fits[0])
            free[b] -= n
            bins[b].append(i)
        else:
            bins.append([i])
            free = np.append(free, capacity - n)
    return bins


def build_row(examples: Sequence[Example], seq_len: int) -> dict[str, np.ndarray]:
    """Lay ``examples`` out left to right in one row of length ``seq_len``."""
    tokens = np.zeros(seq_len, dtype=np.int32)
    segment_ids = np.zeros(seq_len, dtype=np.int32)
    positions = np.zeros(seq_len, dtype=np.int32)
    loss_mask = np.zeros(seq_len, dtype=np.float32)
    pos = 0
    for seg, ex in enumerate(examples, start=1):
        toks = np.asarray(ex["tokens"]).reshape(-1)
        mask = np.asarray(ex["loss_mask"]).reshape(-1)
        n = toks.shape[0]
        if mask.shape[0] != n:
            raise ValueError(f"example {seg - 1}: {n} tokens but {mask.shape[0]} loss-mask entries")
        if pos + n > seq_len:
            raise ValueError(f"examples total more than the row length {seq_len}")
        tokens[pos : pos + n] = toks
        segment_ids[pos : pos + n] = seg
        positions[pos : pos + n] = np.arange(n, dtype=np.int32)
        loss_mask[pos : pos + n] = mask
        pos += n
    return {"tokens": tokens, "segment_ids": segment_ids, "positions": positions, "loss_mask": loss_mask}


def pack_examples(examples: Sequence[Example], seq_len: int) -> list[dict[str, np.ndarray]]:
    """Pack a buffer of examples into rows (first-fit-decreasing); see module docstring."""
    lengths = [int(np.asarray(ex["tokens"]).reshape(-1).shape[0]) for ex in examples]
    bins = first_fit_decreasing(lengths, seq_len)
    return [build_row([examples[i] for i in b], seq_len) for b in bins]


def next_token_targets(
    tokens: np.ndarray, segment_ids: np.ndarray, loss_mask: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Shift by one along the last axis: ``(targets int32 [..., L], target_mask float32 [..., L])``.

    ``targets[t] = tokens[t+1]`` (0 at the last position) and
    ``target_mask[t] = loss_mask[t+1]`` if ``segment_ids[t] == segment_ids[t+1] != 0``,
    else 0 -- so no position learns to predict the next document's first
    token or padding. Works on one row ``[L]`` or a batch ``[B, L]``.
    """
    tokens = np.asarray(tokens)
    segment_ids = np.asarray(segment_ids)
    loss_mask = np.asarray(loss_mask)
    targets = np.zeros(tokens.shape, dtype=np.int32)
    targets[..., :-1] = tokens[..., 1:]
    same = (segment_ids[..., :-1] == segment_ids[..., 1:]) & (segment_ids[..., 1:] != 0)
    target_mask = np.zeros(tokens.shape, dtype=np.float32)
    target_mask[..., :-1] = np.where(same, loss_mask[..., 1:], 0.0)
    return targets, target_mask
