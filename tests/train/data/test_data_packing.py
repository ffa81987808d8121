"""Tests for train/data/packing.py: row layout, first-fit-decreasing, no splits, targets mask."""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest

from train.data.packing import first_fit_decreasing, next_token_targets, pack_examples


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


def test_no_document_split_and_every_document_once():
    rng = random.Random(1)
    L = 32
    examples = [ex([1000 + i] * rng.randint(1, L)) for i in range(200)]
    rows = pack_examples(examples, L)
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
