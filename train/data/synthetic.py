"""Deterministic synthetic reasoning problems (multi-step integer arithmetic).

Each record is a dict of three strings::

    {"prompt":   "Compute ((17 + 5) * 3) - 8.",
     "thinking": "17 + 5 = 22\\n22 * 3 = 66\\n66 - 8 = 58",
     "answer":   "\\\\boxed{58}"}

A problem applies 2..4 operations (+, -, *) left to right to small
non-negative integers; the prompt parenthesises so that ordinary precedence
gives the same value, and the thinking trace has one ``a op b = c`` line per
operation. Prompt+thinking+answer is typically 60..110 bytes, so a byte-level
model at sequence length 256 sees whole problems.

Problem ``i`` of a split is a pure function of ``(seed, split, i)``, which
makes the generator random-access (``problem_at``) and therefore shardable
and checkpointable by index. The "train" and "heldout" splits are disjoint by
construction: every problem text is assigned to one split by a stable hash of
its prompt, and each split's generator resamples until it lands in its own
bucket. So no seed choice can leak a held-out problem into training.

``aggregation_problem_at`` turns problem ``i`` into supervised data for
Markovian RSA, as ZAYA1's SFT did (reference section 5.4: aggregation
prompts built from several rollouts' tails, the correct solution as the
target): half of the records stay plain; the other half carry 1..3
candidate traces, each the correct one or a corrupted one (one step's result
off by 1..3, the later steps recomputed from it, so the final answer is
wrong), whose last ``AGGREGATION_TAIL`` characters go into a compact-format
aggregation prompt (``zaya_jax.rsa.COMPACT_FORMAT``). The target is the
problem's own trace and answer.

Also here: ``answer_accuracy`` (exact-match rate of answers extracted by
``zaya_jax.answers.extract_answer``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import numpy as np

from zaya_jax.answers import extract_answer

SPLITS = ("train", "heldout")
# One problem text in this many belongs to the held-out split.
_HELDOUT_BUCKETS = 8
# Each split draws from its own rng stream even for equal seeds.
_SPLIT_STREAM = {"train": 0, "heldout": 1}
# Keep intermediate values small so traces (and the numbers a tiny model must
# multiply) stay short.
_MAX_VALUE_FOR_MUL = 60


def _split_of_prompt(prompt: str) -> str:
    # sha256 rather than hash(): Python's str hash is salted per process.
    h = int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "little")
    return "heldout" if h % _HELDOUT_BUCKETS == 0 else "train"


def _draw_problem(rng: np.random.Generator) -> dict[str, str]:
    n_ops = int(rng.integers(2, 5))  # 2..4 operations
    value = int(rng.integers(1, 21))
    expr = str(value)
    steps: list[str] = []
    for k in range(n_ops):
        ops = ["+"]
        if value > 0:
            ops.append("-")
        if value <= _MAX_VALUE_FOR_MUL:
            ops.append("*")
        op = ops[int(rng.integers(len(ops)))]
        if op == "+":
            b = int(rng.integers(1, 21))
            new = value + b
        elif op == "-":
            # b <= value keeps every intermediate non-negative, so the trace
            # never needs a minus sign that could be confused with the operator.
            b = int(rng.integers(1, min(value, 20) + 1))
            new = value - b
        else:
            b = int(rng.integers(2, 10))
            new = value * b
        steps.append(f"{value} {op} {b} = {new}")
        # Parenthesise the running expression so left-to-right evaluation is
        # what standard precedence computes; the outermost pair is omitted.
        expr = f"{expr} {op} {b}" if k == 0 else f"({expr}) {op} {b}"
        value = new
    return {
        "prompt": f"Compute {expr}.",
        "thinking": "\n".join(steps),
        "answer": f"\\boxed{{{value}}}",
    }


def problem_at(index: int, seed: int, split: str = "train") -> dict[str, str]:
    """Problem number ``index`` of ``split`` for ``seed`` (pure function)."""
    if split not in _SPLIT_STREAM:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if index < 0 or seed < 0:
        raise ValueError(f"index and seed must be non-negative, got index={index}, seed={seed}")
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index])
    # About 1/8 of draws land in the held-out bucket, so train needs ~1.14
    # draws on average and heldout ~8; the loop bound is only a safety net.
    for _ in range(10_000):
        rec = _draw_problem(rng)
        if _split_of_prompt(rec["prompt"]) == split:
            return rec
    raise RuntimeError("synthetic generator failed to draw a problem for the split")  # pragma: no cover


AGGREGATION_TAIL = 32  # characters (= tokens for the byte tokenizer) of each candidate's reasoning
AGGREGATION_CANDIDATES = (1, 2, 3)
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def corrupt_trace(thinking: str, rng: np.random.Generator) -> str:
    """The trace with one step's result off by 1..3 and every later step recomputed from the wrong value."""
    steps = [line.split(" ") for line in thinking.split("\n")]  # [a, op, b, "=", c]
    k = int(rng.integers(len(steps)))
    value = None
    for j, (a, op, b, _, c) in enumerate(steps):
        a = int(a) if value is None else value
        value = _OPS[op](a, int(b))
        if j == k:
            value += int(rng.choice([-3, -2, -1, 1, 2, 3]))
        steps[j] = [str(a), op, b, "=", str(value)]
    return "\n".join(" ".join(step) for step in steps)


def aggregation_problem_at(index: int, seed: int, split: str = "train") -> dict[str, str]:
    """Problem ``index`` of ``split``, as a plain record or an RSA aggregation record (module docstring)."""
    from zaya_jax.rsa import COMPACT_FORMAT, aggregation_message  # noqa: PLC0415  (model package; import on use)
    from zaya_jax.tokenizers import ByteTokenizer  # noqa: PLC0415

    problem = problem_at(index, seed, split)
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split], index, 1])
    if rng.random() < 0.5:
        return problem
    count = int(rng.choice(AGGREGATION_CANDIDATES))
    candidates = [problem["thinking"] if rng.random() < 0.5 else corrupt_trace(problem["thinking"], rng)
                  for _ in range(count)]
    tokenizer = ByteTokenizer()
    tails = [tokenizer.encode(c[-AGGREGATION_TAIL:]) for c in candidates]
    message = aggregation_message(problem["prompt"], tails, tokenizer, COMPACT_FORMAT)
    return {"prompt": tokenizer.decode(message), "thinking": problem["thinking"], "answer": problem["answer"]}


def generate_problems(n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """The first ``n`` problems of ``split`` for ``seed``: ``problem_at(i, ...)`` for i < n."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return [problem_at(i, seed, split) for i in range(n)]


def answer_accuracy(
    predictions: Sequence[str],
    records: Sequence[Mapping[str, str]],
    pattern: str | None = None,
) -> float:
    """Fraction of predictions whose extracted answer equals the record's.

    The reference is extracted from ``record["answer"]`` the same way, so a
    record answer ``\\boxed{58}`` matches a prediction ending ``... \\boxed{58}``.
    A prediction with no extractable answer counts as wrong.
    """
    if len(predictions) != len(records):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    if not records:
        raise ValueError("answer_accuracy needs at least one record")
    correct = 0
    for pred, rec in zip(predictions, records):
        ref = extract_answer(rec["answer"], pattern)
        if ref is None:
            raise ValueError(f"record answer has no extractable answer: {rec['answer']!r}")
        got = extract_answer(pred, pattern)
        correct += int(got is not None and got == ref)
    return correct / len(records)
