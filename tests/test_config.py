"""Every group choice composes; user mistakes get one line and exit code 2."""

import pytest
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from rewardlab.cli.listing import collect
from rewardlab.config import register_schemas

from conftest import run_cli

TRAIN_GROUPS = ("policy", "dataset", "reward", "algo", "generation", "logger", "experiment")


def _compose(name: str, overrides: list[str]):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


CHOICES = [(g, c) for g, choices in collect().items() if g in TRAIN_GROUPS for c in choices]


@pytest.mark.parametrize("group,choice", CHOICES, ids=[f"{g}={c}" for g, c in CHOICES])
def test_every_group_choice_composes(group, choice):
    cfg = _compose("train", [f"{group}={choice}"])
    if group != "experiment":
        assert cfg[group]["_target_"]


def test_every_choice_has_a_description():
    for group, choices in collect().items():
        for choice, text in choices.items():
            assert text, f"{group}/{choice}.yaml needs a '# description' first line"


def test_defaults_match_the_design():
    cfg = _compose("train", [])
    assert cfg.policy.name == "tiny" and cfg.dataset._target_.endswith("ArithTask")
    assert cfg.reward._target_.endswith("VerifiableReward") and cfg.algo.advantage == "grpo"
    assert cfg.logger._target_.endswith("WandbLogger")
    assert cfg.generation.sampling.max_new_tokens == cfg.dataset.max_new_tokens


@pytest.mark.parametrize("override,expected", [
    ("algo=grpoo", "unknown choice 'grpoo' for algo"),
    ("run.iteration=3", "unknown config key 'run.iteration'"),
    ("algo.lr_rate=1", "unknown config key 'algo.lr_rate'"),
    ("run.iterations=abc", "run.iterations"),
    ("policy.path=/nonexistent/model", "policy.path=/nonexistent/model does not exist"),
])
def test_user_mistakes_give_one_line_and_exit_code_2(override, expected, tmp_path):
    result = run_cli("train", override, "logger=none", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2, result.stderr
    lines = [l for l in result.stderr.splitlines() if l.strip() and not l.startswith(("Loading", "Writing"))]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0]
    assert "Traceback" not in result.stderr


def test_sweep_with_a_bad_value_fails_before_any_job(tmp_path):
    result = run_cli("train", "-m", "algo=grpo,nope", "logger=none", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 2 and "unknown choice 'nope'" in result.stderr
    assert not any(tmp_path.iterdir()) if tmp_path.exists() else True


def test_cfg_job_prints_the_config_without_running(tmp_path):
    result = run_cli("train", "--cfg", "job", "algo=rft", f"hydra.run.dir={tmp_path}/x")
    assert result.returncode == 0, result.stderr
    assert "rewardlab.algos.rft.ExpertIteration" in result.stdout and "iterations:" in result.stdout
    assert not (tmp_path / "x").exists()


def test_help_and_configs_list():
    result = run_cli("--help")
    assert result.returncode == 0 and "train" in result.stdout and "configs" in result.stdout
    assert "--multirun" in run_cli("train", "--help").stdout
    listing = run_cli("configs").stdout
    for word in ("algo", "grpo", "rft", "reward", "verifiable", "policy", "tiny", "dataset", "arith"):
        assert word in listing
