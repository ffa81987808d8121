"""Tests for train/data/formatting.py on hand-computed byte-tokenizer ids.

Byte ids: pad 0, bos 1, eos 2, <think> 3, </think> 4, byte b -> b + 5.
So '\\n' = 15, 'a' = 102, 'b' = 103, 'c' = 104, 'd' = 105, 'e' = 106, 'h' = 109, 'i' = 110.
"""

from __future__ import annotations

import numpy as np
import pytest

from train.data.formatting import format_record, record_kind, tokenize_record
from zaya_jax.tokenizers import ByteTokenizer

TOK = ByteTokenizer()


def test_single_turn_tokens_spans_and_masks():
    s = tokenize_record({"prompt": "a", "thinking": "b", "answer": "c"}, TOK)
    #                    bos  a   \n  <t>  b  </t> \n   c  eos
    assert s.token_ids() == [1, 102, 15, 3, 103, 4, 15, 104, 2]
    assert len(s) == 9
    (sp,) = s.spans()
    assert sp.prompt == (0, 3)
    assert sp.think_block == (3, 7)
    assert sp.thinking == (4, 5)
    assert sp.answer == (7, 9)
    np.testing.assert_array_equal(s.loss_mask(True), [0, 0, 0, 1, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(s.loss_mask(False), np.ones(9))
    assert TOK.decode(s.token_ids()) == "a\n<think>b</think>\nc"


def test_multi_turn_and_missing_thinking():
    rec = {
        "turns": [
            {"prompt": "a", "thinking": "b", "answer": "c"},
            {"prompt": "d", "answer": "e"},  # no thinking -> no think block
        ]
    }
    ex = format_record(rec, TOK, completion_only=True)
    np.testing.assert_array_equal(ex["tokens"], [1, 102, 15, 3, 103, 4, 15, 104, 2, 105, 15, 106, 2])
    np.testing.assert_array_equal(ex["loss_mask"], [0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1])
    assert ex["tokens"].dtype == np.int32 and ex["loss_mask"].dtype == np.float32
    spans = tokenize_record(rec, TOK).spans()
    assert spans[1].prompt == (9, 11) and spans[1].think_block is None and spans[1].answer == (11, 13)


def test_empty_thinking_keeps_tags():
    s = tokenize_record({"prompt": "a", "thinking": "", "answer": "c"}, TOK)
    assert s.token_ids() == [1, 102, 15, 3, 4, 15, 104, 2]


def test_plain_text_and_pretokenised():
    ex = format_record({"text": "hi"}, TOK, completion_only=True)
    np.testing.assert_array_equal(ex["tokens"], [1, 109, 110, 2])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1, 1])
    ex = format_record({"tokens": np.array([7, 8, 2])}, TOK)
    np.testing.assert_array_equal(ex["tokens"], [7, 8, 2])
    np.testing.assert_array_equal(ex["loss_mask"], [1, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        format_record({"tokens": [5, 261]}, TOK)


@pytest.mark.parametrize(
    "record, kind",
    [
        ({"text": "x"}, "text"),
        ({"prompt": "p", "answer": "a"}, "reasoning"),
        ({"prompt": "p", "thinking": None, "answer": "a"}, "reasoning"),
        ({"turns": [{"prompt": "p", "answer": "a"}]}, "turns"),
        ({"tokens": [1, 2]}, "tokens"),
    ],
)
def test_record_kind_accepts(record, kind):
    assert record_kind(record) == kind


@pytest.mark.parametrize(
    "record",
    [
        {"foo": 1},
        [1, 2],
        {"prompt": 1, "answer": "a"},
        {"prompt": "p"},
        {"prompt": "p", "answer": "a", "thinking": 3},
        {"turns": []},
        {"turns": [{"prompt": "p"}]},
        {"text": 5},
    ],
)
def test_record_kind_rejects(record):
    with pytest.raises(ValueError):
        record_kind(record)
