"""Expert iteration's selection: what passes under keep=threshold|best|quantile, the threshold a reward's pass
mark gives, graded rewards refused at start without one, and an iteration that keeps nothing is a skip."""

import pytest
from reward_fixtures import make_batch

from rewardlab.algos import AlgoContext
from rewardlab.algos.rft import ExpertIteration, quantile, select_kept
from rewardlab.errors import UserError
from rewardlab.rewards.length import LengthReward
from rewardlab.rewards.verifiable import VerifiableReward


def scored(rewards: list[float], prompts: list[str]):
    batch = make_batch(prompts, [f"c{i}" for i in range(len(rewards))])
    batch.reward = list(rewards)
    return batch


def test_threshold_best_and_quantile_selection():
    batch = scored([0.2, 0.9, 0.5, 0.1, 0.3, 0.3], ["a", "a", "a", "b", "b", "b"])
    assert select_kept(batch, 0.5, 4, True) == [1, 2]
    assert select_kept(batch, None, 2, True) == [1, 2, 4, 5]  # each prompt's best two, best first
    assert quantile([0.0, 1.0, 2.0, 3.0], 0.5) == pytest.approx(1.5)
    algo = ExpertIteration(AlgoContext(reward=LengthReward()), keep="quantile", quantile=0.5)
    assert algo.cutoff(batch) == pytest.approx(0.3)


def test_the_threshold_comes_from_the_rewards_pass_mark_and_graded_rewards_are_refused_at_start():
    assert ExpertIteration(AlgoContext(reward=VerifiableReward(correct=2.0))).threshold == 2.0
    with pytest.raises(UserError, match=r"reward 'length' gives graded scores with no pass mark; set algo.keep=best"):
        ExpertIteration(AlgoContext(reward=LengthReward()))
    assert ExpertIteration(AlgoContext(reward=LengthReward()), threshold=-0.1).threshold == -0.1
    assert ExpertIteration(AlgoContext(reward=LengthReward()), keep="best").cutoff(scored([0.0], ["a"])) is None
    with pytest.raises(UserError, match="algo.keep='top' is not one of threshold, best, quantile"):
        ExpertIteration(AlgoContext(reward=VerifiableReward()), keep="top")


def test_keeping_nothing_is_a_skipped_update_with_the_reason():
    algo = ExpertIteration(AlgoContext(reward=VerifiableReward()))
    out = algo.update(None, scored([0.0, 0.0], ["a", "a"]))  # returns before it touches the policy
    assert out["update/skipped"] == 1.0 and out["rft/kept"] == 0.0 and "loss" not in out
    assert "none reached the threshold 1 (best reward this iteration 0)" in out["update/skip_reason"]
