"""A run's log outside a terminal (SLURM logs, `| tee`): stdout holds only `run dir:`, stderr one unwrapped
line per iteration with all its fields, and no library progress bar or warning. What libraries print
(TRL's final `{'train_runtime': ...}`, transformers' notices) never reaches stdout."""

import re

import pytest
from conftest import read_metrics

from rewardlab.tracking import ProgressDisplay


@pytest.mark.slow
@pytest.mark.parametrize("algo", ["grpo", "rft", "dpo"])
def test_piped_run_prints_one_line_per_iteration_and_nothing_else(algo, piped_run):
    done, run = piped_run(algo)  # conftest: SMALL_RUN through the CLI, output piped, COLUMNS=40
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"run dir: {run}\n"
    # transformers prints this notice once when it loads its trainer under WANDB_MODE=offline (set by run_cli)
    lines = [line for line in done.stderr.splitlines() if line != "[INFO] Running in WANDB offline mode"]
    assert not [line for line in lines if re.search(r"Warning|it/s|%\||Loading weights|examples/s", line)], lines
    iteration_lines = [line for line in lines if line.startswith("iter ")]
    assert len(iteration_lines) == len(lines)  # nothing else in a run that went well
    for row, line in zip(read_metrics(run), iteration_lines, strict=True):
        assert line.split()[:2] == ["iter", str(row["iteration"])]
        for key in ProgressDisplay.KEYS:  # every field of the iteration on its one line, none wrapped away
            if isinstance(row.get(key), (int, float)):
                assert f"{key}={row[key]:.3f}" in line, (key, line)
