import pytest

from zaya_jax.answers import extract_answer, majority_answer


def test_extract_answer_default_last_boxed():
    assert extract_answer("first \\boxed{12} then \\boxed{58}.") == "58"
    assert extract_answer("\\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert extract_answer("\\boxed{ 7 }") == "7"
    assert extract_answer("no answer here") is None
    # A cut-off final box falls back to the last complete one.
    assert extract_answer("\\boxed{5} and then \\boxed{7") == "5"
    assert extract_answer("\\boxed{") is None


def test_extract_answer_custom_pattern():
    assert extract_answer("Answer: 3\nAnswer: 4", r"Answer: (\d+)") == "4"
    assert extract_answer("nothing", r"Answer: (\d+)") is None
    with pytest.raises(ValueError, match="one group"):
        extract_answer("x", r"Answer: \d+")


def test_majority_answer_counts_votes_and_ignores_missing_answers():
    assert majority_answer(["3", None, "5", "3", None, None]) == ("3", 2)
    assert majority_answer(["7", "4", "4", "7"]) == ("7", 2)  # a tie goes to the answer seen first
    assert majority_answer([None, None]) == (None, 0)
    assert majority_answer([]) == (None, 0)
