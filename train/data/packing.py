"""Packing variable-length examples into fixed-length rows, and next-token targets.

An *example* is ``{"tokens": int [n], "loss_mask": float [n]}`` with
``1 <= n <= L``. A packed *row* holds whole examples side by side::

    tokens      int32   [L]  example tokens, 0 on padding
    segment_ids int32   [L]  1, 2, 3, ... per example in the row, 0 on padding
    positions   int32   [L]  0..n-1 within each example, 0 on padding
    loss_mask   float32 [L]  the examples' masks, 0 on padding

Examples are never split across rows: an example longer than L is an error
(reasoning samples are cut to fit by ``trimming.trim_sample`` at the same L
beforehand). A buffer of examples is packed by one of two bin-packing rules
(``PACKINGS``, the config's ``data.packing``), both of which sort by length
(longest first, ties by arrival order so the result is deterministic) and
open a new row when no open row has room:

* ``first_fit``: each example goes into the first (oldest) row with room.
* ``best_fit``: each example goes into the row with the least room that still
  holds it (ties: the oldest). Best-fit-decreasing of complete examples into
  the stage's window is how ZAYA1's SFT packed its 131K windows, avoiding the
  arbitrary boundary truncation that caused hallucination artifacts
  (../shared/docs/zaya1_reference.md section 7.1, report section IV-A).

Both use at most 3/2 of the optimal number of rows on any input (Simchi-Levi
1994, "New worst-case results for the bin-packing problem"). They differ in
which examples share a row, rarely in how many rows a buffer needs: the
fraction of padding is set mostly by how many examples one buffer holds per
row (docs/training.md gives figures at 131K).

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


PACKINGS = ("first_fit", "best_fit")


def _fit_decreasing(lengths: Sequence[int], capacity: int, best: bool) -> list[list[int]]:
    """Assign item indices to bins of ``capacity`` (first or best fit, longest first); bins in opening order.

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
            # argmin returns the first minimum, so best-fit ties go to the oldest bin.
            b = int(fits[np.argmin(free[fits])]) if best else int(fits[0])
            free[b] -= n
            bins[b].append(i)
        else:
            bins.append([i])
            free = np.append(free, capacity - n)
    return bins


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: each item, longest first, into the first bin with room (see module docstring)."""
    return _fit_decreasing(lengths, capacity, best=False)


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: each item, longest first, into the fullest bin it fits (see module docstring)."""
    return _fit_decreasing(lengths, capacity, best=True)


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


def check_packing(packing: str) -> None:
    """Raises ValueError naming the choices unless ``packing`` is one of ``PACKINGS``."""
    if packing not in PACKINGS:
        raise ValueError(f"packing must be one of {PACKINGS}, got {packing!r}")


def pack_examples(
    examples: Sequence[Example], seq_len: int, packing: str = "first_fit"
) -> list[dict[str, np.ndarray]]:
    """Pack a buffer of examples into rows by ``packing`` ("first_fit" or "best_fit"); see module docstring."""
    check_packing(packing)
    lengths = [int(np.asarray(ex["tokens"]).reshape(-1).shape[0]) for ex in examples]
    bins = _fit_decreasing(lengths, seq_len, best=packing == "best_fit")
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
