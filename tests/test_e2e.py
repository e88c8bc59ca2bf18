"""End-to-end tiny runs through the CLI: each algorithm, the run directory's contents, multirun, eval."""

import json
from pathlib import Path

import pytest

from rewardlab.rollout import Batch

from conftest import SMALL_RUN, read_metrics, run_cli

PER_ITERATION = ("reward/mean", "reward/verifiable/mean", "gold/accuracy", "length/mean", "filter/kept_fraction",
                 "time/generate", "time/score", "time/update", "time/iteration", "rollouts")


def _run_dir(result) -> Path:
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("run dir: ")
    return Path(last.removeprefix("run dir: "))


@pytest.mark.slow
def test_grpo_run_writes_everything_a_researcher_needs(tiny_policy, tmp_path):
    run_dir = _run_dir(run_cli("train", *SMALL_RUN, "logger=wandb", f"hydra.run.dir={tmp_path}/run"))
    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    assert set(rows[0]) >= {"eval/accuracy", "time/eval"}
    for row in rows[1:]:
        assert set(row) >= set(PER_ITERATION) | {"loss", "entropy", "clip_fraction", "lr"}
        assert row["rollouts"] == 8 * 8
        assert 0.0 <= row["gold/accuracy"] <= 1.0 and row["entropy"] > 0
    assert "eval/accuracy" in rows[2]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations_completed"] == 3 and summary["eval/accuracy_start"] == rows[0]["eval/accuracy"]
    assert "algo:" in (run_dir / "config.yaml").read_text()
    batch = Batch.load(run_dir / "rollouts" / "iter_0002.parquet")
    assert len(batch) == 64 and batch.iteration == 2 and len(batch.advantages) == 64
    assert batch.extra["kept"] == [True] * 64
    assert batch.rewards["verifiable"] == batch.reward and batch.gold is not None
    assert all(len(lp) == len(ids) for lp, ids in zip(batch.sample_logprobs, batch.completion_ids))
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run directory missing"


@pytest.mark.slow
def test_rft_run_fine_tunes_on_kept_samples(piped_run):
    done, run_dir = piped_run("rft")  # conftest: the run test_console reads too
    assert _run_dir(done) == run_dir
    rows = read_metrics(run_dir)
    assert len(rows) == 3
    for row in rows[1:]:
        assert row["rft/kept"] >= 1 and "loss" in row and row["loss"] > 0


@pytest.mark.slow
def test_multirun_makes_one_run_directory_per_job(tiny_policy, tmp_path):
    result = run_cli("train", "-m", "algo=grpo,rft", "logger=none", "run.iterations=1", "run.eval_size=8",
                     "run.prompts_per_iteration=2", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("0", "1"):
        rows = read_metrics(tmp_path / job)
        assert [r["iteration"] for r in rows] == [0, 1]
    assert "rft" in (tmp_path / "1" / "config.yaml").read_text()


def test_eval_reports_accuracy(tiny_policy, tmp_path):
    result = run_cli("eval", "run.eval_size=32", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "eval/accuracy:" in result.stdout
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert 0.0 < saved["eval/accuracy"] <= 1.0 and saved["eval/size"] == 32
