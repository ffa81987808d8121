"""Records -> token ids with per-turn spans and a loss mask.

Text format (one string per turn, then concatenated)::

    <bos> prompt "\\n" <think> thinking </think> "\\n" answer <eos>      (turn 1)
          prompt "\\n" <think> thinking </think> "\\n" answer <eos>      (turn 2) ...

``<bos>`` appears once, at the start of the conversation; every turn ends in
``<eos>`` so the model learns to stop after each answer. ``<think>``,
``</think>``, ``<bos>`` and ``<eos>`` are single special ids; the pieces are
tokenised separately and concatenated, so span boundaries are exact token
boundaries (with a BPE tokenizer this can differ slightly from tokenising the
joined string, which is the price of exact spans).

Accepted records:

* reasoning: ``{"prompt", "thinking", "answer"}``; ``thinking`` may be absent
  or ``None``, in which case the think block (tags included) is omitted.
* multi-turn: ``{"turns": [{"prompt", "thinking", "answer"}, ...]}``.
* plain text: ``{"text": str}`` -> ``<bos> text <eos>``.
* pre-tokenised: ``{"tokens": 1-D ints}`` -> used as is (no bos/eos added).

A tokenised reasoning turn is stored as three token tuples::

    prompt   = [<bos>] + ids(prompt) + ids("\\n")       (bos on turn 0 only)
    thinking = ids(thinking)    (None: no think block)   rendered as
               <think> + thinking + </think> + ids("\\n")
    answer   = ids(answer) + [<eos>]

so trimming can drop reasoning tokens while the tags and answer stay intact.

Loss mask (float32, one per token): with ``completion_only=True`` the prompt
span is 0 and the think block (tags included), answer and eos are 1; with
``completion_only=False`` everything is 1. Plain text is always all 1.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from zaya_jax.tokenizers import Tokenizer

Span = tuple[int, int]  # [start, end) in the rendered token sequence


@dataclass(frozen=True)
class Turn:
    """One prompt/reasoning/answer exchange as token ids (see module docstring)."""

    prompt: tuple[int, ...]
    thinking: tuple[int, ...] | None
    answer: tuple[int, ...]


@dataclass(frozen=True)
class TurnSpans:
    """Where a turn's pieces sit in ``TokenizedSample.token_ids()``.

    ``thinking`` is the reasoning content only (between the tags) and
    ``think_block`` the whole block with tags and trailing newline; both are
    ``None`` when the turn has no think block.
    """

    prompt: Span
    think_block: Span | None
    thinking: Span | None
    answer: Span


@dataclass(frozen=True)
class TokenizedSample:
    """A formatted record: reasoning ``turns`` or a flat ``text`` token run.

    Exactly one of ``turns`` (non-empty) / ``text`` is used. ``think_open`` and
    ``think_close`` are the fixed tokens around each kept reasoning span
    (``(<think>,)`` and ``(</think>, *ids("\\n"))``).
    """

    turns: tuple[Turn, ...] = ()
    text: tuple[int, ...] | None = None
    think_open: tuple[int, ...] = ()
    think_close: tuple[int, ...] = ()

    @property
    def is_text(self) -> bool:
        return self.text is not None

    def _think_len(self, turn: Turn) -> int:
        if turn.thinking is None:
            return 0
        return len(self.think_open) + len(turn.thinking) + len(self.think_close)

    def __len__(self) -> int:
        if self.text is not None:
            return len(self.text)
        return sum(len(t.prompt) + self._think_len(t) + len(t.answer) for t in self.turns)

    def spans(self) -> list[TurnSpans]:
        """Per-turn spans in the rendered sequence (empty list for text samples)."""
        out: list[TurnSpans] = []
        pos = 0
        for t in self.turns:
            p = (pos, pos + len(t.prompt))
            pos = p[1]
            block = content = None
            if t.thinking is not None:
                start = pos
                c0 = start + len(self.think_open)
                content = (c0, c0 + len(t.thinking))
                pos = content[1] + len(self.think_close)
                block = (start, pos)
            a = (pos, pos + len(t.answer))
            pos = a[1]
            out.append(TurnSpans(prompt=p, think_block=block, thinking=content, answer=a))
        return out

    def token_ids(self) -> list[int]:
        """The rendered token sequence."""
        if self.text is not None:
            return list(self.text)
        ids: list[int] = []
        for t in self.turns:
            ids += t.prompt
            if t.thinking is not None:
                ids += self.think_open
                ids += t.thinking
                ids += self.think_close
            ids += t.answer
        return ids

    def loss_mask(self, completion_only: bool = True) -> np.ndarray:
        """float32 [len(self)]: 1 where the token is a training target."""
        mask = np.ones(len(self), dtype=np.float32)
        if completion_only and self.text is None:
            for s in self.spans():
                mask[s.prompt[0] : s.prompt[1]] = 0.0
        return mask

    def to_example(self, completion_only: bool = True) -> dict[str, np.ndarray]:
        """``{"tokens": int32 [n], "loss_mask": float32 [n]}``, the unit packing works on."""
        return {
            "tokens": np.asarray(self.token_ids(), dtype=np.int32),
            "loss_mask": self.loss_mask(completion_only),
        }

    def with_turns(self, turns: Sequence[Turn]) -> TokenizedSample:
        return replace(self, turns=tuple(turns))


def record_kind(record: Any) -> str:
    """``"text"``, ``"tokens"``, ``"reasoning"`` or ``"turns"``; ValueError if none fits.

    Sources call this while reading so that a well-formed JSON line that is
    not a usable record is reported like a syntax error, with its location.
    """
    if not isinstance(record, Mapping):
        raise ValueError(f"record must be a JSON object, got {type(record).__name__}")
    if "turns" in record:
        turns = record["turns"]
        if not isinstance(turns, Sequence) or isinstance(turns, str) or not turns:
            raise ValueError("'turns' must be a non-empty list of {prompt, thinking, answer} objects")
        for i, t in enumerate(turns):
            _check_turn(t, f"turns[{i}]")
        return "turns"
    if "prompt" in record or "answer" in record:
        _check_turn(record, "record")
        return "reasoning"
    if "text" in record:
        if not isinstance(record["text"], str):
            raise ValueError("'text' must be a string")
        return "text"
    if "tokens" in record:
        return "tokens"
    raise ValueError(f"record has none of the keys text/prompt+answer/turns/tokens: keys={sorted(record)}")


def is_empty_record(record: Mapping[str, Any]) -> bool:
    """Whether a record has no content: its text (or every prompt, thinking and answer) is blank, or it holds at
    most one token (an eos alone). Such a document trains on bos / eos only."""
    kind = record_kind(record)
    if kind == "text":
        return not record["text"].strip()
    if kind == "tokens":
        return np.asarray(record["tokens"]).size <= 1
    turns = record["turns"] if kind == "turns" else [record]
    return all(not (t.get(key) or "").strip() for t in turns for key in ("prompt", "thinking", "answer"))


def _check_turn(t: Any, where: str) -> None:
    if not isinstance(t, Mapping):
        raise ValueError(f"{where} must be an object")
    for key in ("prompt", "answer"):
        if not isinstance(t.get(key), str):
            raise ValueError(f"{where} needs a string {key!r}")
    if t.get("thinking") is not None and not isinstance(t["thinking"], str):
        raise ValueError(f"{where}: 'thinking' must be a string or null")


def tokenize_record(record: Mapping[str, Any], tokenizer: Tokenizer) -> TokenizedSample:
    """Tokenise one record into a ``TokenizedSample`` (format in module docstring)."""
    kind = record_kind(record)
    if kind == "text":
        return TokenizedSample(text=(tokenizer.bos_id, *tokenizer.encode(record["text"]), tokenizer.eos_id))
    if kind == "tokens":
        ids = np.asarray(record["tokens"]).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            raise ValueError(
                f"pre-tokenised record has ids outside [0, {tokenizer.vocab_size}): "
                f"min={int(ids.min())}, max={int(ids.max())}"
            )
        return TokenizedSample(text=tuple(int(i) for i in ids))
    raw_turns = record["turns"] if kind == "turns" else [record]
    newline = tuple(tokenizer.encode("\n"))
    turns = []
    for i, t in enumerate(raw_turns):
        bos = (tokenizer.bos_id,) if i == 0 else ()
        thinking = t.get("thinking")
        turns.append(
            Turn(
                prompt=(*bos, *tokenizer.encode(t["prompt"]), *newline),
                thinking=None if thinking is None else tuple(tokenizer.encode(thinking)),
                answer=(*tokenizer.encode(t["answer"]), tokenizer.eos_id),
            )
        )
    has_think = any(t.thinking is not None for t in turns)
    # Only touch think ids when needed: an HF tokenizer without <think> can
    # still format think-less reasoning records.
    think_open = (tokenizer.think_id,) if has_think else ()
    think_close = (tokenizer.end_think_id, *newline) if has_think else ()
    return TokenizedSample(turns=tuple(turns), think_open=think_open, think_close=think_close)


def format_record(
    record: Mapping[str, Any], tokenizer: Tokenizer, completion_only: bool = True
) -> dict[str, np.ndarray]:
    """Shortcut: ``tokenize_record(...).to_example(completion_only)``."""
    return tokenize_record(record, tokenizer).to_example(completion_only)
