"""End to end through the CLI in subprocesses: determinism, SIGKILL then `resume=`, SIGTERM (SLURM's
warning) then a Hydra rerun into the same directory (what a requeue does), and W&B resuming its run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = ["run.iterations=3", "run.eval_every=2", "run.eval_size=20", "run.prompts_per_iteration=4",
        "run.threads=1", "algo.samples_per_prompt=4"]


def command(run_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rewardlab", "train", *TINY, *extra, f"hydra.run.dir={run_dir}"]


def environment(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return {**env, "WANDB_SILENT": "true", **extra}


def rows(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock keys, which are the only ones allowed to differ."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


def latest(run_dir: Path) -> str:
    marker = run_dir / "checkpoints" / "latest"
    return Path(os.readlink(marker)).parent.name if marker.is_symlink() else ""


def logged(run_dir: Path) -> int:
    """The last iteration in metrics.jsonl (-1 before the first)."""
    path = run_dir / "metrics.jsonl"
    return max((r["iteration"] for r in rows(run_dir)), default=-1) if path.exists() else -1


def start_and_wait(cmd: list[str], run_dir: Path, checkpoint: str, env: dict, after: int = -1) -> subprocess.Popen:
    """Start a run in its own process group and return once `checkpoint` is the latest and iteration `after`
    is in metrics.jsonl: mid-iteration."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    deadline = time.monotonic() + 240
    while latest(run_dir) != checkpoint or logged(run_dir) < after:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never reached the checkpoint"
        time.sleep(0.01)
    return proc


@pytest.fixture(scope="module")
def uninterrupted(tiny_policy, tmp_path_factory) -> list[dict]:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    subprocess.run(command(run_dir, "logger=none"), check=True, capture_output=True, env=environment())
    return rows(run_dir)


def test_same_config_and_seed_give_identical_metrics(uninterrupted, tmp_path):
    subprocess.run(command(tmp_path, "logger=none"), check=True, capture_output=True, env=environment())
    assert [r["iteration"] for r in uninterrupted] == [0, 1, 2, 3]
    assert rows(tmp_path) == uninterrupted


def test_sigkill_mid_iteration_then_resume_gives_the_uninterrupted_metrics(uninterrupted, tmp_path):
    proc = start_and_wait(command(tmp_path, "logger=none"), tmp_path, "iter_0001", environment())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    assert len(rows(tmp_path)) < 4 and not (tmp_path / "summary.json").exists()  # really cut short

    resumed = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={tmp_path}"],
                             capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert rows(tmp_path) == uninterrupted  # no duplicate, no missing row, same numbers
    assert not list((tmp_path / "checkpoints").glob(".tmp-*"))


def test_sigterm_exits_75_and_a_rerun_into_the_same_dir_resumes_the_wandb_run(uninterrupted, tmp_path):
    cmd = command(tmp_path, "logger=wandb", "logger.mode=offline")
    proc = start_and_wait(cmd, tmp_path, "iter_0001", environment())
    os.killpg(proc.pid, signal.SIGTERM)  # SLURM signals every process of the job step
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert f"resume={tmp_path}" in stderr and "Traceback" not in stderr
    run_id = (tmp_path / "wandb_id").read_text().strip()

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=environment())
    assert rerun.returncode == 0, rerun.stderr
    assert rows(tmp_path) == uninterrupted
    assert (tmp_path / "wandb_id").read_text().strip() == run_id
    offline = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline)  # one W&B run, resumed
    assert f"wandb sync --id {run_id}" in rerun.stderr and all(name in rerun.stderr for name in offline)


def test_sigint_exits_130_with_the_last_checkpoint_intact_and_resumes(uninterrupted, tmp_path):
    proc = start_and_wait(command(tmp_path, "logger=none"), tmp_path, "iter_0001", environment())
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C reaches the whole foreground process group
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "SIGINT received" in stderr and f"resume={tmp_path}" in stderr and "Traceback" not in stderr
    assert not (tmp_path / "final").exists()

    resumed = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={tmp_path}"],
                             capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr
    assert rows(tmp_path) == uninterrupted and (tmp_path / "final" / "model.safetensors").exists()


EVERY2 = ("run.iterations=4", "run.checkpoint_every=2", "logger=none")


@pytest.fixture(scope="module")
def every2(tiny_policy, tmp_path_factory) -> tuple[Path, list[dict]]:
    """An uninterrupted 4-iteration run checkpointed at iterations 2 and 4 (the last)."""
    run_dir = tmp_path_factory.mktemp("every2")
    subprocess.run(command(run_dir, *EVERY2), check=True, capture_output=True, env=environment())
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_0002", "iter_0004"]
    return run_dir, rows(run_dir)


def test_sigkill_between_checkpoints_recomputes_the_lost_iterations_exactly(every2, tmp_path):
    proc = start_and_wait(command(tmp_path, *EVERY2), tmp_path, "iter_0002", environment(), after=3)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert logged(tmp_path) in (3, 4) and latest(tmp_path) == "iter_0002"  # iteration 3 is past the checkpoint

    resumed = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={tmp_path}"],
                             capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr and "after iteration 2 of 4" in resumed.stderr
    assert rows(tmp_path) == every2[1]  # rows 3.. dropped and recomputed: no duplicate, same numbers
    assert sorted(p.name for p in (tmp_path / "rollouts").iterdir()) == [f"iter_{i:04d}.parquet" for i in range(1, 5)]


def test_sigterm_between_checkpoints_finishes_the_iteration_checkpoints_it_and_exits_75(every2, tmp_path):
    proc = start_and_wait(command(tmp_path, *EVERY2), tmp_path, "iter_0002", environment(), after=2)
    os.killpg(proc.pid, signal.SIGTERM)  # during iteration 3, which the cadence would not checkpoint
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 75, stderr
    assert "stopped after the checkpoint completed" in stderr and "Traceback" not in stderr
    assert latest(tmp_path) == "iter_0003" and logged(tmp_path) == 3  # the iteration in progress is kept

    resumed = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={tmp_path}"],
                             capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr
    assert "after iteration 3 of 4" in resumed.stderr and rows(tmp_path) == every2[1]


def test_resume_refuses_a_state_pt_that_would_run_code_and_runs_none_of_it(every2, tmp_path):
    run_dir = tmp_path / "copied"
    shutil.copytree(every2[0], run_dir, symlinks=True)  # a run directory from a shared disk
    marker = tmp_path / "marker"
    payload = (f"import torch\nclass Evil:\n    def __reduce__(self):\n        return (open, ({str(marker)!r}, 'w'))\n"
               f"torch.save({{'format': 1, 'iteration': 4, 'algo': Evil()}}, {str(run_dir / 'checkpoints/iter_0004/state.pt')!r})")
    subprocess.run([sys.executable, "-c", payload], check=True)
    resumed = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={run_dir}", "run.iterations=5"],
                             capture_output=True, text=True, env=environment())
    assert resumed.returncode == 2, resumed.stderr
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could run code" in errors[0] and "Traceback" not in resumed.stderr
    assert not marker.exists()


def test_wandb_unreachable_with_a_key_continues_offline(tiny_policy, tmp_path):
    env = environment(WANDB_API_KEY="0" * 40, WANDB_BASE_URL="http://127.0.0.1:9", WANDB_INIT_TIMEOUT="2")
    env.pop("WANDB_SILENT")
    run = subprocess.run(command(tmp_path, "logger=wandb", "run.iterations=1"), capture_output=True,
                         text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "W&B online init failed" in run.stderr and "logging offline" in run.stderr
    run_id = (tmp_path / "wandb_id").read_text().strip()
    assert [p.name.endswith(run_id) for p in (tmp_path / "wandb").glob("offline-run-*")] == [True]
    assert [r["iteration"] for r in rows(tmp_path)] == [0, 1]


@pytest.mark.slow
def test_lora_run_killed_then_resumed_matches_and_checkpoints_only_adapters(tmp_path):
    lora = ("policy.lora.r=8", "algo.beta=0.05", "algo.lr=1e-2", "logger=none")
    straight = tmp_path / "straight"
    subprocess.run(command(straight, *lora), check=True, capture_output=True, env=environment())
    cut = tmp_path / "cut"
    proc = start_and_wait(command(cut, *lora), cut, "iter_0001", environment())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert len(rows(cut)) < len(rows(straight))
    saved = {p.name for p in (cut / "checkpoints" / "iter_0001" / "policy").iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    resumed = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={cut}"],
                             capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr
    assert rows(cut) == rows(straight)
