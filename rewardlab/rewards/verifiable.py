"""Verifiable rewards: extract the final answer and compare it with the reference.

math-verify decides mathematical equivalence (`\\frac{1}{2}` = `0.5`); this layer extracts the answer
(`#### x`, the last of several `\\boxed{}`, or the last number) and normalizes what math-verify misses
or over-accepts: `\\text{}` units and trailing unit words, `\\$` and `%` signs (`50\\%` = `50`, not
`0.5`), degree marks, `x = ` prefixes, unicode minus; plain numbers are then compared exactly.
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction

from rewardlab.config import schema
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch

_HASH = re.compile(r"####\s*([^\n]*)")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_BOX = re.compile(r"\s+([^\s$]+)")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(r"^(-?[\d.,/]+)\s*[a-zA-Z][a-zA-Z ]*\.?$")
_STRIP = (("\\left", ""), ("\\right", ""), ("\\!", ""), ("\\,", ""), ("\\;", ""), ("{,}", ","),
          ("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""),
          ("\u2212", "-"), ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"))


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`), braces balanced; None if absent."""
    found = list(_BOX.finditer(text))
    if not found:
        return None
    rest = text[found[-1].end() :]
    if not rest.lstrip().startswith("{"):
        bare = _BARE_BOX.match(rest)
        return bare.group(1) if bare else None
    brace = found[-1].end() + rest.index("{")
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


def normalize_answer(text: str) -> str:
    """The answer without units, currency, percent and degree signs or an `x =` prefix."""
    s = text.strip()
    for old, new in _STRIP:
        s = s.replace(old, new)
    s = _TEXT.sub(lambda m: m.group(1), s).strip()
    s = re.sub(r"^[a-zA-Z]\s*=\s*", "", s)
    units = _UNIT_WORDS.match(s)
    return (units.group(1) if units else s).strip().rstrip(".").strip()


def _as_number(text: str) -> Fraction | None:
    cleaned = _THOUSANDS.sub("", text.strip())
    cleaned = cleaned.rstrip(".") if cleaned.count(".") == 1 and cleaned.endswith(".") else cleaned
    try:
        return Fraction(cleaned)
    except (ValueError, ZeroDivisionError):
        return None


def answers_equal(predicted: str | None, reference: str | None) -> bool:
    """Mathematical equivalence of two final answers; exact for plain numbers."""
    if predicted is None or reference is None:
        return False
    return _equal(predicted, reference)


@functools.lru_cache(maxsize=1 << 16)
def _equal(predicted: str, reference: str) -> bool:
    """answers_equal on two strings, memoized: a group's samples share one reference and often one answer,
    and math-verify's parse (sympy) is most of the scoring time."""
    predicted, reference = normalize_answer(predicted), normalize_answer(reference)
    if not predicted or not reference:
        return False
    a, b = _as_number(predicted), _as_number(reference)
    if a is not None and b is not None:
        return a == b
    if predicted.strip() == reference.strip():
        return True
    from math_verify import verify

    gold, pred = _parse(reference), _parse(predicted)
    return bool(gold) and bool(pred) and bool(verify(gold, pred))


@functools.lru_cache(maxsize=1 << 14)
def _parse(answer: str):
    from math_verify import parse

    return parse(f"${answer}$")


def clear_cache() -> None:
    """Forget memoized comparisons (for benchmarks that time a cold start)."""
    _equal.cache_clear()
    _parse.cache_clear()


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
        self.passing = correct

    def compute(self, batch: Batch) -> list[float]:
        ok = check(batch.completion, batch.reference, self.answer_format)
        return [self.correct if v else self.incorrect for v in ok]
