"""Sweeps: the submitit_local and parallel (joblib) launchers end to end, the sweep summary, and the SLURM
launcher config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from rewardlab.errors import UserError
from rewardlab.sweep import SweepSummary, summarize, write_sweep_summary


def fake_job(sweep: Path, num: int, overrides: list[str], rows: list[dict], done: bool = True) -> Path:
    job = sweep / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (job / "summary.json").write_text("{}")
    return job


def test_summary_lists_varying_overrides_and_final_metrics(tmp_path: Path):
    rows = lambda acc: [{"iteration": 0, "eval/accuracy": 0.1, "time/eval": 1.0},  # noqa: E731
                        {"iteration": 1, "reward/mean": 0.5, "time/iteration": 2.0, "eval/accuracy": acc}]
    fake_job(tmp_path, 0, ["logger=none", "algo.lr=1e-4"], rows(0.3))
    fake_job(tmp_path, 1, ["logger=none", "algo.lr=1e-3"], rows(0.2)[:1], done=False)
    table = summarize(tmp_path)
    assert [r["overrides"] for r in table] == [["algo.lr=1e-4"], ["algo.lr=1e-3"]]
    assert table[0]["eval/accuracy_start"] == 0.1 and table[0]["eval/accuracy_end"] == 0.3
    assert table[0]["state"] == "done" and table[1]["state"] == "running or stopped"
    assert table[0]["time/total_s"] == 3.0
    text = write_sweep_summary(tmp_path).read_text()
    assert "| 0 | algo.lr=1e-4 | done | 1 |" in text
    assert json.loads((tmp_path / "sweep_summary.json").read_text())[1]["iteration"] == 0


def test_cli_sweep_summary_prints_and_writes_the_table(tmp_path: Path):
    fake_job(tmp_path, 0, ["algo.lr=1e-4"], [{"iteration": 0, "eval/accuracy": 0.25}])
    fake_job(tmp_path, 1, ["algo.lr=1e-3"], [{"iteration": 0, "eval/accuracy": 0.5}])
    result = subprocess.run([sys.executable, "-m", "rewardlab", "sweep-summary", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "| 1 | algo.lr=1e-3 | done | 0 | 0.500 | 0.500 |" in result.stdout
    assert (tmp_path / "sweep_summary.md").read_text().endswith(result.stdout.rstrip("\n") + "\n")


def test_summary_of_a_directory_without_jobs_is_a_user_error(tmp_path: Path, capsys):
    with pytest.raises(UserError, match="no Hydra job directories"):
        summarize(tmp_path)
    SweepSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "sweep summary: not written" in capsys.readouterr().out


def test_slurm_launcher_asks_for_resources_and_requeue(tmp_path: Path, monkeypatch):
    """The sbatch file submitit would submit for hydra/launcher=slurm (a stub `srun` stands in for SLURM)."""
    import submitit
    from hydra import compose, initialize_config_module
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    from rewardlab.config import register_schemas

    (tmp_path / "srun").write_text("#!/bin/sh\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{__import__('os').environ['PATH']}")
    register_schemas()
    with initialize_config_module("rewardlab.conf", version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=[
            "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab",
            "hydra.launcher.gpus_per_node=4"])
    params = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert params["_target_"].endswith("SlurmLauncher") and params["max_num_timeout"] > 0
    for key in ("_target_", "submitit_folder", "name"):
        params.pop(key)
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    sbatch = executor._executor._make_submission_file_text("python -m rewardlab train", "uid")
    for line in ("--partition=gpu", "--account=lab", "--gpus-per-node=4", "--mem=64GB", "--time=240",
                 "--requeue", "--signal=USR2@120"):
        assert f"#SBATCH {line}\n" in sbatch, line


def test_requeue_reruns_the_same_job_into_the_same_directory():
    """submitit requeues what the launcher's checkpoint() returns: the same job number and sweep dir."""
    from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher

    launcher = SlurmLauncher(timeout_min=1)
    args = (["algo.lr=1e-4"], "hydra.sweep.dir", 3, "job_id_for_3", {})
    again = launcher.checkpoint(*args)
    assert again.function is launcher and again.args == args


def _two_seed_multirun(tmp_path: Path, launcher: str) -> Path:
    """`rewardlab train -m` over run.seed=0,1 (one tiny iteration each) through `hydra/launcher=<launcher>`;
    returns the sweep directory after checking the command succeeded."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "rewardlab", "train", "-m", f"hydra/launcher={launcher}", "logger=none",
           "run.iterations=1", "run.eval_size=4", "run.prompts_per_iteration=2", "algo.samples_per_prompt=2",
           "run.threads=1", "run.seed=0,1", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return sweep


def _check_one_iteration(job_dir: Path) -> None:
    """The job logged its evaluation row and one trained iteration."""
    rows = [json.loads(line) for line in (job_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1] and "reward/mean" in rows[1]


@pytest.mark.slow
def test_submitit_local_multirun_runs_two_jobs_with_metrics(tmp_path: Path):
    sweep = _two_seed_multirun(tmp_path, "submitit_local")
    for job in ("0", "1"):
        _check_one_iteration(sweep / job)
        assert (sweep / job / "summary.json").exists()
    assert list((sweep / ".submitit").iterdir())  # the jobs went through submitit
    table = json.loads((sweep / "sweep_summary.json").read_text())  # written by the multirun-end callback
    assert [(r["job"], r["overrides"], r["state"]) for r in table] == [
        ("0", ["run.seed=0"], "done"), ("1", ["run.seed=1"], "done")]


@pytest.mark.slow
def test_parallel_launcher_runs_two_jobs_at_the_same_time(tmp_path: Path):
    """hydra/launcher=parallel (conf/hydra/launcher/parallel.yaml): each job in its own process, two at once,
    so one job starts before the other has finished (a sequential launcher never overlaps them)."""
    sweep = _two_seed_multirun(tmp_path, "parallel")
    spans = []
    for job in ("0", "1"):
        _check_one_iteration(sweep / job)
        hydra_cfg = yaml.safe_load((sweep / job / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert hydra_cfg["launcher"]["_target_"].endswith("JoblibLauncher") and hydra_cfg["launcher"]["n_jobs"] == 2
        spans.append(((sweep / job / ".hydra" / "overrides.yaml").stat().st_mtime,
                      (sweep / job / "summary.json").stat().st_mtime))
    assert max(start for start, _ in spans) < min(end for _, end in spans)  # the two runs overlapped
    table = json.loads((sweep / "sweep_summary.json").read_text())
    assert [(r["job"], r["state"]) for r in table] == [("0", "done"), ("1", "done")]
