"""Answer-preserving trimming of tokenised samples to a token budget C.

Implements ZAYA1-8B report §III-A on ``TokenizedSample`` (token tuples per
turn, see ``formatting.py``); lengths are token counts of the rendered
sequence, ``len(sample)``:

1. If the whole conversation fits in C, keep it unchanged ("kept").
2. Otherwise cut the *tail* of the last turn's reasoning -- the part right
   before the answer -- keeping its start, the ``</think>`` closing tag and the
   full answer; the number of reasoning tokens kept is the largest that fits
   C exactly ("trimmed").
3. Multi-turn: if even removing all of the last turn's reasoning tokens does
   not fit, remove the think blocks (tags included) of all earlier turns,
   keeping their prompts and answers, then apply steps 1-2 again ("trimmed").
4. If the sample still does not fit -- i.e. what may not be cut (prompts,
   answers, eos, and the last turn's ``<think></think>`` tags) alone exceeds
   C -- drop it ("dropped"). Prompts are never cut, so an over-long prompt
   drops the sample too rather than producing an answer with no question.

Plain-text samples have no reasoning to cut: they are kept if they fit and
dropped otherwise (the pipeline splits long plain text into chunks before
calling this, so in practice they always fit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from train.data.formatting import TokenizedSample, Turn

OUTCOMES = ("kept", "trimmed", "dropped")


@dataclass
class TrimCounters:
    """How many samples each trimming outcome has seen."""

    kept: int = 0
    trimmed: int = 0
    dropped: int = 0

    def update(self, outcome: str) -> None:
        if outcome not in OUTCOMES:
            raise ValueError(f"unknown trim outcome {outcome!r}")
        setattr(self, outcome, getattr(self, outcome) + 1)

    @property
    def total(self) -> int:
        return self.kept + self.trimmed + self.dropped

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, int]) -> TrimCounters:
        return cls(**{k: int(d[k]) for k in OUTCOMES})


def _truncate_last_reasoning(sample: TokenizedSample, budget: int) -> TokenizedSample | None:
    """Step 2: shorten the last turn's reasoning so the sample is exactly ``budget`` long.

    Returns None when that is impossible (no think block, or zero reasoning
    tokens still overflow).
    """
    last = sample.turns[-1]
    if last.thinking is None:
        return None
    fixed = len(sample) - len(last.thinking)
    if fixed > budget:
        return None
    keep = budget - fixed  # < len(last.thinking) because the sample overflowed
    new_last = Turn(prompt=last.prompt, thinking=last.thinking[:keep], answer=last.answer)
    return sample.with_turns((*sample.turns[:-1], new_last))


def trim_sample(sample: TokenizedSample, budget: int) -> tuple[TokenizedSample | None, str]:
    """Fit ``sample`` into ``budget`` tokens; returns ``(sample or None, outcome)``.

    ``outcome`` is "kept" (unchanged), "trimmed" (reasoning removed, answers
    intact) or "dropped" (result is None).
    """
    if budget <= 0:
        raise ValueError(f"budget must be positive, got {budget}")
    # Step 1.
    if len(sample) <= budget:
        return sample, "kept"
    if sample.is_text:
        return None, "dropped"
    # Step 2.
    cut = _truncate_last_reasoning(sample, budget)
    if cut is not None:
        return cut, "trimmed"
    # Step 3: earlier turns lose their whole think block (a reasoning block cut
    # mid-way in an earlier turn would be followed by more conversation, which
    # the model never sees at inference; removing it is the cleaner signal).
    if len(sample.turns) > 1:
        earlier = tuple(Turn(t.prompt, None, t.answer) for t in sample.turns[:-1])
        stripped = sample.with_turns((*earlier, sample.turns[-1]))
        if len(stripped) <= budget:
            return stripped, "trimmed"
        cut = _truncate_last_reasoning(stripped, budget)
        if cut is not None:
            return cut, "trimmed"
    # Step 4.
    return None, "dropped"
