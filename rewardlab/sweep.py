"""Sweep summary: one row per job of a Hydra multirun (the overrides that vary, and final metrics),
written as sweep_summary.md and sweep_summary.json by a Hydra callback when a sweep ends (registered in
conf/train.yaml) and by `rewardlab sweep-summary <multirun dir>` at any time, also mid-sweep.
A job's overrides come from the record the run writes itself once accepted (provenance.py), so a rerun
that was refused cannot relabel a job whose results came from other settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from rewardlab.errors import UserError
from rewardlab.io import write_json_atomic, write_text_atomic
from rewardlab.provenance import RECORD, read_overrides

COLUMNS = ("eval/accuracy_start", "eval/accuracy_end", "gold/accuracy", "reward/mean", "kl", "length/mean")


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    """A run's metrics.jsonl rows ([] when it has none yet)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories of a multirun (each with its record, .hydra/overrides.yaml), in job-number order."""
    jobs = [p.parent.parent for p in sweep_dir.glob(f"*/{RECORD}/overrides.yaml")]
    return sorted(jobs, key=lambda p: (not p.name.isdigit(), int(p.name) if p.name.isdigit() else 0, p.name))


def varying_overrides(jobs: list[Path]) -> dict[Path, list[str]]:
    """Each job's overrides that differ between jobs (those shared by all say nothing about a row)."""
    overrides = {job: read_overrides(job) for job in jobs}
    shared = set.intersection(*(set(o) for o in overrides.values())) if len(jobs) > 1 else set()
    return {job: [o for o in items if o not in shared] for job, items in overrides.items()}


def job_row(job: Path, overrides: list[str]) -> dict[str, Any]:
    """One job: its overrides, state, iterations and final metrics (from metrics.jsonl, so a job still
    running or killed shows how far it got)."""
    rows = read_rows(job)
    final: dict[str, Any] = {}
    for row in rows:
        final.update(row)
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    state = "done" if (job / "summary.json").exists() else ("running or stopped" if rows else "not started")
    out: dict[str, Any] = {"job": job.name, "overrides": overrides, "state": state,
                           "iteration": final.get("iteration"), "world_size": final.get("world_size", 1),
                           "time/total_s": sum(r.get("time/iteration", r.get("time/eval", 0.0)) for r in rows)}
    if evals:
        out.update({"eval/accuracy_start": evals[0], "eval/accuracy_end": evals[-1]})
    out.update({k: final[k] for k in COLUMNS if k in final and k not in out})
    return out


def summarize(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per job of the multirun in `sweep_dir`."""
    jobs = job_dirs(sweep_dir)
    if not jobs:
        raise UserError(f"{sweep_dir} has no Hydra job directories (*/.hydra/overrides.yaml); "
                        f"pass the directory a `rewardlab train -m ...` sweep wrote")
    return [job_row(job, overrides) for job, overrides in varying_overrides(jobs).items()]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def to_markdown(rows: list[dict[str, Any]]) -> str:
    """The summary table as markdown, one row per job."""
    columns = ["job", "overrides", "state", "iteration", *(c for c in COLUMNS if any(c in r for r in rows)),
               "time/total_s"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [" ".join(row["overrides"]) if c == "overrides" else _cell(row.get(c)) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_sweep_summary(sweep_dir: str | Path) -> Path:
    """Write sweep_summary.md and sweep_summary.json into the multirun directory; returns the .md path."""
    sweep_dir = Path(sweep_dir)
    rows = summarize(sweep_dir)
    write_json_atomic(sweep_dir / "sweep_summary.json", rows)
    path = sweep_dir / "sweep_summary.md"
    write_text_atomic(path, f"# Sweep {sweep_dir}\n\n{len(rows)} jobs.\n\n{to_markdown(rows)}")
    return path


class SweepSummary(Callback):
    """Hydra callback: after every multirun, the sweep summary lands in the sweep directory."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            print(f"sweep summary: {write_sweep_summary(config.hydra.sweep.dir)}")
        except UserError as exc:  # a summary must never turn a finished sweep into a failed command
            print(f"sweep summary: not written ({exc})")
