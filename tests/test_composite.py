"""Composite rewards: weights, transforms, normalization and ensembles on crafted inputs; the README's
composite command lines, run as typed through the CLI."""

import math
import shlex

import pytest
from conftest import REPO, SMALL_RUN, read_metrics, run_cli
from omegaconf import OmegaConf
from reward_fixtures import make_batch

from rewardlab.errors import UserError
from rewardlab.rewards.composite import CompositeReward, ComponentConfig, clip_steps, delta_steps
from rewardlab.rollout import Batch

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


def test_components_come_from_reward_choices_on_the_command_line():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rewardlab.cli.overrides import validate
    from rewardlab.config import register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            "reward=composite", "~reward.components.prm", "+reward@reward.components.len.reward=length",
            "reward.components.len.weight=-0.5", "+reward@reward.components.rm.members.a=format",
            "+reward@reward.components.rm.members.b=majority_vote", "reward.components.rm.ensemble=min"])
    GlobalHydra.instance().clear()
    reward = CompositeReward(components=cfg.reward.components)
    assert [c.name for c in reward.components] == ["verifiable", "len", "rm"]
    assert reward.components[1].weight == -0.5 and [m.name for m in reward.components[2].members] == ["rm/a", "rm/b"]
    with pytest.raises(UserError, match=r"reward.components.len is not a component yet: add it by choosing its "
                                        r"reward, \+reward@reward.components.len.reward=<reward>"):
        validate("train", ["reward=composite", "+reward.components.len.reward._target_=x"])
    with pytest.raises(UserError, match=r"unknown config key 'reward.components' \(VerifiableConfig has no"):
        validate("train", ["reward=verifiable", "+reward@reward.components.len.reward=length"])


def readme_composite_commands() -> list[list[str]]:
    """The README's `rewardlab train reward=composite ...` lines, split as a shell would."""
    text = (REPO / "README.md").read_text()
    return [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("rewardlab train reward=composite ")]


@pytest.mark.slow
def test_the_readme_composite_commands_run_as_typed(tmp_path):
    commands = readme_composite_commands()
    assert len(commands) >= 4 and any("+reward@reward.components.len.reward=length" in c for c in commands)
    for k, args in enumerate(commands):
        run = tmp_path / str(k)
        done = run_cli(*args, *SMALL_RUN, "run.iterations=1", f"hydra.run.dir={run}")
        assert done.returncode == 0, (args, done.stderr[-2000:])
        components = OmegaConf.load(run / "config.yaml").reward.components
        row = read_metrics(run)[1]
        batch = Batch.load(run / "rollouts" / "iter_0001.parquet")
        for name, component in components.items():  # each component as the command line built it
            assert f"reward/{name}/mean" in row, (args, name)
            assert all(f"reward/{name}/{m}/mean" in row for m in component.members)
        for i, total in enumerate(batch.reward):  # the reward is the weighted sum of the components' columns
            assert total == pytest.approx(sum(c.weight * batch.rewards[n][i] for n, c in components.items()), abs=1e-5)
