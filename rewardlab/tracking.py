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
    project: Any = None  # None: $WANDB_PROJECT, else "rewardlab"
    entity: Any = None  # None: $WANDB_ENTITY, else W&B's default entity
    mode: str = "auto"  # auto ($WANDB_MODE, else online when W&B has credentials, else offline) | online | offline
    group: Any = None  # None: a sweep's directory for its jobs
    tags: Any = None


def wandb_credentials() -> bool:
    """Whether W&B has an API key by any of its own means: `wandb login` (netrc), WANDB_API_KEY, its
    settings file, an identity token file. The logic of `wandb.api.api_key` (deprecated in 0.31, it warns)."""
    from wandb.sdk import wandb_setup
    from wandb.sdk.lib import wbauth

    settings = wandb_setup.singleton().settings
    host = settings.base_url
    return bool(wbauth.session_credentials(host=host) or os.environ.get("WANDB_API_KEY")
                or wbauth.read_netrc_auth(host=host) or settings.api_key or settings.identity_token_file)


class NullLogger:
    def start(self, run_dir: Path, config: dict, name: str, group: str | None = None) -> None: ...
    def log(self, metrics: dict[str, float], step: int) -> None: ...
    def log_samples(self, batch: Batch, step: int, limit: int) -> None: ...
    def finish(self) -> None: ...


class WandbLogger(NullLogger):
    """W&B run in the run directory; its id is kept in `wandb_id` so a resumed run continues the same W&B
    run (`resume="allow"`). Offline, W&B writes each session to its own `wandb/offline-run-*-<id>*`
    directory (it never reuses one); `finish` names them all with the one command that uploads them as
    one run. Settings left unset defer to W&B's environment variables."""

    def __init__(self, project: str | None = None, entity: str | None = None, mode: str = "auto",
                 group: str | None = None, tags: list[str] | None = None) -> None:
        self.project, self.entity, self.mode, self.group, self.tags = project, entity, mode, group, tags
        self.run = None
        self.offline_dirs: list[Path] = []

    def resolved_mode(self) -> str:
        if self.mode != "auto":
            return self.mode
        return os.environ.get("WANDB_MODE") or ("online" if wandb_credentials() else "offline")

    def init_kwargs(self, run_dir: Path, config: dict, name: str, group: str | None) -> dict[str, Any]:
        """wandb.init's arguments; the run id comes from (or goes to) `<run dir>/wandb_id`."""
        id_file = run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        write_text_atomic(id_file, run_id)
        return dict(project=self.project or os.environ.get("WANDB_PROJECT") or "rewardlab", entity=self.entity,
                    group=self.group or group, tags=self.tags, dir=str(run_dir), config=config, name=name,
                    id=run_id, resume="allow")

    def start(self, run_dir: Path, config: dict, name: str, group: str | None = None) -> None:
        import wandb

        mode = self.resolved_mode()
        kwargs = self.init_kwargs(run_dir, config, name, group)
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
        if self.run is None:
            return
        offline, run_id = self.run.offline, self.run.id
        wandb_dir = Path(self.run.settings.wandb_dir)
        self.run.finish()
        if offline:
            self.offline_dirs = sorted(wandb_dir.glob(f"offline-run-*-{run_id}*"))
            paths = " ".join(str(p) for p in self.offline_dirs)
            console.print(f"W&B run {run_id} (offline, {len(self.offline_dirs)} session(s)): upload it as one run "
                          f"with `wandb sync --id {run_id} {paths}`", soft_wrap=True)


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
