"""Composite rewards: weights, transforms, normalization and ensembles on crafted inputs."""

import math

import pytest
from omegaconf import OmegaConf
from reward_fixtures import make_batch

from rewardlab.errors import UserError
from rewardlab.rewards.composite import CompositeReward, ComponentConfig, clip_steps, delta_steps

STEPS = {"_target_": "reward_fixtures.StepReward"}
FMT = {"_target_": "rewardlab.rewards.format.FormatReward"}


def composite(**components) -> CompositeReward:
    cfg = {name: OmegaConf.merge(OmegaConf.structured(ComponentConfig), c) for name, c in components.items()}
    return CompositeReward(components=cfg)


def test_weighted_sum_keeps_each_column_and_weights_step_rewards():
    batch = make_batch(["p", "p"], ["0.9\n0.5", "0.2\n0.8"])
    reward = composite(prm={"reward": STEPS, "weight": 0.9},
                       fmt={"reward": {**FMT, "pattern": r"0\.9.*"}, "weight": 0.1})
    reward.score(batch)
    assert batch.rewards["prm"] == [0.5, 0.2] and batch.rewards["fmt"] == [1.0, 0.0]
    assert batch.reward == pytest.approx([0.9 * 0.5 + 0.1, 0.9 * 0.2])
    assert [r for row in batch.step_rewards for r in row] == pytest.approx([0.81, 0.45, 0.18, 0.72])


def test_clip_and_delta_transforms():
    assert clip_steps([0.9, 0.2, 0.5], 0.5) == pytest.approx([0.0, -0.3, 0.0])
    assert delta_steps([0.9, 0.2, 0.5]) == pytest.approx([0.7, -0.3, 0.5])
    batch = make_batch(["p"], ["0.9\n0.2\n0.5"])
    composite(prm={"reward": STEPS, "transform": "clip", "eta": 0.5}).score(batch)
    assert batch.reward == pytest.approx([-0.3]) and batch.step_rewards[0] == pytest.approx([0.0, -0.3, 0.0])
    composite(prm={"reward": STEPS, "transform": "delta"}).score(batch)
    assert batch.reward == pytest.approx([0.9])  # the deltas telescope to the first step's score
    with pytest.raises(UserError, match="delta needs a process reward"):
        composite(fmt={"reward": FMT, "transform": "delta"}).score(batch)


def test_par_is_sigmoid_centred_on_the_reference_response_score():
    batch = make_batch(["p", "p"], ["#### 3", "3"], solutions=["1+2=3\n#### 3"] * 2)
    composite(fmt={"reward": FMT, "transform": "par"}).score(batch)
    assert batch.reward == pytest.approx([0.5, 1 / (1 + math.e)])
    with pytest.raises(UserError, match="reference response"):
        composite(fmt={"reward": FMT, "transform": "par"}).score(make_batch(["p"], ["x"]))


def test_group_and_batch_normalization():
    batch = make_batch(["a", "a", "b", "b"], ["#### 1", "x", "#### 1", "#### 2"])
    composite(fmt={"reward": FMT, "normalize": "group"}).score(batch)
    assert batch.reward == pytest.approx([1.0, -1.0, 0.0, 0.0], abs=1e-5)
    composite(fmt={"reward": FMT, "normalize": "batch"}).score(batch)
    assert sum(batch.reward) == pytest.approx(0.0, abs=1e-6)


def test_ensembles_mean_min_uwo():
    members = {"a": {**FMT, "pattern": "a.*"}, "b": {**FMT, "pattern": ".*b"}}
    batch = make_batch(["p", "p"], ["ab", "ac"])
    for how, expected in (("mean", [1.0, 0.5]), ("min", [1.0, 0.0]), ("uwo", [1.0, 0.5 - 2.0 * 0.25])):
        composite(ens={"members": members, "ensemble": how, "uwo_lambda": 2.0}).score(batch)
        assert batch.reward == pytest.approx(expected)
    assert batch.rewards["ens/a"] == [1.0, 1.0] and batch.rewards["ens/b"] == [1.0, 0.0]


def test_bad_component_settings():
    with pytest.raises(UserError, match="transform"):
        composite(fmt={"reward": FMT, "transform": "squash"})
    with pytest.raises(UserError, match=r"names no reward; add one with \+reward@reward.components.empty.reward="):
        composite(empty={})
    with pytest.raises(UserError, match="both `reward` and `members`"):
        composite(fmt={"reward": FMT, "members": {"a": FMT}})
    with pytest.raises(UserError, match="at least one component"):
        CompositeReward(components={})
