"""Wall time, peak memory and per-stage time of the default `rewardlab train` (what `make train` runs).

    python bench/default_run.py [--repeats 3] [--fresh-cache] [OVERRIDES...]

`--fresh-cache` points REWARDLAB_CACHE at an empty directory so the first-run tiny-model build is
included, as on a fresh clone. The last printed line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = ("time/generate", "time/score", "time/update", "time/eval")


def one_run(overrides: list[str], fresh_cache: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
        if fresh_cache:
            env["REWARDLAB_CACHE"] = str(Path(tmp) / "cache")
        run_dir = Path(tmp) / "run"
        began = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rewardlab", "train", f"hydra.run.dir={run_dir}", *overrides],
                       check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - began
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
           "eval_accuracy_start": rows[0]["eval/accuracy"], "eval_accuracy_end": rows[-1]["eval/accuracy"]}
    for stage in STAGES:
        out[stage] = sum(r.get(stage, 0.0) for r in rows)
    out["time/loop"] = sum(r.get("time/iteration", 0.0) for r in rows[1:]) + rows[0].get("time/eval", 0.0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--fresh-cache", action="store_true")
    args, overrides = parser.parse_known_args()
    runs = []
    for i in range(args.repeats):
        runs.append(one_run(overrides, args.fresh_cache))
        print(f"run {i}: {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
    summary = {"overrides": overrides, "fresh_cache": args.fresh_cache, "repeats": args.repeats}
    for key in runs[0]:
        values = [r[key] for r in runs]
        summary[key] = statistics.median(values)
        summary[f"{key}_range"] = [min(values), max(values)]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
