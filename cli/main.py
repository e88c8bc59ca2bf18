"""`rewardlab`: train, eval, score, configs. Every Hydra command-line feature passes through to Hydra."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

import typer

from rewardlab.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode="markdown",
                  help="Reward-driven LLM post-training: generate, score, filter and fine-tune in iterations.")

HYDRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
HYDRA_MODES = {"-m": "multirun", "--multirun": "multirun", "-c": "cfg", "--cfg": "cfg", "-i": "info",
               "--info": "info", "-r": "run", "--run": "run", "-sc": "completion", "--shell-completion": "completion"}


def fail(message: str, code: int = 2) -> None:
    typer.echo(f"error: {message}", err=True)
    raise SystemExit(code)


def _user_error_in(exc: BaseException) -> BaseException | None:
    """The user mistake behind an exception (instantiate wraps what components raise), if any."""
    seen = exc
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__
    return None


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """User mistakes end the command with one line on stderr and exit code 2, no traceback."""
    try:
        yield
    except Exception as exc:
        found = _user_error_in(exc)
        if found is None:
            raise
        fail(str(found))


def _hydra(config_name: str, args: list[str], task: Callable,
           prepare: Callable[[list[str]], list[str]] | None = None) -> None:
    """Validate the overrides, then run `task` under Hydra with the full Hydra command line (`prepare`d
    after validation: what it adds needs torch, which a mistyped override should not wait for)."""
    import hydra

    from rewardlab.cli.overrides import validate
    from rewardlab.config import register_cached_schemas, register_schemas

    modes = [flag for flag in args if flag in HYDRA_MODES]
    if len({HYDRA_MODES[flag] for flag in modes}) > 1:
        fail(f"{' and '.join(modes)} cannot be combined: Hydra does one of run, multirun, --cfg, --info at a time "
             f"(--cfg job shows one job's config: drop -m)")
    if not register_cached_schemas():  # checking the overrides needs no torch when the schema cache is fresh
        register_schemas()
    with user_errors():
        validate(config_name, args)
    register_schemas()  # the real classes for the run (a no-op if registered above)
    if prepare is not None:
        args = prepare(args)
    sys.argv = [f"rewardlab {config_name}", *args]
    hydra.main(config_path="pkg://rewardlab.conf", config_name=config_name, version_base="1.3")(task)()


def _train_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rewardlab.preemption import Preempted
    from rewardlab.run import train as run_train

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors():
            run_train(cfg, run_dir)
    except Preempted as exc:
        if (run_dir / "config.yaml").exists():
            typer.echo(f"stopped: {exc}; the last checkpoint is intact, resume with the same command or "
                       f"`rewardlab train resume={run_dir}`", err=True)
        else:
            typer.echo(f"stopped: {exc} before the run started; nothing to resume", err=True)
        raise SystemExit(exc.exit_code) from None
    if os.environ.get("RANK", "0") == "0":  # once under torchrun / accelerate launch
        typer.echo(f"run dir: {run_dir}")


def _eval_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rewardlab.run import evaluate_only

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors():
        metrics = evaluate_only(cfg, run_dir)
    for key, value in metrics.items():
        typer.echo(f"{key}: {value:.4f}")
    typer.echo(f"run dir: {run_dir}")


@app.command(context_settings=HYDRA_ARGS)
def train(ctx: typer.Context) -> None:
    """Train a policy: `rewardlab train [OVERRIDES...]`.

    Overrides are Hydra's: pick a choice per group (`algo=rft reward=verifiable`), set keys
    (`run.iterations=10 algo.lr=1e-4`), sweep with `-m` / `--multirun algo=grpo,rft`, print the composed config with
    `--cfg job`, choose directories with `hydra.run.dir=...` / `hydra.sweep.dir=...`, and a launcher with
    `hydra/launcher=submitit_local`. `rewardlab configs` lists the choices. The last line printed is
    `run dir: <path>`: metrics.jsonl, summary.json, config.yaml, rollouts/ and checkpoints/ are there.
    `rewardlab train resume=<run dir>` continues a run (`run.iterations=N` extends it); on SIGTERM it finishes
    and checkpoints the iteration in progress and exits with code 75, on SIGINT (Ctrl-C) with 130, both
    resumable. `run.checkpoint_every=N` / `run.checkpoint_minutes=M` space the checkpoints out (large models).
    A finished run's model is in `<run dir>/final/`.
    """
    from rewardlab.resume import resume_args

    with user_errors():
        args = resume_args(list(ctx.args))

    def one_run_dir(args: list[str]) -> list[str]:  # imports torch: after the overrides are checked
        from rewardlab.distributed import run_dir_overrides

        return run_dir_overrides(args)

    _hydra("train", args, _train_task, prepare=one_run_dir)


@app.command("eval", context_settings=HYDRA_ARGS)
def evaluate(ctx: typer.Context) -> None:
    """Evaluate a policy on a data set's test split: `rewardlab eval [OVERRIDES...]`.

    Greedy accuracy always; pass@k and maj@k with `run.eval_pass_k=[1,4]`. Examples:
    `rewardlab eval` (the tiny policy on arith), `rewardlab eval policy.path=runs/.../policy run.eval_size=200`.
    Test-time search picks by a reward: `rewardlab eval search=best_of_n search.n=16 reward=prm` (or
    `search=weighted_majority`, `search=beam search.beam_width=4`); eval/accuracy is then the search's.
    """
    _hydra("eval", list(ctx.args), _eval_task)


def _bench_rm_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rewardlab.rmlab.bench import run_bench

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors():
        run_bench(cfg, run_dir)
    typer.echo(f"run dir: {run_dir}")


@app.command("bench-rm", context_settings=HYDRA_ARGS)
def bench_rm(ctx: typer.Context) -> None:
    """Benchmark a reward: `rewardlab bench-rm [OVERRIDES...]` with `bench=pairs|process|best_of_n`.

    `bench=pairs bench.data=FILE`: RewardBench-format JSONL (prompt, chosen, rejected[, subset]), accuracy
    overall and per subset. `bench=process bench.data=FILE`: ProcessBench-format JSONL (problem, steps,
    label), first-error accuracy on erroneous and correct rows and their F1. `bench.data=arith` (the default)
    builds either file from the policy's own arith test samples. Any reward: `reward=prm reward.model=<dir>`,
    `reward=arith_steps`, `reward=orm ...`. Writes bench.json and prints a table; `run dir: <path>` last.
    """
    _hydra("bench_rm", list(ctx.args), _bench_rm_task)


@app.command(context_settings=HYDRA_ARGS)
def score(ctx: typer.Context, input: Path = typer.Argument(..., help="JSONL file, parquet rollouts or run directory"),
          output: Path = typer.Option(..., "--output", "-o", help="JSONL file to write")) -> None:
    """Score completions with any reward: `rewardlab score INPUT reward=... --output OUT`.

    INPUT is a JSONL file of `{prompt, completion[, reference]}` rows (other fields pass through), a
    parquet rollout file, or a run directory (its rollouts/iter_*.parquet). Each output row has the
    input's fields, `reward`, and `rewards/<name>` per component. Example:
    `rewardlab score runs/.../ reward=prm reward.aggregate=last --output prm.jsonl`.
    """
    from rewardlab.cli.overrides import validate
    from rewardlab.config import register_cached_schemas, register_schemas

    if not register_cached_schemas():
        register_schemas()
    with user_errors():
        validate("score", list(ctx.args))
    register_schemas()
    from rewardlab.scoring import score_file

    with user_errors():
        count = score_file(input, output, list(ctx.args))
    typer.echo(f"scored {count} rows: {output}")


@app.command()
def report(path: Path = typer.Argument(..., help="a run dir, or a multirun dir (its jobs overlaid)"),
           out: Path = typer.Option(None, help="where the PNGs and report.md go (default: <path>/report)"),
           seeds: str = typer.Option("mean", help="a multirun's seeds of one setting: mean (one curve, the seeds' "
                                                  "range as a band, mean ± sd in the table) or each (a curve each)")
           ) -> None:
    """Plot a run's metrics (reward per component, gold vs proxy, eval accuracy, KL, length, time per
    stage) as PNGs with a short report.md: `rewardlab report runs/2026-11-25/10-00-00`."""
    from rewardlab.report import write_report

    with user_errors():
        typer.echo(f"report: {write_report(path, out, seeds)}")


@app.command("sweep-summary")
def sweep_summary(path: Path = typer.Argument(..., help="the multirun dir of a `rewardlab train -m` sweep")) -> None:
    """Tabulate every job of a sweep (overrides that vary, final metrics) into sweep_summary.md/.json
    and print it; works mid-sweep too. Written automatically when a sweep ends."""
    from rewardlab.sweep import write_sweep_summary

    with user_errors():
        typer.echo(write_sweep_summary(path).read_text())


@app.command()
def export(run_dir: Path = typer.Argument(..., help="a run directory (its final/ or latest checkpoint)"),
           out: Path = typer.Option(..., "--out", help="the directory to write the model to"),
           merge_lora: bool = typer.Option(False, "--merge-lora", help="merge a LoRA run's adapters into its base")
           ) -> None:
    """Write a run's model as a plain `from_pretrained` directory (weights and tokenizer):
    `rewardlab export runs/2026-11-25/10-00-00 --out my-model [--merge-lora]`."""
    from rewardlab.export import export_model

    with user_errors():
        typer.echo(f"exported: {export_model(run_dir, out, merge_lora)}")


@app.command()
def configs() -> None:
    """List every config group with its choices and a one-line description of each."""
    from rewardlab.cli.listing import config_table

    config_table()


def _label_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rewardlab.rmlab.label import label as run_label

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        with user_errors():
            summary = run_label(cfg, run_dir)
    except KeyboardInterrupt:  # every finished prompt's rows are on disk
        typer.echo(f"stopped; continue with the same command and hydra.run.dir={run_dir}", err=True)
        raise SystemExit(130) from None
    for key, value in summary.items():
        typer.echo(f"{key}: {value:.4f}" if isinstance(value, float) and not value.is_integer() else f"{key}: {value:g}")
    typer.echo(f"run dir: {run_dir}")


@app.command(context_settings=HYDRA_ARGS)
def label(ctx: typer.Context) -> None:
    """Monte-Carlo step labels from the policy's own samples: `rewardlab label [OVERRIDES...]`.

    `label.prompts`, `label.samples_per_prompt`, `label.rollouts` continuations per step prefix, and
    `label.method=mc|binary_search` (OmegaPRM: fewer rollouts). Writes `<run dir>/labels.jsonl` in TRL's
    stepwise format (`prompt`, `completions`, `labels`) plus `soft_labels` and `reference`, row by row;
    rerun with `hydra.run.dir=<run dir>` to continue an interrupted run. On arith it reports the labels'
    agreement with the exact step checker (summary.json).
    """
    _hydra("label", list(ctx.args), _label_task)


def _train_rm_task(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig

    from rewardlab.rmlab.train import train_rm as run_train_rm

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    with user_errors():
        model_dir = run_train_rm(cfg, run_dir)
    typer.echo(f"model: {model_dir}")
    typer.echo(f"run dir: {run_dir}")


@app.command("train-rm", context_settings=HYDRA_ARGS)
def train_rm(ctx: typer.Context) -> None:
    """Train a reward model from a policy's backbone: `rewardlab train-rm rm=prm|orm rm.data=... [OVERRIDES...]`.

    `rm=prm` (default): stepwise labels (`prompt`, `completions`, `labels`; a `rewardlab label` run dir works)
    as token classification at each step separator. `rm=orm`: preference pairs (`prompt`, `chosen`, `rejected`)
    or a `rewardlab train` run dir (correct vs incorrect completions by gold) through TRL's RewardTrainer.
    Held-out accuracy per epoch goes to metrics.jsonl; the model to `<run dir>/model/`, which
    `reward=prm reward.model=<dir>` / `reward=orm reward.model=<dir>` loads as is.
    """
    _hydra("train_rm", list(ctx.args), _train_rm_task)


def main() -> None:
    """The `rewardlab` command and `python -m rewardlab`: the app, then a quick exit (quick_exit.py)."""
    from rewardlab.cli.quick_exit import exit_now

    try:
        app(prog_name="rewardlab")
    except SystemExit as stop:  # how the app always ends; an exception that escapes it keeps its traceback
        exit_now(stop.code)


if __name__ == "__main__":
    main()
