"""Programmatic process rewards for the arith task: one score per line (METHODS.md §2, step checker).

`arith_steps` is the exact gold: a line `a op b = c` is correct when it is an operation the expression
needs next (any remaining multiplication, else the leftmost + or -, with operands as reduced so far) and
c is its value; after a wrong line the state is lost, so later operation lines are wrong; `#### x` is
correct when x equals the reference answer, and nothing may follow it.

`arith_steps_biased` is a deliberately hackable stand-in for an imperfect learned PRM: it checks only
that each equation is true (not that it is the step the problem needs), trusts a `#### x` that agrees
with the last equation, and pays `tidy` for well-formed lines whatever their truth, so a policy can earn
more by writing extra true-looking lines. The gold per-step check is still written to
`batch.extra['step_correct']` so runs on the proxy can log how often the worst step is really wrong.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Optional

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.verifiable import answers_equal
from rewardlab.rollout import Batch
from rewardlab.steps import ProcessReward, StepSplit

_EQUATION = re.compile(r"^(-?\d+)([+\-*])(-?\d+)=(-?\d+)$")
_ANSWER = re.compile(r"^####(-?\d+)$")
_EXPRESSION = re.compile(r"^\s*(-?\d+(?:[+\-*]-?\d+)+)\s*=\s*\?")
_TERM = re.compile(r"(-?\d+)([+\-*]|$)")


def apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def parse_expression(prompt: str) -> tuple[list[int], list[str]]:
    """(operands, operators) of an arith prompt such as `17+5*3=?`."""
    found = _EXPRESSION.match(prompt)
    if not found:
        raise UserError(f"reward=arith_steps needs arith prompts like '17+5*3=?', got {prompt[:40]!r}; "
                        f"use dataset=arith")
    values, ops = [], []
    for number, op in _TERM.findall(found.group(1)):
        values.append(int(number))
        if op:
            ops.append(op)
    return values, ops


def gold_check(prompt: str, steps: list[str], reference: str | None) -> list[bool]:
    """Per step: is it the right next operation with the right value (or the right final answer)?"""
    values, ops = parse_expression(prompt)
    out: list[bool] = []
    lost = finished = False
    for step in steps:
        line = step.replace(" ", "")
        equation, answer = _EQUATION.match(line), _ANSWER.match(line)
        ok = False
        if finished:
            ok = False
        elif answer:
            ok = answers_equal(answer.group(1), reference)
            finished = True
        elif equation and not lost and ops:
            a, op, b, c = int(equation.group(1)), equation.group(2), int(equation.group(3)), int(equation.group(4))
            allowed = [i for i, o in enumerate(ops) if o == "*"] or [0]
            hit = next((i for i in allowed if ops[i] == op and values[i] == a and values[i + 1] == b), None)
            ok = hit is not None and apply(a, op, b) == c
            if ok:
                values[hit : hit + 2] = [c]
                del ops[hit]
        lost = lost or not ok
        out.append(ok)
    return out


def proxy_check(steps: list[str]) -> list[str]:
    """Per step, what the biased proxy sees: `true` (a true equation, or an answer agreeing with the
    last equation), `tidy` (well-formed but false) or `malformed`."""
    out, last = [], None
    for step in steps:
        line = step.replace(" ", "")
        equation, answer = _EQUATION.match(line), _ANSWER.match(line)
        if equation:
            a, op, b, c = int(equation.group(1)), equation.group(2), int(equation.group(3)), int(equation.group(4))
            out.append("true" if apply(a, op, b) == c else "tidy")
            last = c
        elif answer:
            out.append("true" if last is not None and int(answer.group(1)) == last else "tidy")
        else:
            out.append("malformed")
    return out


@schema("reward", "arith_steps")
class ArithStepsConfig:
    _target_: str = "rewardlab.rewards.arith_steps.ArithStepsReward"
    name: str = "arith_steps"
    correct: float = 1.0  # score of a correct step
    incorrect: float = 0.0  # score of a wrong (or malformed) step
    aggregate: str = "min"  # the scalar reward: min | last | prod | mean | sum of the step scores
    split: StepSplit = field(default_factory=StepSplit)
    biased: bool = False  # score with the hackable proxy (true-looking lines) instead of the gold check
    tidy: Optional[float] = None  # biased only: score of a well-formed but false line (None: `incorrect`)


class ArithStepsReward(ProcessReward):
    """Per-line scores for arith completions: the gold step check, or its biased proxy (`biased=True`)."""

    def __init__(self, name: str = "arith_steps", correct: float = 1.0, incorrect: float = 0.0,
                 aggregate: str = "min", split: StepSplit | dict | None = None, biased: bool = False,
                 tidy: float | None = None) -> None:
        super().__init__(name, split=split, aggregate=aggregate, empty=incorrect)
        self.correct, self.incorrect, self.biased = correct, incorrect, biased
        self.tidy = incorrect if tidy is None else tidy

    def score_steps(self, batch: Batch, steps: list[list[str]]) -> list[list[float]]:
        gold = [gold_check(p, s, r) for p, s, r in zip(batch.prompt, steps, batch.reference)]
        batch.extra["step_correct"] = gold
        if not self.biased:
            return [[self.correct if ok else self.incorrect for ok in row] for row in gold]
        value = {"true": self.correct, "tidy": self.tidy, "malformed": self.incorrect}
        return [[value[kind] for kind in proxy_check(s)] for s in steps]
