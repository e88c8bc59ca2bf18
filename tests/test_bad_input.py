"""The bad-input catalogue, in-process through `rewardlab.run.train`: NaN/inf rewards are dropped and
counted, an empty batch after filtering skips the update with a warning, a judge that often fails to
give a parsable score is logged and its rows dropped while one that never does stops the run with one
line and nothing half-written, a reward model of unknown format stops the CLI with one line and exit
code 2, and a rerun into a run directory with another config is refused.
(Disk full during a checkpoint is in test_checkpoint.py; W&B unreachable in test_resume.py.)"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from rewardlab.config import register_schemas
from rewardlab.errors import UserError
from rewardlab.rewards.judge import LLMJudge
from rewardlab.rewards.verifiable import VerifiableReward
from rewardlab.run import train

from conftest import SMALL_RUN, read_metrics, run_cli
from reward_fixtures import save_tiny

TINY = ["logger=none", "run.iterations=2", "run.eval_every=2", "run.eval_size=8", "run.prompts_per_iteration=4",
        "algo.samples_per_prompt=4", "run.threads=1", "run.save_rollouts=false"]


def compose_train(*overrides: str):
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        return compose(config_name="train", overrides=[*TINY, *overrides])


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # train() applies run.threads=1 to this process
    yield
    torch.set_num_threads(threads)


def test_nonfinite_rewards_are_dropped_counted_and_warned(tiny_policy, tmp_path, monkeypatch):
    real = VerifiableReward.compute

    def broken(self, batch):
        values = real(self, batch)
        values[0], values[5] = float("nan"), float("inf")
        return values

    monkeypatch.setattr(VerifiableReward, "compute", broken)
    with pytest.warns(UserWarning, match="2 of 16 rollouts have a NaN or infinite reward"):
        train(compose_train(), tmp_path)
    for row in read_metrics(tmp_path)[1:]:
        assert row["filter/nonfinite/dropped"] == 2 and row["reward/nonfinite"] == 2
        assert row["filter/kept_fraction"] == 14 / 16
        assert math.isfinite(row["reward/mean"]) and math.isfinite(row["loss"])  # nothing NaN reached the update


def test_an_empty_batch_after_filtering_skips_the_update_with_a_warning(tiny_policy, tmp_path):
    cfg = compose_train("algo.samples_per_prompt=1",  # one sample per prompt: every group has zero variance
                        "+filters.zero_variance._target_=rewardlab.filters.DropZeroVarianceGroups")
    with pytest.warns(UserWarning, match="no rollouts left after filtering; update skipped"):
        train(cfg, tmp_path)
    rows = read_metrics(tmp_path)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["update/skipped"] == 1.0 and row["filter/kept_fraction"] == 0.0 and "loss" not in row
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "iter_0002/policy"


def test_a_rerun_into_a_run_dir_with_another_config_is_refused(tiny_policy, tmp_path):
    train(compose_train("run.iterations=1"), tmp_path)
    with pytest.raises(UserError, match=r"holds a run with a different config \(algo.lr\).*resume="):
        train(compose_train("run.iterations=2", "algo.lr=0.5"), tmp_path)
    train(compose_train("run.iterations=1"), tmp_path)  # the same config: resumes (here: already complete)
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0, 1]


JUDGE = ["reward=judge", "reward.judge.samples=1", "reward.judge.temperature=0", "reward.judge.max_new_tokens=8"]


def test_a_judge_that_often_fails_to_score_is_logged_and_its_rows_dropped(tiny_policy, tmp_path, monkeypatch):
    def half_parsable(self, queries):
        return [[f"Score: {i % 4}" if i % 2 else "I cannot judge this."] for i in range(len(queries))]

    monkeypatch.setattr(LLMJudge, "ask", half_parsable)
    with pytest.warns(UserWarning, match="8 of 16 rollouts have a NaN"):
        train(compose_train(*JUDGE), tmp_path)
    for row in read_metrics(tmp_path)[1:]:
        assert row["judge/parse_failure_rate"] == 0.5 and row["filter/nonfinite/dropped"] == 8
        assert "loss" in row  # the run went on and updated on the scored half


def test_a_judge_that_never_scores_stops_the_run_with_one_line_and_nothing_half_written(tiny_policy, tmp_path):
    with pytest.raises(UserError, match=r"reward=judge: none of the 16 judge outputs this iteration had a score"):
        train(compose_train(*JUDGE), tmp_path)  # the tiny policy, judging itself, never writes "Score: N"
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [0]
    assert os.readlink(tmp_path / "checkpoints" / "latest") == "iter_0000/policy"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000", "latest"]


@pytest.mark.slow
def test_a_reward_model_of_unknown_format_stops_with_one_line_and_exit_code_2(tiny_policy, tmp_path):
    model = save_tiny(tmp_path / "sequence_classifier", "sequence", num_labels=1)  # no PRM format fits it
    result = run_cli("train", *SMALL_RUN, "reward=prm", f"reward.model={model}", f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: cannot tell the PRM format")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not (tmp_path / "run" / "checkpoints").exists()


def test_two_hydra_modes_at_once_are_one_line_and_exit_code_2():
    """`-m` with `--cfg` is refused by Hydra with a traceback; rewardlab says which flags clash, before any work."""
    result = run_cli("train", "-m", "algo.lr=1e-4,1e-3", "--cfg", "job")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: -m and --cfg cannot be combined: Hydra does one of run, multirun, --cfg, --info at a time "
        "(--cfg job shows one job's config: drop -m)"]
    assert "Traceback" not in result.stderr + result.stdout


def test_eval_every_zero_evaluates_at_the_start_and_end_only_and_a_negative_one_is_refused(tiny_policy, tmp_path):
    small = [a for a in SMALL_RUN if not a.startswith("run.eval_every")]
    result = run_cli("train", *small, "run.iterations=3", "run.eval_every=0", f"hydra.run.dir={tmp_path}/zero")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["iteration"] for r in read_metrics(tmp_path / "zero") if "eval/accuracy" in r] == [0, 3]
    result = run_cli("train", *small, "run.eval_every=-1", f"hydra.run.dir={tmp_path}/negative")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: run.eval_every=-1: give 0")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "negative" / "metrics.jsonl").exists()
