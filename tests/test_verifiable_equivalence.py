"""The verifiable reward on tricky extraction and equivalence cases (math-verify plus our layer)."""

import pytest

from rewardlab.answers import answers_equal, check, extract_answer

# (completion, reference, expected reward)
CASES = [
    # fractions
    ("The answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
    ("\\boxed{\\frac12}", "\\frac{1}{2}", 1.0),
    ("#### 6/8", "0.75", 1.0),
    ("\\boxed{\\frac{-1}{2}}", "-0.5", 1.0),
    ("\\boxed{\\frac{1}{3}}", "0.33", 0.0),
    # LaTeX expressions
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}", 1.0),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{12}", 1.0),
    ("\\boxed{\\pi}", "3.14159", 0.0),
    ("\\boxed{(1,2)}", "(1, 2)", 1.0),
    ("\\boxed{x = 3}", "3", 1.0),
    # several boxes: the last one counts
    ("First \\boxed{4}, then I corrected it: \\boxed{5}", "5", 1.0),
    ("\\boxed{5} was wrong, the answer is \\boxed{4}", "5", 0.0),
    ("\\boxed{\\frac{\\boxed{1}}{2}} then \\fbox{7}", "7", 1.0),
    ("so \\boxed 9", "9", 1.0),
    # thousands separators
    ("#### 1,000", "1000", 1.0),
    ("#### 1,234,567", "1234567", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    ("The total is 12,500 dollars", "12500", 1.0),
    ("#### 1,000", "1", 0.0),
    # negatives
    ("#### -3", "-3", 1.0),
    ("#### \u22123", "-3", 1.0),
    ("#### 3", "-3", 0.0),
    ("\\boxed{-0.25}", "-\\frac{1}{4}", 1.0),
    # percentages: the percent sign is dropped (50% = 50), never read as 0.5
    ("\\boxed{50\\%}", "50", 1.0),
    ("#### 50%", "50", 1.0),
    ("#### 50%", "0.5", 0.0),
    # units and currency
    ("\\boxed{5\\text{ cm}}", "5", 1.0),
    ("\\boxed{\\text{5 dollars}}", "5", 1.0),
    ("#### \\$1,000", "1000", 1.0),
    ("#### $18", "18", 1.0),
    ("#### 12 apples", "12", 1.0),
    ("\\boxed{30^\\circ}", "30", 1.0),
    ("#### 7 cm", "8", 0.0),
    # trailing punctuation, decimals
    ("#### 42.", "42", 1.0),
    ("#### 3.50", "3.5", 1.0),
    # no answer at all
    ("I don't know.", "5", 0.0),
    ("", "5", 0.0),
    ("#### ", "5", 0.0),
    ("\\boxed{}", "5", 0.0),
]


@pytest.mark.parametrize("completion,reference,expected", CASES)
def test_equivalence(completion, reference, expected):
    assert check([completion], [reference], "auto") == [expected]


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_extraction_formats():
    text = "17+5=22\n#### 22\nsomething \\boxed{9} then 31"
    assert extract_answer(text, "hash") == "22"
    assert extract_answer(text, "boxed") == "9"
    assert extract_answer(text, "last_number") == "31"
    assert extract_answer("no digits here", "auto") is None
    assert extract_answer("only \\boxed{3}", "hash") is None


def test_missing_reference_is_not_scored():
    assert check(["#### 3"], [None]) == [None]
    assert not answers_equal(None, "3") and not answers_equal("3", None)
