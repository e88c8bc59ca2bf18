"""Answers: extract a completion's final answer and decide whether it equals a reference.

The one place the data sets, the verifiable reward, evaluation (accuracy, maj@k) and the gold column check
answers; it is no reward and sits below all of them. math-verify decides mathematical equivalence
(`\\frac{1}{2}` = `0.5`, sets, intervals, equations); this layer does what it misses or over-accepts,
checked against the public graders' own test suites (tests/fixtures/grader_suites.json):

- extraction: `#### x`; an explicit "final answer is x" / "Answer: x" written after the last box; the
  last `\\boxed{}`, or several boxes joined into one set when the reference lists several items; without
  a box, the last math span (`$...$`, `\\(...\\)`, `\\[...\\]`), else the last number, reading tuples,
  fractions and grouped digits (`14{,}916`, `1 000`, `32,\\! 349`) as one token;
- equivalence: plain numbers compared exactly (thousands separators, a decimal comma such as `1,22`),
  `\\text{}` units and unit words, `\\$` and `%` signs dropped (`50\\%` = `50`, never `0.5`), degree marks,
  a `y =` prefix dropped only when the other side is no equation, a plain list of numbers compared in
  order, multiple-choice letters (`C` = `C. x = 42`).
"""

from __future__ import annotations

import functools
import re
from fractions import Fraction
from typing import Sequence

_HASH = re.compile(r"####\s*([^\n]*)")
_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_BARE_BOX = re.compile(r"\s+([^\s$]+)")
_PHRASE = re.compile(r"final answer(?: is|:)|(?:^|\n)\W{0,4}answer\W{0,4}:", re.IGNORECASE)
_MATH = re.compile(r"\$\$(.+?)\$\$|\\\[(.+?)\\\]|\\\(([^\n]+?)\\\)|(?<!\\)\$((?:\\.|[^$\\\n])+?)\$", re.DOTALL)
_PROSE = re.compile(r"(?<!\\)\b[a-zA-Z]{2,}\s+[a-zA-Z]{2,}\s+[a-zA-Z]{2,}\b")
_NUM = r"-?(?:\d{1,3}(?:(?:\{,\}|,\\!\s*|,|\\,| )\d{3})+(?!\d)(?:\.\d+)?|\d+(?:[.,]\d+)?|\.\d+)"
_NUMBER = re.compile(rf"\(\s*{_NUM}(?:\s*,\s*{_NUM})+\s*\)|-?\\[dt]?frac\{{-?\d+\}}\{{\d+\}}|(?<![A-Za-z]){_NUM}(?:/\d+)?")
_GROUPED = re.compile(r"^(-?\d{1,3})((?:[, ]\d{3})+)(\.\d+)?$")
_DECIMAL_COMMA = re.compile(r"^-?\d+,\d+$")
_GAP = re.compile(r"\$|\\[()\[\]]|\\q?quad|\\text\{[^{}]*\}|\\[,;! ]|\b(?:and|or)\b|[,;\s.]")
_TEXT = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")
_UNIT_WORDS = re.compile(r"^(-?[\d.,/]+)\s*[a-zA-Z][a-zA-Z ]*\.?$")
_EQUATION_LHS = re.compile(r"^[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*")
_CHOICE = re.compile(r"^\(?([A-J])\)?(?:[.:)]\s*.*)?$", re.DOTALL)
_STRIP = (("\\left", ""), ("\\right", ""), ("\\,", ""), ("\\;", ""), ("{,}", ","), ("\\$", ""), ("$", ""),
          ("\\%", ""), ("%", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("°", ""), ("\u2212", "-"),
          ("\\dfrac", "\\frac"), ("\\tfrac", "\\frac"))


def boxes(text: str) -> list[tuple[int, int, str]]:
    """(start, end, content) of every `\\boxed{...}` / `\\fbox{...}` / `\\boxed 5`, braces balanced, in order;
    a box inside another counts once, as the outer one."""
    out: list[tuple[int, int, str]] = []
    position = 0
    while (found := _BOX.search(text, position)) is not None:
        rest = text[found.end():]
        if not rest.lstrip().startswith("{"):
            bare = _BARE_BOX.match(rest)
            if bare:
                out.append((found.start(), found.end() + bare.end(), bare.group(1)))
            position = found.end()
            continue
        brace, depth = found.end() + rest.index("{"), 0
        for i in range(brace, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                out.append((found.start(), i + 1, text[brace + 1: i].strip()))
                position = i + 1
                break
        else:
            return out
    return out


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`, `\\boxed 5`), braces balanced; None if absent."""
    found = boxes(text)
    return found[-1][2] if found else None


def _boxed_answer(text: str, shape: str | None) -> tuple[int, str] | None:
    """(end of the answer, its text): the last box, or when the reference has a `shape` the last run of boxes
    joined only by connectors (commas, `and`, `\\quad`, a few words), written as that tuple or set."""
    found = [b for b in boxes(text) if b[2]]
    if not found:
        return None
    run = [found[-1]]
    for box in reversed(found[:-1]):
        gap = text[box[1]: run[0][0]]
        if shape is None or ":" in gap or "\n\n" in gap or len(_GAP.sub(" ", gap).split()) > 3:
            break
        run.insert(0, box)
    if len(run) == 1:
        return run[0][1], run[0][2]
    joined = ", ".join(b[2] for b in run)
    return run[-1][1], f"({joined})" if shape == "tuple" else "\\{" + joined + "\\}"


def _math_span(text: str) -> tuple[int, str] | None:
    """(end, content) of the last math span that is not prose (a `$` used as currency opens no span)."""
    for match in reversed(list(_MATH.finditer(text))):
        content = next(g for g in match.groups() if g is not None).strip()
        if content and not _PROSE.search(_TEXT.sub("", content)):
            return match.end(), content
    return None


def _phrase_answer(text: str, after: int = 0) -> str | None:
    """The sentence after the last "final answer is" / "Answer:" that starts at or after `after`, math
    delimiters dropped; when it is prose ("the largest $n$ is 34"), the part after its last "is", else its
    last number."""
    found = [m for m in _PHRASE.finditer(text) if m.start() >= after]
    if not found:
        return None
    rest = text[found[-1].end():].strip()
    sentence = re.split(r"\n|\.\s|\.$", rest, maxsplit=1)[0]
    answer = re.sub(r'\\?\$|\\[()\[\]]|\\?"', " ", sentence).strip().rstrip(".").strip()
    if " is " in answer:
        answer = answer.rsplit(" is ", 1)[1].strip()
    if _PROSE.search(_TEXT.sub("", answer)):
        answer = _last_number(answer) or ""
    return answer or None


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1] if numbers else None


def _top_level_items(answer: str) -> int:
    """How many comma/semicolon-separated items `answer` lists at bracket depth 0 (`1,000` is one)."""
    depth, items = 0, 1
    for i, ch in enumerate(answer):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in ",;" and not (answer[i - 1: i].isdigit() and re.match(r",\d{3}(?!\d)", answer[i:])):
            items += 1
    return items


def _shape(reference: str) -> str | None:
    """How a reference lists several items: `tuple` for `(a, b)`, `set` for `a, b` or `\\{a, b\\}`, else None."""
    ref = normalize_answer(reference)
    inner = re.sub(r"^\\?\{(.*)\\?\}$", r"\1", ref, flags=re.DOTALL)
    if inner.startswith("(") and inner.endswith(")") and _top_level_items(inner) == 1:
        return "tuple" if _top_level_items(inner[1:-1]) > 1 else None
    return "set" if _top_level_items(inner) > 1 else None


def extract_answer(text: str, answer_format: str = "auto", reference: str | None = None) -> str | None:
    """The final answer written in `text`, or None when there is none.

    Formats: `hash` (the last `#### x`), `boxed` (the last `\\boxed{x}`), `last_number`, and `auto`: `#### x`,
    then a final-answer phrase after the last box, the box, a final-answer phrase, the last math span, the
    last number. Given a `reference` that lists several items, several boxes are read as one set.
    """
    if answer_format not in ("auto", "hash", "boxed", "last_number"):
        raise ValueError(f"unknown answer format {answer_format!r}; use hash, boxed, last_number or auto")
    if answer_format in ("hash", "auto"):
        found = _HASH.findall(text)
        if found and found[-1].strip():
            return found[-1].strip()
        if answer_format == "hash":
            return None
    shape = _shape(reference) if reference is not None else None
    if answer_format in ("boxed", "auto"):
        boxed = _boxed_answer(text, shape)
        if answer_format == "boxed":
            return boxed[1] if boxed else None
        phrase = _phrase_answer(text, boxed[0] if boxed else 0)
        if phrase and boxed and not re.search(r"[\d\\({\[]", phrase) and len(phrase.split()) > 1:
            phrase = None  # "Answer: see above" after a box is no answer; "Answer: 12" or "Answer: C" is
        if phrase or boxed:
            return phrase or boxed[1]
        span = _math_span(text)
        if span and not _NUMBER.search(text, span[0]):  # a number written after the last formula is later
            return span[1]
    return _last_number(text)


def normalize_answer(text: str) -> str:
    """The answer without units, currency, percent and degree signs, spacing commands or `\\text{}`."""
    s = re.sub(r"\\!\s*", "", text.strip())
    for old, new in _STRIP:
        s = s.replace(old, new)
    s = _TEXT.sub(lambda m: m.group(1), s).strip()
    units = _UNIT_WORDS.match(s)
    return (units.group(1) if units else s).strip().rstrip(".").strip()


def _as_number(text: str, decimal_comma: bool = False) -> Fraction | None:
    """A plain number's exact value: `1,000` and `1 000` are thousands, `0,111` and (with `decimal_comma`)
    `1,22` are decimals; None for anything else."""
    s = text.strip().lstrip("+")
    s = s[:-1] if s.endswith(".") and s.count(".") == 1 else s
    grouped = _GROUPED.match(s)
    if grouped and not (grouped.group(1).lstrip("-") == "0" and len(grouped.group(2)) == 4):
        s = grouped.group(1) + grouped.group(2).replace(",", "").replace(" ", "") + (grouped.group(3) or "")
    elif _DECIMAL_COMMA.match(s) and (decimal_comma or s.lstrip("-").startswith("0,")):
        s = s.replace(",", ".")
    try:
        return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None


def _choice(text: str) -> str | None:
    found = _CHOICE.match(text.strip())
    return found.group(1) if found else None


def _number_list(text: str) -> list[Fraction] | None:
    values = [_as_number(p) for p in re.split(r",\s+|,(?!\d{3})", text)]
    return values if len(values) > 1 and all(v is not None for v in values) else None


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
    if predicted == reference:
        return True
    lists = _number_list(predicted), _number_list(reference)
    if lists[0] is not None and lists[1] is not None:  # a plain list of numbers is read in order
        return lists[0] == lists[1]
    predicted_equation, reference_equation = "=" in predicted, "=" in reference
    if not reference_equation:  # `y = 3` answers `3`; an equation still answers an equation
        predicted = _EQUATION_LHS.sub("", predicted)
    if not predicted_equation:
        reference = _EQUATION_LHS.sub("", reference)
    a, b = _as_number(predicted), _as_number(reference)
    if a is None or b is None:  # `1,22` is a decimal comma when the other side is a plain number
        a = a if a is not None or b is None else _as_number(predicted, decimal_comma=True)
        b = b if b is not None or a is None else _as_number(reference, decimal_comma=True)
    if a is not None and b is not None:
        return a == b
    choices = _choice(predicted), _choice(reference)
    if choices[0] and choices[1] and min(len(predicted), len(reference)) <= 5:
        return choices[0] == choices[1]
    if " ".join(predicted.split()) == " ".join(reference.split()):
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
    return [float(answers_equal(extract_answer(c, answer_format, r), r)) if r is not None else None
            for c, r in zip(completions, references)]


def answer_clusters(answers: Sequence[str | None]) -> list[list[int]]:
    """Row indices grouped by mathematical equivalence of their answers (None never clusters), in order of
    first appearance: the one vote counter behind the majority-vote reward and maj@k."""
    clusters: list[list[int]] = []
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for cluster in clusters:
            if answers_equal(answer, answers[cluster[0]]):
                cluster.append(i)
                break
        else:
            clusters.append([i])
    return clusters


def majority_answer(answers: Sequence[str | None]) -> str | None:
    """The answer of the largest equivalence cluster (ties: the first seen), None when no row has one."""
    clusters = answer_clusters(answers)
    return answers[max(clusters, key=len)[0]] if clusters else None
