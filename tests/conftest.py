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


@pytest.fixture(scope="session")
def tiny_judge_policy(tiny_policy):
    """The judging tiny policy (policy=tiny_judge), built once per machine from the cached tiny one."""
    from rewardlab.policy import load_policy

    return load_policy(name="tiny", tiny={"judge": True}, device="cpu", log=lambda *_: None)


# 8 prompts, not 4: about 40% of the tiny policy's groups have equal rewards (all right or all wrong), so with 4 an
# iteration of every group equal (no update, a warning line) came up on one machine's tiny build (seed 0, AMD EPYC,
# 2026-12-04); with 8 that is ~0.1%, and the tests that read an updated iteration's metrics stay meaningful
SMALL_RUN = ("logger=none", "run.iterations=2", "run.eval_every=2", "run.eval_size=16",
             "run.prompts_per_iteration=8")


@pytest.fixture(scope="session")
def piped_run(tiny_policy, tmp_path_factory):
    """`piped_run(algo)`: `rewardlab train algo=<algo>` with SMALL_RUN and an eval every iteration, through the CLI
    with its output piped (COLUMNS=40), run once per algorithm per session and shared by the tests that read it
    (console output, the run's metrics): (the finished process, its run dir)."""
    done: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def run(algo: str) -> tuple[subprocess.CompletedProcess, Path]:
        if algo not in done:
            run_dir = tmp_path_factory.mktemp(f"piped-{algo}") / "run"
            done[algo] = run_cli("train", f"algo={algo}", *SMALL_RUN, "run.eval_every=1", f"hydra.run.dir={run_dir}",
                                 env={"COLUMNS": "40"}), run_dir
        return done[algo]
    return run


@pytest.fixture(scope="session")
def ddp_run(tmp_path_factory) -> Path:
    """The tiny GRPO run (test_distributed.TINY_GRPO with test_sharding.UPDATE: a KL term, two minibatch passes,
    micro-batches) under torchrun on 2 processes, run once: test_distributed checks that its ranks trained
    identical weights, test_sharding compares every sharded run against it."""
    from test_distributed import TINY_GRPO
    from test_sharding import UPDATE, torchrun

    run_dir = tmp_path_factory.mktemp("ddp") / "run"
    torchrun(run_dir, *TINY_GRPO, *UPDATE)
    return run_dir
