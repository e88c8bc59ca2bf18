"""bench/real_shape.py's small mode end to end, and bench/gpu_check.sh's shell syntax: the GPU check cannot run
here, so at least its logic must parse and the benchmark it drives must work on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.slow
def test_small_shape_runs_the_same_work_through_rewardlab_and_trl(tmp_path):
    iterations, prompts, group, tokens = 2, 2, 2, 4
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "real_shape.py"), "--shape", "small", "--iterations", str(iterations),
         "--prompts", str(prompts), "--group", str(group), "--max-new-tokens", str(tokens), "--micro-batch", "2"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    rows = [json.loads(line.split(": ", 1)[1]) for line in done.stderr.splitlines() if line.startswith("repeat ")]
    assert summary["vocab_size"] == 151_936 and summary["completion_tokens_equal"]
    assert len(rows) == 2  # rewardlab (native engine) and TRL, one repeat
    for row in rows:
        assert row["completion_tokens"] == iterations * prompts * group * tokens
        assert row["optimizer_steps"] == iterations  # one optimizer step per iteration on both sides
        assert row["peak_rss_mb"] > 100 and row["cuda_peak_mb"] is None
        assert len(row["raw"]["step_s"]) == iterations and all(s > 0 for s in row["raw"]["step_s"])
    for system in ("rewardlab:native", "trl"):
        assert summary[f"{system}/s_per_iter"] > 0 and summary[f"{system}/generate_tokens_per_s"] > 0
