"""Answer extraction and equivalence: the verifiable reward and the gold column depend on these."""

import pytest

from rewardlab.answers import answers_equal, check, extract_answer


@pytest.mark.parametrize("text,fmt,expected", [
    ("17+5=22\n22+3=25\n#### 25", "hash", "25"),
    ("#### 3\nwait\n#### 4", "hash", "4"),
    ("no marker 12", "hash", None),
    ("####   ", "hash", None),
    ("so \\boxed{\\frac{1}{2}} hence", "boxed", "\\frac{1}{2}"),
    ("\\boxed{1} then \\boxed{{2}+1}", "boxed", "{2}+1"),
    ("\\boxed{unclosed", "boxed", None),
    ("costs 1,000 dollars, then -3.5", "last_number", "-3.5"),
    ("total 1,234,567", "last_number", "1,234,567"),
    ("ratio 3/4", "last_number", "3/4"),
    ("nothing here", "auto", None),
    ("x \\boxed{7} and 9", "auto", "7"),
    ("\\boxed{7}\n#### 5", "auto", "5"),
])
def test_extract_answer(text, fmt, expected):
    assert extract_answer(text, fmt) == expected


@pytest.mark.parametrize("pred,ref,equal", [
    ("25", "25", True), ("25", "26", False), ("1,000", "1000", True), ("-4", "-4", True),
    ("0.5", "1/2", True), ("\\frac{1}{2}", "0.5", True), ("2.0", "2", True), ("7.", "7", True),
    ("x+1", "1+x", True), (None, "3", False), ("3", None, False),
])
def test_answers_equal(pred, ref, equal):
    assert answers_equal(pred, ref) is equal


def test_check_marks_rows_without_reference_as_none():
    assert check(["#### 4", "#### 5", "#### 1"], ["4", "4", None], "hash") == [1.0, 0.0, None]
