"""Synthetic multi-step arithmetic, the embedded task.

A prompt is an expression such as `17+5*3=?`; the reference solution writes one operation per line
(multiplications first, then left to right) and ends with `#### <answer>`, so a completion's steps
are its lines and every step can be checked exactly.
"""

from __future__ import annotations

import random
from typing import Sequence

from rewardlab.config import schema
from rewardlab.data.base import Example, Task


@schema("dataset", "arith")
class ArithConfig:
    _target_: str = "rewardlab.data.arith.ArithTask"
    min_operands: int = 2
    max_operands: int = 3
    min_value: int = 0
    max_value: int = 49
    operators: str = "+"  # any of + - *
    train_size: int = 20000
    test_size: int = 500
    seed: int = 1234
    max_new_tokens: int = 40  # generation budget that fits this task's solutions


def solve(operands: Sequence[int], operators: Sequence[str]) -> tuple[list[str], int]:
    """Step lines and the value of `operands[0] op operators[0] operands[1] ...` with usual precedence."""
    values, ops = list(operands), list(operators)
    steps: list[str] = []
    i = 0
    while i < len(ops):  # multiplications first, left to right
        if ops[i] == "*":
            result = values[i] * values[i + 1]
            steps.append(f"{values[i]}*{values[i + 1]}={result}")
            values[i : i + 2] = [result]
            del ops[i]
        else:
            i += 1
    while ops:
        a, b, op = values[0], values[1], ops.pop(0)
        result = a + b if op == "+" else a - b
        steps.append(f"{a}{op}{b}={result}")
        values[0:2] = [result]
    return steps, values[0]


def make_example(rng: random.Random, min_operands: int, max_operands: int, min_value: int,
                 max_value: int, operators: str, index: int) -> Example:
    count = rng.randint(min_operands, max_operands)
    operands = [rng.randint(min_value, max_value) for _ in range(count)]
    ops = [rng.choice(operators) for _ in range(count - 1)]
    expression = "".join(f"{a}{op}" for a, op in zip(operands, ops)) + str(operands[-1])
    steps, answer = solve(operands, ops)
    solution = "\n".join(steps + [f"#### {answer}"])
    return Example(id=f"arith-{index}", prompt=f"{expression}=?\n", answer=str(answer), solution=solution)


class ArithTask(Task):
    """Seeded train and test splits of arithmetic expressions; the test split never appears in train."""

    answer_format = "hash"

    def __init__(self, min_operands: int = 2, max_operands: int = 3, min_value: int = 0,
                 max_value: int = 49, operators: str = "+", train_size: int = 20000,
                 test_size: int = 500, seed: int = 1234, max_new_tokens: int = 40) -> None:
        if not (1 < min_operands <= max_operands):
            raise ValueError("arith needs 2 <= min_operands <= max_operands")
        if not operators or set(operators) - set("+-*"):
            raise ValueError(f"arith operators must be drawn from '+-*', got {operators!r}")
        self.max_new_tokens = max_new_tokens
        rng = random.Random(seed)
        args = (min_operands, max_operands, min_value, max_value, operators)
        self._test = self._unique(rng, args, test_size, exclude=set(), offset=0)
        seen = {e.prompt for e in self._test}
        self._train = self._unique(rng, args, train_size, exclude=seen, offset=test_size)

    @staticmethod
    def _unique(rng: random.Random, args: tuple, size: int, exclude: set[str], offset: int) -> list[Example]:
        out: list[Example] = []
        seen = set(exclude)
        attempts = 0
        while len(out) < size and attempts < size * 20:
            attempts += 1
            example = make_example(rng, *args, index=offset + len(out))
            if example.prompt not in seen:
                seen.add(example.prompt)
                out.append(example)
        return out

    def train_examples(self) -> list[Example]:
        return self._train

    def test_examples(self) -> list[Example]:
        return self._test
