"""Tests for answer-preserving trimming (ZAYA1-8B report §III-A), on hand-built token samples.

Every expected token list below is written out by hand. Convention in the
samples: <think> = 3, </think> = 4 (think_close has no newline here to keep
the arithmetic visible), eos = 2, prompt ids 1x, reasoning 2x/4x, answers 3x/5x.
"""

from __future__ import annotations

import random

import pytest

from train.data.formatting import TokenizedSample, Turn, tokenize_record
from zaya_jax.tokenizers import ByteTokenizer
from train.data.trimming import TrimCounters, trim_sample


def single_turn() -> TokenizedSample:
    # 3 prompt + (1 + 5 + 1) think block + 3 answer = 13 tokens.
    return TokenizedSample(
        turns=(Turn(prompt=(1, 10, 11), thinking=(20, 21, 22, 23, 24), answer=(30, 31, 2)),),
        think_open=(3,),
        think_close=(4,),
    )


def two_turns() -> TokenizedSample:
    # turn 1: 2 + (1+3+1) + 2 = 9; turn 2: 1 + (1+4+1) + 3 = 10; total 19.
    return TokenizedSample(
        turns=(
            Turn(prompt=(1, 10), thinking=(20, 21, 22), answer=(30, 2)),
            Turn(prompt=(11,), thinking=(40, 41, 42, 43), answer=(50, 51, 2)),
        ),
        think_open=(3,),
        think_close=(4,),
    )


FULL_1 = [1, 10, 11, 3, 20, 21, 22, 23, 24, 4, 30, 31, 2]


@pytest.mark.parametrize("budget", [13, 14, 100])
def test_rule1_fits_is_unchanged(budget):
    s = single_turn()
    out, outcome = trim_sample(s, budget)
    assert outcome == "kept"
    assert out.token_ids() == FULL_1


@pytest.mark.parametrize(
    "budget, expected",
    [
        # One token over: the last reasoning token goes, </think> and answer stay.
        (12, [1, 10, 11, 3, 20, 21, 22, 23, 4, 30, 31, 2]),
        (9, [1, 10, 11, 3, 20, 4, 30, 31, 2]),
        # No reasoning left, but the think block still opens and closes.
        (8, [1, 10, 11, 3, 4, 30, 31, 2]),
    ],
)
def test_rule2_cuts_reasoning_tail(budget, expected):
    out, outcome = trim_sample(single_turn(), budget)
    assert outcome == "trimmed"
    assert out.token_ids() == expected
    assert len(out) == budget


def test_rule4_single_turn_too_long_even_without_reasoning_is_dropped():
    out, outcome = trim_sample(single_turn(), 7)
    assert (out, outcome) == (None, "dropped")


def test_rule4_answer_alone_exceeds_budget():
    s = TokenizedSample(
        turns=(Turn(prompt=(1,), thinking=(20,), answer=(30, 31, 32, 33, 34, 2)),),
        think_open=(3,),
        think_close=(4,),
    )
    # The answer section alone is 6 tokens > 5.
    assert trim_sample(s, 5) == (None, "dropped")


FULL_2 = [1, 10, 3, 20, 21, 22, 4, 30, 2, 11, 3, 40, 41, 42, 43, 4, 50, 51, 2]


@pytest.mark.parametrize(
    "budget, outcome, expected",
    [
        (19, "kept", FULL_2),
        # Rule 2 alone suffices: earlier reasoning untouched, last reasoning cut.
        (17, "trimmed", [1, 10, 3, 20, 21, 22, 4, 30, 2, 11, 3, 40, 41, 4, 50, 51, 2]),
        (15, "trimmed", [1, 10, 3, 20, 21, 22, 4, 30, 2, 11, 3, 4, 50, 51, 2]),
        # Rule 3: even 0 last-turn reasoning tokens (15) > 14, so the earlier think
        # block goes; the freed room then holds ALL of the last reasoning.
        (14, "trimmed", [1, 10, 30, 2, 11, 3, 40, 41, 42, 43, 4, 50, 51, 2]),
        # Rule 3 then rule 2 again.
        (12, "trimmed", [1, 10, 30, 2, 11, 3, 40, 41, 4, 50, 51, 2]),
        (10, "trimmed", [1, 10, 30, 2, 11, 3, 4, 50, 51, 2]),
        # Prompts + answers + last think tags = 10 > 9.
        (9, "dropped", None),
    ],
)
def test_multi_turn_rules(budget, outcome, expected):
    out, got = trim_sample(two_turns(), budget)
    assert got == outcome
    if expected is None:
        assert out is None
    else:
        assert out.token_ids() == expected


def test_last_turn_without_thinking_goes_to_rule3():
    s = TokenizedSample(
        turns=(
            Turn(prompt=(1, 10), thinking=(20, 21, 22), answer=(30, 2)),
            Turn(prompt=(11,), thinking=None, answer=(50, 2)),
        ),
        think_open=(3,),
        think_close=(4,),
    )
    # Full: 9 + 3 = 12. Nothing to cut in the last turn -> drop earlier block -> 7.
    out, outcome = trim_sample(s, 8)
    assert outcome == "trimmed"
    assert out.token_ids() == [1, 10, 30, 2, 11, 50, 2]
    assert trim_sample(s, 6) == (None, "dropped")


def test_text_samples_kept_or_dropped():
    s = TokenizedSample(text=(1, 7, 8, 9, 2))
    assert trim_sample(s, 5)[1] == "kept"
    assert trim_sample(s, 4) == (None, "dropped")


def test_trim_on_real_formatting_keeps_reasoning_start_and_answer():
    tok = ByteTokenizer()
    s = tokenize_record({"prompt": "Q", "thinking": "abcdef", "answer": "A"}, tok)
    # bos Q \n <think> a b c d e f </think> \n A eos = 14 tokens.
    assert len(s) == 14
    out, outcome = trim_sample(s, 11)
    assert outcome == "trimmed"
    assert tok.decode(out.token_ids()) == "Q\n<think>abc</think>\nA"


def test_invariants_on_random_samples():
    """Whatever the budget: fits, answers and prompts intact, last reasoning is a prefix."""
    rng = random.Random(0)
    for _ in range(300):
        turns = []
        for k in range(rng.randint(1, 3)):
            turns.append(
                Turn(
                    prompt=tuple(rng.randrange(10, 20) for _ in range(rng.randint(1, 5))),
                    thinking=tuple(rng.randrange(20, 30) for _ in range(rng.randint(0, 12))),
                    answer=tuple(rng.randrange(30, 40) for _ in range(rng.randint(1, 4))) + (2,),
                )
            )
        s = TokenizedSample(turns=tuple(turns), think_open=(3,), think_close=(4, 15))
        budget = rng.randint(1, len(s) + 2)
        out, outcome = trim_sample(s, budget)
        # Minimal keepable length computed independently of the code under test.
        minimal = sum(len(t.prompt) + len(t.answer) for t in turns) + 3
        if len(s) <= budget:
            assert outcome == "kept" and out == s
        elif minimal > budget:
            assert (out, outcome) == (None, "dropped")
        else:
            assert outcome == "trimmed"
            assert len(out) <= budget
            assert [t.prompt for t in out.turns] == [t.prompt for t in turns]
            assert [t.answer for t in out.turns] == [t.answer for t in turns]
            last, orig = out.turns[-1], turns[-1]
            assert last.thinking is not None
            assert orig.thinking[: len(last.thinking)] == last.thinking
            # Any cut of the last reasoning must be the largest that fits.
            if len(last.thinking) < len(orig.thinking):
                assert len(out) == budget


def test_counters():
    c = TrimCounters()
    for o in ["kept", "kept", "trimmed", "dropped", "kept"]:
        c.update(o)
    assert (c.kept, c.trimmed, c.dropped, c.total) == (3, 1, 1, 5)
    assert TrimCounters.from_dict(c.as_dict()) == c
    with pytest.raises(ValueError):
        c.update("lost")
    with pytest.raises(ValueError):
        trim_sample(single_turn(), 0)
