"""Hacking diagnostics on a crafted batch whose values can be checked by hand."""

import pytest
from reward_fixtures import make_batch

from rewardlab.data.arith import ArithTask
from rewardlab.diagnostics import hacking_metrics, pearson, step_agreement
from rewardlab.rewards.tiny_prm import check_arith_steps, perturb


def crafted():
    completions = ["1+2=3\n#### 3", "1+2=3\n####  3", "1+2=4\n#### 4", "1+2=3\n#### 3",  # prompt a
                   "5+5=10\n#### 10", "5+5=11\n#### 11"]  # prompt b
    batch = make_batch(["a"] * 4 + ["b"] * 2, completions)
    batch.reward = [0.2, 0.4, 0.9, 0.2, 0.1, 0.7]
    batch.gold = [1.0, 1.0, 0.0, 1.0, 1.0, 0.0]
    batch.completion_ids = [[0] * n for n in (2, 4, 9, 2, 1, 7)]
    return batch


def test_hacking_metrics_by_hand():
    m = hacking_metrics(crafted())
    assert m["diag/reward_length_corr"] == pytest.approx(1.0)  # reward is proportional to length here
    assert m["diag/reward_gold_corr"] < -0.9  # the proxy prefers wrong answers: hacking
    assert m["diag/reward_correct_mean"] == pytest.approx(0.9 / 4)
    assert m["diag/reward_incorrect_mean"] == pytest.approx(0.8)
    assert m["diag/gold_zero_variance"] == 0.0
    assert m["diag/explore_distinct_correct"] == pytest.approx((1 + 1) / 2)  # whitespace-normalized
    assert m["diag/explore_any_correct"] == 1.0
    assert m["diag/exploit_best_of_k"] == 0.0  # best-of-K picks the wrong answer in both groups
    assert m["diag/exploit_random"] == pytest.approx((0.75 + 0.5) / 2)
    assert m["diag/exploit_gain"] == pytest.approx(-0.625)


def test_without_gold_only_length_correlation():
    batch = crafted()
    batch.gold = None
    assert set(hacking_metrics(batch)) == {"diag/reward_length_corr"}
    assert pearson([1, 1, 1], [1, 2, 3]) is None


def test_arith_step_checker_and_prm_agreement():
    assert check_arith_steps(["1+2=3", "3*4=12", "12-5=8", "#### 8", "hello"]) == [1, 1, 0, 1, 0]
    assert check_arith_steps(["#### 3"]) == [0.0]
    batch = crafted()
    scores = [[0.9, 0.8], [0.9, 0.1], [0.9, 0.9], [0.6, 0.7], [0.2, 0.9], [0.1, 0.1]]
    # checker: every step correct except rows 2 and 5's first steps (their #### lines match their own last result)
    assert step_agreement(batch, scores) == pytest.approx(8 / 12)
    batch.extra["prm/step_scores"] = scores
    assert hacking_metrics(batch, ArithTask(train_size=10, test_size=5))["diag/prm/step_agreement"] == pytest.approx(8 / 12)


def test_perturbed_solutions_have_exactly_one_wrong_step():
    import random

    rng = random.Random(0)
    for ex in ArithTask(train_size=50, test_size=5).train_examples():
        steps = perturb(ex.solution, rng)
        assert len(steps) == len(ex.solution.split("\n"))
        assert check_arith_steps(steps).count(0.0) >= 1
