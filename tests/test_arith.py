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
