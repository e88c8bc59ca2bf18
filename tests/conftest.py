"""Shared fixtures: the cached tiny policy and helpers to run the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m rewardlab ARGS` in a subprocess, as a user would run it."""
    full_env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rewardlab", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_policy():
    """The default tiny policy (built once per machine and cached; ~2 minutes on a fresh one)."""
    from rewardlab.policy import load_policy

    return load_policy(name="tiny", device="cpu", log=lambda *_: None)


SMALL_RUN = ("logger=none", "run.iterations=2", "run.eval_every=2", "run.eval_size=16",
             "run.prompts_per_iteration=4")
