"""The verifier against the public graders' own test suites (tests/fixtures/grader_suites.json): on each suite
rewardlab's verdicts are right at least as often as bare math-verify's, and right on the cases where the
two used to part (several boxes, decimal commas and digit grouping, equations, final-answer phrases,
multiple choice, ordered lists)."""

import json
from collections import defaultdict
from pathlib import Path

import pytest
from math_verify import parse, verify

from rewardlab.answers import check

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "grader_suites.json").read_text())
CASES = FIXTURE["cases"]
SUITES = ("math-verify", "nemo-skills", "hendrycks-math", "simple-evals", "verl")


def bare_math_verify(reference: str, completion: str) -> bool:
    """What math-verify alone says: the reference wrapped in `$...$`, the completion parsed as written."""
    try:
        return bool(verify(parse(f"${reference}$"), parse(completion)))
    except Exception:  # a parse or timeout failure is a "no"
        return False


@pytest.fixture(scope="module")
def verdicts() -> dict[str, list[tuple[bool, bool, bool]]]:
    """(rewardlab's verdict, math-verify's verdict, the suite's) for every case, by suite."""
    out: dict[str, list[tuple[bool, bool, bool]]] = defaultdict(list)
    ours = check([c["completion"] for c in CASES], [c["reference"] for c in CASES])
    for case, mine in zip(CASES, ours):
        out[case["suite"]].append((bool(mine), bare_math_verify(case["reference"], case["completion"]),
                                   case["equivalent"]))
    return out


def test_the_fixture_names_a_source_for_every_case():
    assert len(CASES) >= 300 and {c["suite"] for c in CASES} == set(SUITES)
    assert all(c["source"] and c["reference"] and c["completion"] for c in CASES)


@pytest.mark.parametrize("suite", SUITES)
def test_at_least_as_right_as_math_verify_on_each_suite(verdicts, suite):
    rows = verdicts[suite]
    ours = sum(mine == truth for mine, _, truth in rows)
    theirs = sum(mv == truth for _, mv, truth in rows)
    assert ours >= theirs, f"{suite}: rewardlab right on {ours}, math-verify on {theirs} of {len(rows)}"


def test_overall_accuracy_on_the_suites(verdicts):
    rows = [r for suite in verdicts.values() for r in suite]
    assert sum(mine == truth for mine, _, truth in rows) / len(rows) >= 0.99


@pytest.mark.parametrize("completion,reference,expected", [
    # several boxes are one answer when the reference lists several items; a single reference keeps the last box
    ("$$\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}$$", "(2, 2), (6, 2)", 1.0),
    ("the roots are \\boxed{1} and \\boxed{-2}.", "-2, 1", 1.0),
    ("so $x = \\boxed{3}$ and $y = \\boxed{2}$", "(3, 2)", 1.0),
    ("First \\boxed{4}, then I corrected it: \\boxed{5}", "5", 1.0),
    ("\\boxed{1} no no no no no \\boxed{2}", "1, 2", 0.0),
    # decimal comma, space and `\!` thousands grouping
    ("The result is 1 000.", "1000", 1.0),
    ("\\boxed{1,22}", "1.22", 1.0),
    ("\\boxed{0,111}", "0.111", 1.0),
    ("\\boxed{0,111}", "111", 0.0),
    ("is $\\boxed{32,\\! 349}$", "32349", 1.0),
    ("is $\\boxed{32, 349}$", "32349", 0.0),
    # an equation answers an equation; `y =` is dropped only against an expression
    ("\\boxed{y = x^2+2x+1}", "2x+1+x^2", 1.0),
    ("\\boxed{2x+1+x^2}", "y = x^2+2x+1", 1.0),
    ("$\\boxed{y=-\\frac{1}{2}x+\\frac{3}{4}}$", "2x+4y-3=0", 1.0),
    # an explicit final-answer phrase after the last box wins
    ("so $10,200 + \\boxed{255} = 10,455$. Final Answer: The final answer is $10,455$. I hope it is correct.",
     "10455", 1.0),
    ("Answer: 12\n\nthen \\boxed{7}", "7", 1.0),
    ("\\boxed{5}\n\nAnswer: see the work above", "5", 1.0),
    # multiple choice: the letter or the letter with its option text
    ("\\boxed{C. x = 42}", "C", 1.0),
    ("\\boxed{C}", "C. x = 42", 1.0),
    ("\\boxed{B}", "C. x = 42", 0.0),
    # a plain list of numbers is ordered
    ("\\boxed{10, 4, -2}", "4, 10, -2", 0.0),
    ("\\boxed{4, 10, -2}", "4, 10, -2", 1.0),
    # no box: tuples, fractions, grouped digits and decimal commas are one token
    ("the ordered pair is (7, 6)", "(7, 6)", 1.0),
    ("so the probability is \\frac{3}{8}", "\\frac{3}{8}", 1.0),
    ("the smallest is 14{,}916", "14916", 1.0),
    ("Soucis : 2,74 $ a..", "2.74", 1.0),
    ("AZYUK2A", "2", 0.0),
    ("She pays $18 each day, so she spends $36 in two days.", "36", 1.0),
])
def test_the_clusters_where_the_verifier_used_to_miss(completion, reference, expected):
    assert check([completion], [reference]) == [expected]
