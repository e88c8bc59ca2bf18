"""Programmatic process rewards for the arith task: one score per line (METHODS.md §2, step checker).

`arith_steps` is the exact gold: a line `a op b = c` is correct when it is an operation the expression
needs next (any remaining multiplication, else the leftmost + or -, with operands as reduced so far) and
c is its value; after a wrong line the state is lost, so later operation lines are wrong; `#### x` is
correct when x equals the reference answer, and nothing may follow it.

`arith_steps_biased` is a deliberately hackable stand-in for an imperfect learned PRM: it ranks steps
like the gold check, but a well-formed line (`a op b = c` or `#### x`) that is wrong still earns `tidy`,
so under summed credit a policy can earn more by writing more (or wrong-but-tidy) lines. The gold
per-step check is always written to `batch.extra['step_correct']`, so runs on the proxy log how often
the worst step is really wrong.
"""

from __future__ import annotations

import re
from dataclasses import field
from typing import Optional

from rewardlab.answers import answers_equal
from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.process import ProcessReward
from rewardlab.rollout import Batch
from rewardlab.steps import StepSplit

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


def well_formed(step: str) -> bool:
    """Does the line look like a solution line (`a op b = c` or `#### x`), true or not?"""
    line = step.replace(" ", "")
    return bool(_EQUATION.match(line) or _ANSWER.match(line))


@schema("reward", "arith_steps")
class ArithStepsConfig:
    _target_: str = "rewardlab.rewards.arith_steps.ArithStepsReward"
    name: str = "arith_steps"
    correct: float = 1.0  # score of a correct step
    incorrect: float = 0.0  # score of a wrong (or malformed) step
    aggregate: str = "min"  # the scalar reward: min | last | prod | mean | sum of the step scores
    split: StepSplit = field(default_factory=StepSplit)
    tidy: Optional[float] = None  # score of a well-formed but wrong line; None: `incorrect` (the exact gold)


class ArithStepsReward(ProcessReward):
    """Per-line scores for arith completions: the gold step check, with `tidy` for well-formed wrong lines."""

    def __init__(self, name: str = "arith_steps", correct: float = 1.0, incorrect: float = 0.0,
                 aggregate: str = "min", split: StepSplit | dict | None = None, tidy: float | None = None) -> None:
        super().__init__(name, split=split, aggregate=aggregate, empty=incorrect)
        self.correct, self.incorrect = correct, incorrect
        self.tidy = incorrect if tidy is None else tidy
        self.passing = correct if aggregate in ("min", "last", "mean") else None  # every step (the last) right

    def score_steps(self, batch: Batch, steps: list[list[str]]) -> list[list[float]]:
        gold = [gold_check(p, s, r) for p, s, r in zip(batch.prompt, steps, batch.reference)]
        batch.extra["step_correct"] = gold
        return [[self.correct if ok else self.tidy if well_formed(step) else self.incorrect
                 for ok, step in zip(row, texts)] for row, texts in zip(gold, steps)]
