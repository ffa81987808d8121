"""Markovian RSA: test-time compute whose memory does not grow with the number of rounds (reference section 5).

Parameters (RSAConfig): population N, candidates per aggregation prompt C, aggregation rounds T, per-rollout budget
beta (max new tokens), carried tail tau <= beta (tokens).

    round 0:      N rollouts of the question, each <= beta new tokens
    round t>=1:   for each of the N rows, C tails drawn uniformly without replacement from round t-1's rollouts
                  (a tail = the last tau tokens of the reasoning before </think>, or of the whole rollout if it has
                  none) go into an aggregation prompt; N new rollouts of <= beta tokens
    answer:       extracted (last \\boxed{} or a regex) from each final-round rollout; majority vote

C = 1 is the Markovian-continuation (Delethink-style) variant: row i continues from its own tail, with the "refine
this trajectory" prompt. T = 0 is plain parallel sampling with a majority vote.

Prompt format: the aggregation prompts of Zyphra's reference proxy for ZAYA1-8B (vllm `examples/markovian_rsa/
rsa_proxy_server.py`, "settings from the ZAYA1-8B tech report"), reproduced in `PAPER_FORMAT`; `COMPACT_FORMAT` keeps
the structure with short headers for small-context models. The message is tokenised in pieces and the tails are
inserted as the rollouts' own token ids (never re-tokenised), so a prompt's length is exact:
    fixed(question) + sum of its tails' lengths <= fixed(question) + C * tau.
Every round (round 0 too) is left-padded to that bound, `prompt_capacity`, so each round decodes as one batch of
[rows, prompt_capacity + beta] cache slots: the peak cache is the same for T = 1 and T = 8.

Several questions run together: each round decodes questions x N rows (in batches of `batch_size` rows).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from zaya_jax.answers import extract_answer, majority_answer
from zaya_jax.generate import generate_ids
from zaya_jax.model import ZayaForCausalLM
from zaya_jax.tokenizers import Tokenizer, reasoning_prompt


@dataclasses.dataclass(frozen=True)
class AggregationFormat:
    """The text around the question and the candidate tails; pieces are joined with newlines."""

    instruction_many: str  # C > 1
    instruction_one: str  # C = 1 (refine one trajectory)
    problem_header: str
    candidates_header_many: str
    candidates_header_one: str
    solution_header: str  # formatted with i = 1..C
    candidate_header_one: str
    closing_many: str
    closing_one: str


PAPER_FORMAT = AggregationFormat(
    instruction_many=(
        "You are given a math problem and several candidate solutions. Some candidates may be incorrect or contain "
        "errors. Aggregate the useful ideas and produce a single, high-quality solution. Reason carefully; if "
        "candidates disagree, choose the correct path. If all are incorrect, then attempt a different strategy. Do "
        "not restate the problem or the candidate solutions."
    ),
    instruction_one=(
        "You are given a math problem and a candidate solution. The candidate may be incomplete or contain errors. "
        "Refine this trajectory and produce an improved, higher-quality solution. If it is entirely wrong, attempt "
        "a new strategy. End with the final result in \\boxed{}.\n"
    ),
    problem_header="[[ Problem ]]:\n",
    candidates_header_many="[[ Candidate solutions (may contain mistakes) ]]:\n",
    candidates_header_one="[[ Candidate solutions (may contain mistakes) ]]\n",
    solution_header="---- Solution {i} ----\n",
    candidate_header_one="---- Candidate ----\n",
    closing_many="Now write a single improved solution. Provide clear reasoning and end with the final answer in "
                 "\\boxed{}.",
    closing_one="Now, based on the original problem and the reference response above, please provide your own "
                "comprehensive solution.",
)

COMPACT_FORMAT = AggregationFormat(
    instruction_many="Aggregate:", instruction_one="Refine:", problem_header="Problem:", candidates_header_many="",
    candidates_header_one="", solution_header="-- {i} --", candidate_header_one="-- 1 --", closing_many="Solve:",
    closing_one="Solve:",
)

FORMATS = {"paper": PAPER_FORMAT, "compact": COMPACT_FORMAT}


@dataclasses.dataclass(frozen=True)
class RSAConfig:
    population: int = 16  # N
    candidates: int = 4  # C
    rounds: int = 2  # T aggregation rounds after round 0
    budget: int = 8192  # beta: max new tokens per rollout
    tail: int = 4096  # tau: carried tail tokens
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    prompt_format: str = "paper"
    answer_pattern: str | None = None  # a regex with one group; None = the last \boxed{}
    batch_size: int | None = None  # rows per decode call; None = the whole round
    seed: int = 0

    def __post_init__(self):
        checks = [
            (self.population >= 1, "population", "must be >= 1"),
            (1 <= self.candidates <= self.population, "candidates", f"must be in [1, population={self.population}]"),
            (self.rounds >= 0, "rounds", "must be >= 0"),
            (self.budget >= 1, "budget", "must be >= 1"),
            (1 <= self.tail <= self.budget, "tail", f"must be in [1, budget={self.budget}]"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (self.prompt_format in FORMATS, "prompt_format", f"must be one of {sorted(FORMATS)}"),
            (self.batch_size is None or self.batch_size >= 1, "batch_size", "must be >= 1 or None"),
        ]
        for ok, field, reason in checks:
            if not ok:
                raise ValueError(f"RSAConfig.{field} = {getattr(self, field)!r} {reason}")


class RoundStats(NamedTuple):
    round: int
    rows: int  # rollouts decoded this round (questions x N)
    prompt_tokens_max: int  # the longest real prompt of the round (<= prompt_capacity)
    generated_tokens: int  # new tokens over all rows, stop tokens included
    finished: float  # fraction of rollouts that closed their reasoning with </think>
    answered: float  # fraction with an extractable answer
    agreement: float  # mean over questions of (votes for the majority answer) / N
    cache_slots: int  # rows x (prompt_capacity + budget): the K/V slots each layer held while decoding
    seconds: float


class RSAResult(NamedTuple):
    answers: list[str | None]  # majority answer of the final round, per question
    final_answers: list[list[str | None]]  # every final-round rollout's extracted answer, per question
    final_texts: list[list[str]]  # the final-round rollouts, decoded
    rounds: list[RoundStats]


def reasoning_tail(ids: Sequence[int], tokenizer: Tokenizer, tail: int) -> list[int]:
    """The last `tail` tokens of a rollout's reasoning: before </think> if it has one, stop tokens removed."""
    ids = [t for t in ids if t not in (tokenizer.eos_id, tokenizer.pad_id)]
    if tokenizer.end_think_id in ids:
        ids = ids[: ids.index(tokenizer.end_think_id)]
    return ids[-tail:] if ids else []


def aggregation_message(question: str, tails: Sequence[Sequence[int]], tokenizer: Tokenizer,
                        fmt: AggregationFormat = PAPER_FORMAT) -> list[int]:
    """Token ids of the aggregation message for `question` and candidate `tails` (one tail: the refine variant)."""
    one = len(tails) == 1
    pieces: list[str | Sequence[int]] = [
        fmt.instruction_one if one else fmt.instruction_many, fmt.problem_header, question.strip() + "\n",
        fmt.candidates_header_one if one else fmt.candidates_header_many,
    ]
    for i, tail in enumerate(tails, 1):
        header = fmt.candidate_header_one if one else fmt.solution_header.format(i=i)
        pieces.append([*tokenizer.encode(header), *tail, *tokenizer.encode("\n")])
    pieces.append(fmt.closing_one if one else fmt.closing_many)
    newline = tokenizer.encode("\n")
    body: list[int] = []
    for k, piece in enumerate(p for p in pieces if len(p) > 0):
        body += ([*newline] if k else []) + (tokenizer.encode(piece) if isinstance(piece, str) else list(piece))
    return body


def aggregation_prompt(question: str, tails: Sequence[Sequence[int]], tokenizer: Tokenizer,
                       fmt: AggregationFormat = PAPER_FORMAT) -> list[int]:
    """The aggregation message in the reasoning-turn format: what an aggregation round decodes from."""
    return reasoning_prompt(tokenizer, aggregation_message(question, tails, tokenizer, fmt))


def prompt_capacity(question: str, tokenizer: Tokenizer, config: RSAConfig) -> int:
    """The most tokens any prompt of `question` can have in this run: the aggregation prompt with C full tails
    (or the plain question, if longer)."""
    fmt = FORMATS[config.prompt_format]
    empty = aggregation_prompt(question, [[]] * config.candidates, tokenizer, fmt) if config.rounds else []
    return max(len(reasoning_prompt(tokenizer, question)), len(empty) + config.candidates * config.tail)


def markovian_rsa(model: ZayaForCausalLM, tokenizer: Tokenizer, questions: Sequence[str],
                  config: RSAConfig) -> RSAResult:
    """Runs Markovian RSA on every question (see the module docstring); each round decodes as one batch."""
    if not questions:
        raise ValueError("markovian_rsa needs at least one question")
    n, c = config.population, config.candidates
    fmt = FORMATS[config.prompt_format]
    capacity = max(prompt_capacity(q, tokenizer, config) for q in questions)
    if capacity + config.budget > model.config.max_position_embeddings:
        raise ValueError(f"prompt capacity {capacity} + budget {config.budget} exceeds the model's "
                         f"max_position_embeddings ({model.config.max_position_embeddings}); lower tail, "
                         f"candidates or budget")
    rng = np.random.default_rng(config.seed)
    rows = len(questions) * n
    sampling = dict(temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,
                    stop_tokens=(tokenizer.eos_id,))
    prompts = [reasoning_prompt(tokenizer, q) for q in questions for _ in range(n)]
    stats: list[RoundStats] = []
    for round_index in range(config.rounds + 1):
        if round_index > 0:
            tails = [reasoning_tail(ids, tokenizer, config.tail) for ids in rollouts]
            prompts = []
            for qi, question in enumerate(questions):
                pool = tails[qi * n:(qi + 1) * n]
                for i in range(n):
                    chosen = [pool[i]] if c == 1 else [pool[j] for j in rng.choice(n, size=c, replace=False)]
                    prompts.append(aggregation_prompt(question, chosen, tokenizer, fmt))
        start = time.perf_counter()
        rollouts = generate_ids(model, prompts, config.budget, pad_to=capacity, batch_size=config.batch_size,
                                pad_id=tokenizer.pad_id, seed=config.seed * 1_000_003 + round_index, **sampling)
        seconds = time.perf_counter() - start
        answers = [extract_answer(tokenizer.decode(ids), config.answer_pattern) for ids in rollouts]
        votes = [majority_answer(answers[qi * n:(qi + 1) * n])[1] / n for qi in range(len(questions))]
        stats.append(RoundStats(
            round=round_index, rows=rows, prompt_tokens_max=max(len(p) for p in prompts),
            generated_tokens=sum(len(ids) for ids in rollouts),
            finished=float(np.mean([tokenizer.end_think_id in ids for ids in rollouts])),
            answered=float(np.mean([a is not None for a in answers])), agreement=float(np.mean(votes)),
            cache_slots=(config.batch_size or rows) * (capacity + config.budget), seconds=seconds,
        ))
    final_answers = [answers[qi * n:(qi + 1) * n] for qi in range(len(questions))]
    return RSAResult(
        answers=[majority_answer(a)[0] for a in final_answers],
        final_answers=final_answers,
        final_texts=[[tokenizer.decode(ids) for ids in rollouts[qi * n:(qi + 1) * n]] for qi in range(len(questions))],
        rounds=stats,
    )
