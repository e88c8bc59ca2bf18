"""`rewardlab bench-rm`: benchmark any reward of the reward group (METHODS.md §5).

`bench=pairs` (RewardBench's pairwise accuracy, bench_pairs.py), `bench=process` (ProcessBench's
first-error F1, bench_process.py) and `bench=best_of_n` (the test-time over-optimization curve,
best_of_n.py). Each bench returns `{"bench": name, "metrics": {name: float}, "rows": [table rows]}`;
`run_bench` writes it to `<run dir>/bench.json`, the metrics to metrics.jsonl and the logger (W&B), and
prints the rows as a table on stdout. A bench that fails leaves no bench.json, and a run directory Hydra
created for it is removed (rewardlab.run.Launch, as `train` does).
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rewardlab.config import command_schema
from rewardlab.errors import UserError
from rewardlab.io import write_json_atomic, write_text_atomic


@dataclass
class BenchRunConfig:
    """`rewardlab bench-rm` settings (`run.*`)."""

    device: str = "auto"
    seed: int = 0  # seeds the policy's samples when a bench builds its data (bench.data=arith, best_of_n)
    threads: int = 0
    verbose: bool = False
    name: Optional[str] = None  # W&B run name; defaults to the run directory's name


@dataclass
class BenchRMConfig:
    run: BenchRunConfig = field(default_factory=BenchRunConfig)
    policy: Any = None
    dataset: Any = None
    reward: Any = None
    generation: Any = None
    logger: Any = None
    bench: Any = None


command_schema("_bench_rm_schema", BenchRMConfig)


def run_bench(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Run `cfg.bench` on `cfg.reward`; write bench.json, metrics.jsonl and config.yaml under `run_dir`,
    print the table on stdout and return the bench's result. What libraries print goes to stderr."""
    from rewardlab.run import Launch, setup_torch
    from rewardlab.tracking import quiet_libraries

    launch = Launch()
    launch.accept(run_dir, main=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            quiet_libraries(cfg.run.verbose)
            setup_torch(cfg.run)
            began = time.perf_counter()
            result = _dispatch(cfg, run_dir)
            result["metrics"]["time/bench"] = time.perf_counter() - began
            launch.started = True
            _record(cfg, run_dir, result)
    except BaseException:
        launch.failed()
        raise
    print_rows(result["rows"], f"bench={result['bench']} reward={cfg.reward.get('name', '?')}")
    return result


def _dispatch(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    name = cfg.bench.name
    if name == "pairs":
        from rewardlab.rmlab.bench_pairs import run
    elif name == "process":
        from rewardlab.rmlab.bench_process import run
    elif name == "best_of_n":
        from rewardlab.rmlab.best_of_n import run
    else:
        raise UserError(f"bench.name={name!r} is not one of pairs, process, best_of_n")
    return run(cfg, run_dir)


def _record(cfg: DictConfig, run_dir: Path, result: dict[str, Any]) -> None:
    """config.yaml, bench.json and one metrics.jsonl row in the run directory; the metrics to the logger."""
    from rewardlab.tracking import MetricsFile

    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    write_json_atomic(run_dir / "bench.json", result)
    MetricsFile(run_dir / "metrics.jsonl").append({"iteration": 0, **result["metrics"]})
    logger = instantiate(cfg.logger)
    logger.start(run_dir, OmegaConf.to_container(cfg, resolve=True), cfg.run.name or run_dir.name)
    try:
        logger.log(result["metrics"], step=0)
    finally:
        logger.finish()


def print_rows(rows: list[dict[str, Any]], title: str) -> None:
    """The bench's rows as a rich table on stdout (columns in first-seen order, floats to 4 places)."""
    from rich.console import Console
    from rich.table import Table

    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(_cell(row.get(column)) for column in columns))
    Console(soft_wrap=True).print(table)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def data_file(value: str, fields: str) -> Path:
    """`bench.data` as an existing file; `fields` names the format it should have (for the error line)."""
    path = Path(value)
    if not path.is_file():
        raise UserError(f"bench.data={value}: no such file; give a JSONL file with {fields}, or bench.data=arith")
    return path


def sample_arith(cfg: DictConfig, policy) -> tuple[Any, list[float | None]]:
    """The policy's `bench.samples_per_prompt` completions of the first `bench.prompts` problems of the
    data set's TEST split (held out from anything trained on the train split) and their gold correctness;
    with `bench.split=train` (bench=process) the LAST `bench.prompts` problems of the train split instead."""
    from rewardlab.answers import check
    from rewardlab.data.arith import ArithTask

    task = instantiate(cfg.dataset)
    if not isinstance(task, ArithTask):
        raise UserError(f"bench.data=arith samples the arith task; use dataset=arith (got {cfg.dataset._target_})")
    task.prepare(policy.tokenizer)
    split = cfg.bench.get("split", "test")
    if split not in ("test", "train"):
        raise UserError(f"bench.split={split!r} is not one of test, train")
    if split == "test":
        examples = list(task.test_examples())[: cfg.bench.prompts]
    else:  # the train split's last problems: `rewardlab label` takes its first ones
        examples = list(task.train_examples())[-cfg.bench.prompts :] if cfg.bench.prompts > 0 else []
    if not examples:
        raise UserError(f"bench.prompts must be at least 1 (and the {split} split non-empty)")
    generator = instantiate(cfg.generation, policy=policy)
    batch = generator.generate(examples, n=cfg.bench.samples_per_prompt)
    return batch, check(batch.completion, batch.reference, task.answer_format)
