"""Final answers in generated text, and the majority vote over a population of them.

    extract_answer(text, pattern=None) -> str | None   the last complete \\boxed{...} (or a regex's group)
    majority_answer(answers) -> (answer | None, votes)  the most common non-None answer; ties go to the first seen
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence


def _last_boxed(text: str) -> str | None:
    # Brace matching (not a regex) so nested content like \boxed{\frac{1}{2}}
    # is returned whole.
    start = text.rfind("\\boxed{")
    while start != -1:
        i = start + len("\\boxed{")
        depth = 1
        j = i
        while j < len(text):
            c = text[j]
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i:j]
            j += 1
        # Unclosed (e.g. generation cut off): fall back to an earlier box.
        start = text.rfind("\\boxed{", 0, start)
    return None


def extract_answer(text: str, pattern: str | None = None) -> str | None:
    """The final answer in ``text``, stripped, or ``None`` if there is none.

    Default: the content of the last complete ``\\boxed{...}``. With
    ``pattern`` (a regex with exactly one group): that group of the last match.
    """
    if pattern is None:
        ans = _last_boxed(text)
    else:
        rx = re.compile(pattern)
        if rx.groups != 1:
            raise ValueError(f"answer pattern must have exactly one group, got {rx.groups}: {pattern!r}")
        matches = list(rx.finditer(text))
        ans = matches[-1].group(1) if matches else None
    return None if ans is None else ans.strip()


def majority_answer(answers: Sequence[str | None]) -> tuple[str | None, int]:
    """The most common extracted answer (None entries do not vote) and its vote count; (None, 0) if none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None, 0
    best = max(counts.values())
    # Counter keeps first-insertion order, so the first answer seen wins a tie: deterministic for a fixed population.
    return next(a for a, n in counts.items() if n == best), best
