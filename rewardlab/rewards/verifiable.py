"""Verifiable rewards: extract the final answer and compare it with the reference.

Integers and plain numbers are compared exactly (after removing thousands separators); anything
else goes to math-verify, which decides mathematical equivalence (`\\frac{1}{2}` = `0.5`).
"""

from __future__ import annotations

import re
from fractions import Fraction

from rewardlab.config import schema
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch

_HASH = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for i in range(brace, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[brace + 1 : i].strip()
    return None


def extract_answer(text: str, answer_format: str = "auto") -> str | None:
    """The final answer written in `text`, or None when there is none.

    Formats: `hash` (the last `#### x`), `boxed` (the last `\\boxed{x}`), `last_number`, and
    `auto` (the first of those three that finds something).
    """
    if answer_format in ("hash", "auto"):
        found = _HASH.findall(text)
        if found and found[-1].strip():
            return found[-1].strip()
        if answer_format == "hash":
            return None
    if answer_format in ("boxed", "auto"):
        boxed = last_boxed(text)
        if boxed:
            return boxed
        if answer_format == "boxed":
            return None
    if answer_format in ("last_number", "auto"):
        numbers = _NUMBER.findall(text)
        return numbers[-1] if numbers else None
    raise ValueError(f"unknown answer format {answer_format!r}; use hash, boxed, last_number or auto")


def _as_number(text: str) -> Fraction | None:
    cleaned = _THOUSANDS.sub("", text.strip().strip("$").strip())
    cleaned = cleaned.rstrip(".") if cleaned.count(".") == 1 and cleaned.endswith(".") else cleaned
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(predicted: str | None, reference: str | None) -> bool:
    """Mathematical equivalence of two final answers; exact for plain numbers."""
    if predicted is None or reference is None:
        return False
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    if predicted.strip() == reference.strip():
        return True
    from math_verify import parse, verify

    gold = parse(reference if "$" in reference else f"${reference}$")
    pred = parse(predicted if "$" in predicted else f"${predicted}$")
    return bool(gold) and bool(pred) and bool(verify(gold, pred))


def check(completions: list[str], references: list[str | None], answer_format: str = "auto") -> list[float]:
    """1.0 where the completion's final answer equals the reference, else 0.0 (None: no reference)."""
    return [float(answers_equal(extract_answer(c, answer_format), r)) if r is not None else None
            for c, r in zip(completions, references)]


@schema("reward", "verifiable")
class VerifiableConfig:
    _target_: str = "rewardlab.rewards.verifiable.VerifiableReward"
    name: str = "verifiable"
    answer_format: str = "auto"  # auto | hash | boxed | last_number
    correct: float = 1.0
    incorrect: float = 0.0


class VerifiableReward(Reward):
    """`correct` when the extracted answer is equivalent to the reference, else `incorrect`."""

    def __init__(self, name: str = "verifiable", answer_format: str = "auto", correct: float = 1.0,
                 incorrect: float = 0.0) -> None:
        super().__init__(name)
        self.answer_format = answer_format
        self.correct, self.incorrect = correct, incorrect

    def compute(self, batch: Batch) -> list[float]:
        ok = check(batch.completion, batch.reference, self.answer_format)
        return [self.correct if v else self.incorrect for v in ok]
