"""End to end on the tiny default: process credit (PURE and GRPO sum-form) on arith_steps and DAPO with
dynamic sampling run through the CLI and log their metrics; process credit on an outcome reward fails
with one line and exit code 2."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = ("logger=none", "run.iterations=1", "run.eval_size=8", "run.prompts_per_iteration=4",
         "algo.samples_per_prompt=4")  # with 2 prompts every step score can tie: no gradient, a skipped update


def train(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    return subprocess.run([sys.executable, "-m", "rewardlab", "train", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)


@pytest.mark.slow
@pytest.mark.parametrize("choice", [("algo=pure",), ("algo=grpo", "algo.credit=sum")])
def test_process_credit_end_to_end(tmp_path, choice):
    done = train(*choice, "reward=arith_steps", *SMALL, f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    for key in ("process/steps", "process/step_reward_mean", "process/step_reward_min", "process/worst_step_wrong",
                "gold/accuracy", "loss", "eval/accuracy"):
        assert key in row, key
    assert "update/skipped" not in row
    assert row["process/steps"] > 0


@pytest.mark.slow
def test_dapo_end_to_end(tmp_path):
    done = train("algo=dapo", *SMALL, f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert 1 <= row["sampling/rounds"] <= 4 and "reward/overlong/mean" in row


@pytest.mark.slow
def test_process_credit_on_an_outcome_reward_is_a_user_error(tmp_path):
    done = train("algo=pure", "reward=verifiable", *SMALL, f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: algo.credit=min needs a process reward")
