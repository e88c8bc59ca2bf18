"""Synthetic multi-step arithmetic, the embedded task.

A prompt is an expression such as `17+5*3=?`; the reference solution writes one operation per line
(multiplications first, then left to right) and ends with `#### <answer>`, so a completion's steps
are its lines and every step can be checked exactly.

The splits are a pure function of the task's settings, built when first read: the test split alone is a
few hundred draws, but the train split takes ~0.4 s of every run that trains (20,000 unique expressions
out of ~39,000 draws). So both are kept for the process (each task gets its own lists), and a large
split is also cached on disk: one JSON file under `<cache root>/arith/` named by a hash of the settings,
this module's source and the Python version (whose `random` draws it), written atomically. The file
holds exactly what generation gives; it is read back in ~0.05 s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import sys
from pathlib import Path
from typing import Sequence

from rewardlab.cache import cache_root
from rewardlab.config import schema
from rewardlab.data.base import Example, Task
from rewardlab.io import write_text_atomic

CACHED_FROM = 2000  # splits of at least this many examples (train + test) are cached on disk


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


Splits = tuple[tuple[Example, ...], tuple[Example, ...]]  # (test, train)


def _unique(rng: random.Random, args: tuple, size: int, exclude: set[str], offset: int) -> list[Example]:
    """`size` examples whose prompts are new (not in `exclude`, not repeated), giving up after 20x draws."""
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


def generate(args: tuple, train_size: int, test_size: int, seed: int, train: bool = True) -> Splits:
    """Both splits drawn from one seeded stream, the test split first (so it alone is cheap); the train
    split (empty when `train` is False) excludes every test prompt."""
    rng = random.Random(seed)
    test = _unique(rng, args, test_size, exclude=set(), offset=0)
    if not train:
        return tuple(test), ()
    return tuple(test), tuple(_unique(rng, args, train_size, exclude={e.prompt for e in test}, offset=test_size))


def cache_file(args: tuple, train_size: int, test_size: int, seed: int) -> Path:
    """Where the splits of these settings are cached; any change to this module names another file."""
    key = json.dumps([list(args), train_size, test_size, seed, list(sys.version_info[:2]),
                      hashlib.sha256(Path(__file__).read_bytes()).hexdigest()])
    return cache_root() / "arith" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"


@functools.lru_cache(maxsize=8)
def splits(args: tuple, train_size: int, test_size: int, seed: int) -> Splits:
    """Both splits, from this process's memory, the disk cache, or generated (and then cached)."""
    if train_size + test_size < CACHED_FROM:
        return generate(args, train_size, test_size, seed)
    path = cache_file(args, train_size, test_size, seed)
    try:
        stored = json.loads(path.read_text())
        return tuple(tuple(Example(id=i, prompt=p, answer=a, solution=s) for i, p, a, s in stored[name])
                     for name in ("test", "train"))
    except (OSError, ValueError, KeyError, TypeError):  # ValueError also for a row of the wrong length
        pass  # absent or unreadable: generate it again
    built = generate(args, train_size, test_size, seed)
    rows = {name: [[e.id, e.prompt, e.answer, e.solution] for e in split]
            for name, split in zip(("test", "train"), built)}
    try:
        write_text_atomic(path, json.dumps(rows))
    except OSError:
        pass  # a read-only cache directory: the next run generates them again
    return built


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
        self._settings = ((min_operands, max_operands, min_value, max_value, operators), train_size, test_size, seed)
        self._train: list[Example] | None = None
        self._test: list[Example] | None = None

    def train_examples(self) -> list[Example]:
        if self._train is None:
            test, train = splits(*self._settings)
            self._train = list(train)
            if self._test is None:
                self._test = list(test)
        return self._train

    def test_examples(self) -> list[Example]:
        if self._test is None:  # the test split alone (`rewardlab eval` never reads the train split)
            self._test = list(generate(*self._settings, train=False)[0])
        return self._test
