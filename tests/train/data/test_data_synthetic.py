"""Tests for train/data/synthetic.py: determinism, split disjointness, correct arithmetic, answers."""

from __future__ import annotations

import re

import numpy as np
import pytest

from train.data.synthetic import (
    aggregation_problem_at,
    answer_accuracy,
    corrupt_trace,
    generate_problems,
    problem_at,
)

_STEP = re.compile(r"^(\d+) ([+\-*]) (\d+) = (\d+)$")


def test_deterministic_and_seed_dependent():
    a = generate_problems(40, seed=3)
    b = generate_problems(40, seed=3)
    c = generate_problems(40, seed=4)
    assert a == b
    assert a != c
    # Prefix property: problem i does not depend on n.
    assert generate_problems(10, seed=3) == a[:10]
    assert problem_at(17, seed=3) == a[17]


def test_record_shape_and_example_format():
    for rec in generate_problems(20, seed=0):
        assert set(rec) == {"prompt", "thinking", "answer"}
        assert rec["prompt"].startswith("Compute ") and rec["prompt"].endswith(".")
        assert re.fullmatch(r"\\boxed\{\d+\}", rec["answer"])


def test_train_and_heldout_are_disjoint():
    train = {r["prompt"] for r in generate_problems(3000, seed=0, split="train")}
    for seed in (0, 1, 7):
        held = {r["prompt"] for r in generate_problems(300, seed=seed, split="heldout")}
        assert len(held) > 250  # mostly distinct problems, not a degenerate set
        assert not train & held
    # Also across seeds on the train side.
    train_other = {r["prompt"] for r in generate_problems(1000, seed=5, split="train")}
    held5 = {r["prompt"] for r in generate_problems(300, seed=5, split="heldout")}
    assert not train_other & held5


def _eval_expression(prompt: str) -> int:
    m = re.fullmatch(r"Compute (.*)\.", prompt)
    assert m, prompt
    expr = m.group(1)
    assert re.fullmatch(r"[\d +\-*()]+", expr), expr
    return eval(expr, {"__builtins__": {}}, {})  # only digits/operators/parens, checked above


def test_thinking_trace_arithmetic_matches_boxed_answer():
    for rec in generate_problems(300, seed=11) + generate_problems(100, seed=11, split="heldout"):
        answer = int(re.fullmatch(r"\\boxed\{(\d+)\}", rec["answer"]).group(1))
        # Independent check 1: Python evaluates the prompt's expression.
        assert _eval_expression(rec["prompt"]) == answer, rec
        # Independent check 2: every trace line is correct and chained.
        lines = rec["thinking"].split("\n")
        n_ops = len(re.findall(r" [+\-*] ", rec["prompt"]))
        assert 2 <= n_ops <= 4 and len(lines) == n_ops, rec
        prev = int(re.match(r"Compute \(*(\d+)", rec["prompt"]).group(1))
        for line in lines:
            a, op, b, c = _STEP.fullmatch(line).groups()
            assert int(a) == prev, rec
            assert eval(f"{a} {op} {b}") == int(c), line
            prev = int(c)
        assert prev == answer


def test_problems_are_short():
    lens = [sum(len(r[k].encode()) for k in ("prompt", "thinking", "answer")) for r in generate_problems(1000, seed=2)]
    assert max(lens) < 130
    assert sum(lens) / len(lens) < 100


def test_bad_split_and_n():
    with pytest.raises(ValueError, match="test"):
        generate_problems(3, seed=0, split="test")
    with pytest.raises(ValueError):
        generate_problems(-1, seed=0)


def test_answer_accuracy():
    records = [{"answer": "\\boxed{58}"}, {"answer": "\\boxed{4}"}, {"answer": "\\boxed{1}"}, {"answer": "\\boxed{9}"}]
    preds = ["<think>...</think>\n\\boxed{58}", "\\boxed{3}", "I don't know", "\\boxed{9}"]
    assert answer_accuracy(preds, records) == 0.5
    with pytest.raises(ValueError):
        answer_accuracy(preds[:2], records)


def _line_holds(line: str) -> bool:
    a, op, b, _, c = line.split(" ")
    return {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op] == int(c)


def test_corrupt_trace_breaks_exactly_one_step_and_carries_the_error():
    rng = np.random.default_rng(0)
    for i in range(50):
        thinking = problem_at(i, seed=2)["thinking"]
        bad = corrupt_trace(thinking, rng).split("\n")
        good = thinking.split("\n")
        assert len(bad) == len(good)
        assert sum(not _line_holds(line) for line in bad) == 1
        assert bad[-1].split(" ")[-1] != good[-1].split(" ")[-1]  # the final value is wrong
        for prev, line in zip(bad, bad[1:]):  # each step starts from the previous (wrong) result
            assert line.split(" ")[0] == prev.split(" ")[-1]


def test_aggregation_records_mix_plain_and_aggregation_prompts_with_the_true_target():
    records = [aggregation_problem_at(i, seed=1) for i in range(200)]
    assert records == [aggregation_problem_at(i, seed=1) for i in range(200)]  # a pure function of the index
    aggregated = 0
    for i, record in enumerate(records):
        plain = problem_at(i, seed=1)
        assert (record["thinking"], record["answer"]) == (plain["thinking"], plain["answer"])
        if record["prompt"] == plain["prompt"]:
            continue
        aggregated += 1
        assert record["prompt"].startswith(("Aggregate:\nProblem:\n", "Refine:\nProblem:\n"))
        assert f"\n{plain['prompt']}\n" in record["prompt"] and record["prompt"].endswith("\nSolve:")
        tails = re.findall(r"-- \d --(.*?)\n\n", record["prompt"], flags=re.S)
        assert 1 <= len(tails) <= 3 and all(len(t) <= 32 for t in tails)
    assert 70 <= aggregated <= 130


def test_synthetic_rsa_source_spec():
    from train.data.sources import open_source

    source = open_source("synthetic-rsa:train:5", seed=1)
    assert len(source) == 5 and source[3] == aggregation_problem_at(3, seed=1)
