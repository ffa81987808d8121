"""Tests for train/data/packing.py: row layout, first- and best-fit-decreasing, no splits, targets mask."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from train.data.packing import best_fit_decreasing, first_fit_decreasing, next_token_targets, pack_examples


def ex(tokens, mask=None):
    tokens = np.asarray(tokens, dtype=np.int32)
    mask = np.ones(len(tokens), np.float32) if mask is None else np.asarray(mask, np.float32)
    return {"tokens": tokens, "loss_mask": mask}


def test_hand_written_rows():
    rows = pack_examples([ex([11, 12, 13, 14, 15]), ex([21, 22, 23], [0, 1, 1]), ex([31, 32])], seq_len=8)
    assert len(rows) == 2
    r0, r1 = rows
    np.testing.assert_array_equal(r0["tokens"], [11, 12, 13, 14, 15, 21, 22, 23])
    np.testing.assert_array_equal(r0["segment_ids"], [1, 1, 1, 1, 1, 2, 2, 2])
    np.testing.assert_array_equal(r0["positions"], [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(r0["loss_mask"], [1, 1, 1, 1, 1, 0, 1, 1])
    np.testing.assert_array_equal(r1["tokens"], [31, 32, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(r1["segment_ids"], [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(r1["positions"], [0, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(r1["loss_mask"], [1, 1, 0, 0, 0, 0, 0, 0])
    for r in rows:
        assert r["tokens"].dtype == np.int32 and r["segment_ids"].dtype == np.int32
        assert r["positions"].dtype == np.int32 and r["loss_mask"].dtype == np.float32


def test_first_fit_decreasing_hand_example():
    # Sorted: 6 (i1), 5 (i3), 3 (i2), 2 (i0).
    # 6 -> bin0 (2 free); 5 -> bin1 (3 free); 3 -> bin1 (0 free); 2 -> bin0 (0 free).
    assert first_fit_decreasing([2, 6, 3, 5], 8) == [[1, 0], [3, 2]]
    # Ties keep arrival order.
    assert first_fit_decreasing([4, 4, 4], 8) == [[0, 1], [2]]


def test_best_fit_decreasing_hand_example():
    # Sorted: 5 (i0), 3 (i1), 3 (i2), 1 (i3); capacity 7.
    # 5 -> bin0 (2 free); 3 -> bin1 (4 free); 3 -> bin1 (1 free); 1 fits both: first fit takes bin0, best fit the
    # fuller bin1.
    assert first_fit_decreasing([5, 3, 3, 1], 7) == [[0, 3], [1, 2]]
    assert best_fit_decreasing([5, 3, 3, 1], 7) == [[0], [1, 2, 3]]
    # Equal room: the older bin; ties in length keep arrival order.
    assert best_fit_decreasing([3, 3, 2], 5) == [[0, 2], [1]]


def reference_best_fit_decreasing(lengths, capacity):
    """Best-fit-decreasing from its definition, in plain Python: longest first (stable), each item into the bin
    with the least room left that still holds it (the oldest among equals), else a new bin."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins, loads = [], []
    for i in order:
        candidates = [(capacity - load, b) for b, load in enumerate(loads) if load + lengths[i] <= capacity]
        if candidates:
            _, b = min(candidates)
            bins[b].append(i)
            loads[b] += lengths[i]
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def optimal_bin_count(lengths, capacity):
    """The fewest bins that hold every item, by exhaustive search (tiny inputs only)."""
    items = sorted(lengths, reverse=True)
    best = [len(items)]

    def place(k, loads):
        if len(loads) >= best[0]:
            return
        if k == len(items):
            best[0] = len(loads)
            return
        tried = set()
        for b, load in enumerate(loads):
            if load + items[k] <= capacity and load not in tried:  # bins of equal load are interchangeable
                tried.add(load)
                loads[b] += items[k]
                place(k + 1, loads)
                loads[b] -= items[k]
        place(k + 1, [*loads, items[k]])

    place(0, [])
    return best[0]


def check_bins(bins, lengths, capacity):
    """Every item in exactly one bin, no bin over capacity."""
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= capacity for b in bins)


def test_best_fit_decreasing_equals_the_definition_on_random_inputs():
    rng = random.Random(3)
    for _ in range(300):
        capacity = rng.randint(1, 64)
        lengths = [rng.randint(1, capacity) for _ in range(rng.randint(0, 40))]
        bins = best_fit_decreasing(lengths, capacity)
        check_bins(bins, lengths, capacity)
        assert bins == reference_best_fit_decreasing(lengths, capacity)


def test_fit_decreasing_against_the_optimum_on_tiny_inputs():
    rng = random.Random(4)
    # Items of 1/5..1/2 of a bin are where fit-decreasing misses the optimum (12 of these 300 inputs); the fixed
    # case needs 3 bins where 2 suffice ({4, 3, 3} twice), the 3/2 bound exactly.
    cases = [([4, 4, 3, 3, 3, 3], 10)]
    for _ in range(300):
        capacity = rng.randint(10, 30)
        cases.append(([rng.randint(capacity // 5, capacity // 2) for _ in range(rng.randint(1, 9))], capacity))
    for lengths, capacity in cases:
        optimum = optimal_bin_count(lengths, capacity)
        assert optimum >= -(-sum(lengths) // capacity)  # the search cannot beat the volume bound
        for pack in (best_fit_decreasing, first_fit_decreasing):
            bins = pack(lengths, capacity)
            check_bins(bins, lengths, capacity)
            # FFD and BFD never use more than 3/2 of the optimum (Simchi-Levi 1994, absolute ratio 3/2).
            assert optimum <= len(bins) <= 3 * optimum // 2, (pack.__name__, lengths, capacity)


@pytest.mark.parametrize("packing", ["first_fit", "best_fit"])
def test_no_document_split_and_every_document_once(packing):
    rng = random.Random(1)
    L = 32
    examples = [ex([1000 + i] * rng.randint(1, L)) for i in range(200)]
    rows = pack_examples(examples, L, packing)
    seen = Counter()
    for r in rows:
        seg = r["segment_ids"]
        assert (r["loss_mask"][seg == 0] == 0).all()
        assert (r["tokens"][seg == 0] == 0).all()
        # Padding only at the end of a row.
        nz = np.flatnonzero(seg)
        assert nz.size == 0 or (seg[: nz[-1] + 1] > 0).all()
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert (np.diff(idx) == 1).all()  # contiguous
            np.testing.assert_array_equal(r["positions"][idx], np.arange(idx.size))
            toks = r["tokens"][idx]
            assert len(set(toks.tolist())) == 1
            seen[(int(toks[0]), idx.size)] += 1
    expected = Counter((int(e["tokens"][0]), len(e["tokens"])) for e in examples)
    assert seen == expected
    # FFD with these sizes should fill rows well (sum/L is the lower bound).
    assert len(rows) <= int(np.ceil(sum(len(e["tokens"]) for e in examples) / L)) + 10


def test_too_long_example_errors_and_mentions_trimming():
    with pytest.raises(ValueError, match="trim"):
        pack_examples([ex([1] * 9)], seq_len=8)
    with pytest.raises(ValueError, match="empty"):
        pack_examples([ex([])], seq_len=8)
    with pytest.raises(ValueError, match=r"packing must be one of \('first_fit', 'best_fit'\), got 'worst_fit'"):
        pack_examples([ex([1])], seq_len=8, packing="worst_fit")


def test_next_token_targets_hand_example():
    tokens = np.array([11, 12, 13, 21, 22, 0, 0, 0])
    seg = np.array([1, 1, 1, 2, 2, 0, 0, 0])
    mask = np.array([0, 1, 1, 1, 1, 0, 0, 0], np.float32)
    targets, tmask = next_token_targets(tokens, seg, mask)
    np.testing.assert_array_equal(targets, [12, 13, 21, 22, 0, 0, 0, 0])
    # t=2 -> 21 crosses into segment 2; t=4 -> padding.
    np.testing.assert_array_equal(tmask, [1, 1, 0, 1, 0, 0, 0, 0])
    assert targets.dtype == np.int32 and tmask.dtype == np.float32

    # A prompt token (mask 0) as target is not trained on.
    mask2 = np.array([1, 0, 1, 1, 1, 0, 0, 0], np.float32)
    _, tmask2 = next_token_targets(tokens, seg, mask2)
    np.testing.assert_array_equal(tmask2, [0, 1, 0, 1, 0, 0, 0, 0])

    # Padding is never a target, even if the caller's mask is 1 there.
    _, tmask3 = next_token_targets(np.array([7, 8, 0, 0]), np.array([1, 1, 0, 0]), np.ones(4, np.float32))
    np.testing.assert_array_equal(tmask3, [1, 0, 0, 0])


def test_next_token_targets_full_row_and_batch():
    tokens = np.array([[5, 6, 7, 8], [9, 10, 11, 0]])
    seg = np.array([[1, 1, 2, 2], [1, 1, 1, 0]])
    mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0]], np.float32)
    targets, tmask = next_token_targets(tokens, seg, mask)
    np.testing.assert_array_equal(targets, [[6, 7, 8, 0], [10, 11, 0, 0]])
    # The last position of a full row never has a target.
    np.testing.assert_array_equal(tmask, [[1, 0, 1, 0], [1, 1, 0, 0]])
