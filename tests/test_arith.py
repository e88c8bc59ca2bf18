import hashlib
import json

import pytest

from rewardlab.data import arith
from rewardlab.data.arith import ArithTask, solve
from rewardlab.data.base import PromptSampler
from rewardlab.answers import extract_answer


def test_solve_respects_precedence_and_writes_one_operation_per_line():
    steps, value = solve([2, 3, 4], ["+", "*"])
    assert steps == ["3*4=12", "2+12=14"] and value == 14
    steps, value = solve([10, 3, 5], ["-", "-"])
    assert steps == ["10-3=7", "7-5=2"] and value == 2


def test_solutions_end_with_the_answer_and_splits_are_disjoint_and_seeded():
    task = ArithTask(operators="+-*", train_size=500, test_size=100, seed=7)
    again = ArithTask(operators="+-*", train_size=500, test_size=100, seed=7)
    assert [e.prompt for e in task.train_examples()] == [e.prompt for e in again.train_examples()]
    assert not {e.prompt for e in task.train_examples()} & {e.prompt for e in task.test_examples()}
    for ex in task.train_examples()[:50]:
        assert extract_answer(ex.solution, "hash") == ex.answer
        expression = ex.prompt.split("=")[0]
        assert eval(expression) == int(ex.answer)  # noqa: S307 - digits and + - * only
        assert len(ex.solution.splitlines()) == expression.count("+") + expression.count("-") + expression.count("*") + 1


def test_prompt_sampler_is_resumable():
    task = ArithTask(train_size=50, test_size=10)
    a = PromptSampler(task.train_examples(), seed=3)
    a.sample(30)
    state = a.state_dict()
    expected = [e.id for e in a.sample(40)]  # crosses an epoch boundary
    b = PromptSampler(task.train_examples(), seed=3)
    b.load_state_dict(state)
    assert [e.id for e in b.sample(40)] == expected


# What the splits were when every task built both of them eagerly (before the lazy, cached splits): the
# number of test and train examples and a digest of every (id, prompt, answer, solution), test split first.
EAGER_BUILD = [
    ({}, 500, 20000, "87843ced43b16302"),  # dataset=arith
    ({"seed": 1}, 500, 20000, "ab06ca5a2cf5d502"),  # the tiny policy's warm start
    ({"seed": 7, "max_operands": 4, "operators": "+*"}, 500, 20000, "86711e7e0fcbd3d7"),
    ({"operators": "+-*", "train_size": 500, "test_size": 100, "seed": 7}, 100, 500, "0ecd354e81f003c3"),
    ({"min_operands": 2, "max_operands": 2, "max_value": 9, "train_size": 200, "test_size": 20, "seed": 3}, 20, 80,
     "f4238731f04b168a"),  # only 100 distinct expressions: the train split stops short
]


def _digest(examples) -> str:
    rows = [[e.id, e.prompt, e.answer, e.solution] for e in examples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


@pytest.mark.parametrize("settings,test_size,train_size,digest", EAGER_BUILD)
def test_lazy_and_cached_splits_are_exactly_the_eager_build(settings, test_size, train_size, digest, tmp_path,
                                                             monkeypatch):
    monkeypatch.setenv("REWARDLAB_CACHE", str(tmp_path))
    arith.splits.cache_clear()
    alone = ArithTask(**settings).test_examples()  # the test split without the train split
    assert len(alone) == test_size and not arith.splits.cache_info().currsize
    task = ArithTask(**settings)
    built = [*task.test_examples(), *task.train_examples()]  # generated, and cached when large
    cached = len(built) >= arith.CACHED_FROM
    assert list(tmp_path.rglob("*.json")) == ([arith.cache_file(*task._settings)] if cached else [])
    arith.splits.cache_clear()
    again = ArithTask(**settings)
    reread = [*again.train_examples(), *again.test_examples()]  # from the file (or generated again when small)
    assert len(task.train_examples()) == train_size
    assert _digest(alone) == _digest(task.test_examples()) == _digest(again.test_examples())
    assert _digest(built) == _digest(reread[train_size:] + reread[:train_size]) == digest


def test_an_unreadable_cache_file_is_rebuilt_and_each_task_gets_its_own_lists(tmp_path, monkeypatch):
    monkeypatch.setenv("REWARDLAB_CACHE", str(tmp_path))
    arith.splits.cache_clear()
    settings = {"train_size": 2000, "test_size": 50, "seed": 11}
    first = ArithTask(**settings).train_examples()
    path = arith.cache_file(*ArithTask(**settings)._settings)
    path.write_text('{"test": [["arith-0"')  # cut short
    arith.splits.cache_clear()
    second = ArithTask(**settings).train_examples()
    assert second == first and second is not first
    head = first[0]
    assert json.loads(path.read_text())["train"][0] == [head.id, head.prompt, head.answer, head.solution]
    second.clear()  # a caller that changes its list changes no other task's
    assert ArithTask(**settings).train_examples() == first
