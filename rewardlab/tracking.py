"""Where metrics go: metrics.jsonl in the run directory (always), W&B (unless logger=none), and a
rich progress display on the console.

The console is written for logs as much as for terminals (SLURM's slurm-<id>.out, `| tee`): one line per
iteration, never wrapped, no progress bar unless stderr is a terminal, and no library progress bars,
info logs or deprecation warnings unless `run.verbose=true` (`quiet_libraries`)."""

from __future__ import annotations

import json
import os
import uuid
import sys
import warnings
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rewardlab.config import schema
from rewardlab.io import write_json_atomic, write_text_atomic
from rewardlab.rollout import Batch

console = Console(stderr=True, soft_wrap=True)  # soft wrap: a long line stays one line in a log file


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def quiet_libraries(verbose: bool) -> None:
    """Keep a run's log to its own lines: no transformers / datasets / hub progress bars (`Loading weights`,
    dataset map bars), library info logs, Future- or DeprecationWarnings; our warnings print as one line
    `warning: ...`. `verbose` (run.verbose=true) leaves every library as it is."""
    if verbose:
        return
    import huggingface_hub.utils
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].utils.logging.set_verbosity_error()
    else:  # read when TRL's trainers import it; importing datasets here would slow every run by ~1 s
        os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
        os.environ.setdefault("DATASETS_VERBOSITY", "error")
    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    warnings.formatwarning = _one_line_warning


class MetricsFile:
    """metrics.jsonl: one JSON object per iteration, rewritten atomically so it is never half-written.

    On resume, rows at or after the resumed iteration are dropped so none is duplicated.
    """

    def __init__(self, path: Path, resume_from: int | None = None) -> None:
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if path.exists():
            self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if resume_from is not None:
                self.rows = [r for r in self.rows if r["iteration"] < resume_from]

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        write_text_atomic(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.rows))


@schema("logger", "none")
class NoLoggerConfig:
    _target_: str = "rewardlab.tracking.NullLogger"


@schema("logger", "wandb")
class WandbConfig:
    _target_: str = "rewardlab.tracking.WandbLogger"
    project: str = "rewardlab"
    entity: Any = None
    mode: str = "auto"  # auto (online with WANDB_API_KEY, else offline) | online | offline
    group: Any = None
    tags: Any = None


class NullLogger:
    def start(self, run_dir: Path, config: dict, name: str) -> None: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, batch: Batch, step: int, limit: int) -> None: ...
    def finish(self) -> None: ...


class WandbLogger(NullLogger):
    """W&B run in the run directory; its id is kept in `wandb_id` so a resumed run continues it."""

    def __init__(self, project: str = "rewardlab", entity: str | None = None, mode: str = "auto",
                 group: str | None = None, tags: list[str] | None = None) -> None:
        self.project, self.entity, self.mode, self.group, self.tags = project, entity, mode, group, tags
        self.run = None

    def start(self, run_dir: Path, config: dict, name: str) -> None:
        import wandb

        mode = self.mode if self.mode != "auto" else ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        write_text_atomic(id_file, run_id)
        kwargs = dict(project=self.project, entity=self.entity, group=self.group, tags=self.tags,
                      dir=str(run_dir), config=config, name=name, id=run_id, resume="allow")
        try:
            self.run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # W&B unreachable or refusing: never lose the run over logging
            if mode != "online":
                raise
            warnings.warn(f"W&B online init failed ({exc.__class__.__name__}: {exc}); logging offline to "
                          f"{run_dir}/wandb, upload later with `wandb sync`")
            wandb.teardown()  # the failed online attempt keeps the run id "in use" until its service stops
            self.run = wandb.init(mode="offline", **kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def log_samples(self, batch: Batch, step: int, limit: int) -> None:
        import wandb

        columns = ["prompt", "completion", "reward", "gold"]
        rows = [[batch.prompt[i], batch.completion[i], batch.reward[i] if batch.reward else None,
                 batch.gold[i] if batch.gold else None] for i in range(min(limit, len(batch)))]
        self.run.log({"samples": wandb.Table(columns=columns, data=rows)}, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()


class ProgressDisplay:
    """A rich progress bar over iterations plus one summary line per iteration."""

    KEYS = ("reward/mean", "gold/accuracy", "eval/accuracy", "loss", "kl", "length/mean")

    def __init__(self, total: int, start: int) -> None:
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, disable=not sys.stderr.isatty())
        self.task = self.progress.add_task("iteration", total=total + 1, completed=start)  # + iteration 0, the eval

    def __enter__(self) -> "ProgressDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def stage(self, iteration: int, name: str) -> None:
        self.progress.update(self.task, description=f"iter {iteration}: {name}")

    def done(self, row: dict[str, Any]) -> None:
        parts = [f"{k}={row[k]:.3f}" for k in self.KEYS if isinstance(row.get(k), (int, float))]
        if row.get("update/skipped"):
            parts.append("update skipped")
        self.progress.console.print(f"iter {row['iteration']:>3}  " + "  ".join(parts), markup=False, highlight=False)
        self.progress.advance(self.task)


def write_summary(run_dir: Path, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    """summary.json: the last value of every metric, the first and last eval accuracy, and `extra`."""
    last: dict[str, Any] = {}
    for row in rows:
        last.update(row)
    evals = [r["eval/accuracy"] for r in rows if "eval/accuracy" in r]
    summary = {"final": last, "iterations_completed": len(rows), **extra}
    if evals:
        summary.update({"eval/accuracy_start": evals[0], "eval/accuracy_end": evals[-1]})
    write_json_atomic(run_dir / "summary.json", summary)
