"""Builds the components from the config and owns the iteration loop:
generate -> score (+ gold) -> filter -> update -> evaluate / log.

Iteration 0 evaluates the starting policy; iterations 1..run.iterations each sample
`run.prompts_per_iteration` prompts, `algo.samples_per_prompt` completions per prompt, and update once.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rewardlab import distributed, provenance, sharding
from rewardlab.algos import SKIP_REASON, SKIPPED, AlgoContext, skipped
from rewardlab.checkpoint import Cadence, Checkpointer, drop_rollouts_after
from rewardlab.data.base import PromptSampler
from rewardlab.diagnostics import hacking_metrics
from rewardlab.errors import UserError
from rewardlab.evaluation import eval_seed, evaluate
from rewardlab.io import write_json_atomic, write_text_atomic
from rewardlab.preemption import PreemptionGuard
from rewardlab.resume import resume_target
from rewardlab.answers import check
from rewardlab.rollout import Batch
from rewardlab.sampling import collect
from rewardlab.search import configured
from rewardlab.steps import process_metrics
from rewardlab.tracking import MetricsFile, NullLogger, ProgressDisplay, console, quiet_libraries, write_summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup_torch(run_cfg, rank: int = 0) -> None:
    if run_cfg.threads > 0:
        torch.set_num_threads(run_cfg.threads)
    seed_everything(run_cfg.seed + rank)  # ranks sample different completions; prompts use their own seed


def batch_metrics(batch: Batch) -> dict[str, float]:
    """Reward per component, gold accuracy and lengths of the scored batch (before filtering)."""
    rewards = torch.tensor(batch.reward, dtype=torch.float64)
    lengths = torch.tensor([len(c) for c in batch.completion_ids], dtype=torch.float64)
    finite = rewards[rewards.isfinite()]
    out = {"reward/mean": float(finite.mean()) if len(finite) else float("nan"),
           "reward/std": float(finite.std()) if len(finite) > 1 else 0.0,
           "reward/nonfinite": float(len(rewards) - len(finite)),
           "length/mean": float(lengths.mean()), "length/max": float(lengths.max()),
           "length/truncated": sum(f == "length" for f in batch.finish_reason) / len(batch),
           "rollouts": float(len(batch))}
    for name, values in batch.rewards.items():
        out[f"reward/{name}/mean"] = float(torch.tensor(values, dtype=torch.float64).nanmean())
    if batch.gold is not None:
        golds = [g for g in batch.gold if g is not None]
        if golds:
            out["gold/accuracy"] = sum(golds) / len(golds)
    groups = list(batch.groups().values())
    out["groups/zero_variance"] = sum(len({batch.reward[i] for i in g}) == 1 for g in groups) / len(groups)
    # rollouts that repeat an earlier sample of their prompt token for token (the update runs each once)
    out["groups/repeated"] = sum(len(g) - len({tuple(batch.completion_ids[i]) for i in g}) for g in groups) / len(batch)
    return out


def mark_kept(batch: Batch, kept: Batch) -> None:
    """Record in the full batch which rows the update used, and their advantages, for inspection."""
    flags = [False] * len(batch)
    advantages: list = [None] * len(batch)
    for position, row in enumerate(kept.extra["row"]):
        flags[row] = True
        if kept.advantages is not None:
            advantages[row] = kept.advantages[position]
    batch.extra["kept"] = flags
    batch.advantages = advantages


class Launch:
    """What a failed run leaves: nothing new if it was refused; no directory if it failed while being set
    up in a directory it created; otherwise a `run dir:` line naming the partial output."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None
        self.fresh = self.started = False
        self.main = True

    def accept(self, run_dir: Path, main: bool) -> None:
        self.run_dir, self.main = run_dir, main
        self.fresh = not run_dir.exists() or not any(run_dir.iterdir())  # Hydra just created it

    def failed(self) -> None:
        if self.run_dir is None or not self.main:
            return
        if self.fresh and not self.started:
            shutil.rmtree(self.run_dir, ignore_errors=True)
        else:
            console.print(f"run dir: {self.run_dir}")


def warn_repeated_prompts(per_iteration: int, available: int, samples: int) -> None:
    """Warn once when an iteration draws more prompts than the train split has: the repeats share a
    prompt id, so their samples merge into one larger group rather than forming separate groups."""
    if per_iteration > available:
        warnings.warn(f"run.prompts_per_iteration={per_iteration} is more than the {available} train prompts: "
                      f"each is drawn about {per_iteration / available:.1f} times per iteration and its samples "
                      f"form one group of up to {-(-per_iteration // available) * samples} completions; lower "
                      f"run.prompts_per_iteration or add train prompts")


def train(cfg: DictConfig, run_dir: Path) -> Path:
    """Run the whole training loop described by `cfg`, writing everything under `run_dir`; continue the
    run there from its latest checkpoint if it has one, or extend it to a larger `run.iterations`
    (checkpoint.py); SIGTERM and SIGINT raise `Preempted`. What libraries print goes to stderr, the log:
    stdout is left to the results (`run dir: ...`)."""
    launch = Launch()
    with PreemptionGuard() as guard, contextlib.redirect_stdout(sys.stderr):
        try:
            return _train(cfg, run_dir, guard, launch)
        except BaseException:
            launch.failed()
            raise


def _train(cfg: DictConfig, run_dir: Path, guard: PreemptionGuard, launch: Launch) -> Path:
    quiet_libraries(cfg.run.verbose)
    launched = cfg
    cfg, run_dir = resume_target(cfg, run_dir)
    dist = distributed.setup()
    launch.accept(run_dir, dist.is_main)
    distributed.check_sizes(dist, cfg.run.prompts_per_iteration, cfg.run.eval_size)
    cadence = Cadence(cfg.run.checkpoint_every, cfg.run.checkpoint_minutes, cfg.run.iterations)
    if cfg.run.eval_every < 0:
        raise UserError(f"run.eval_every={cfg.run.eval_every}: give 0 (evaluate at the start and the end only) "
                        f"or a number of iterations")
    sharded = sharding.from_launch() if dist.active else None  # an `accelerate launch` FSDP / DeepSpeed config
    console.quiet = not dist.is_main  # progress lines once, from rank 0
    setup_torch(cfg.run, dist.rank)
    run_dir.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        provenance.record(run_dir, launched, cfg.run.iterations)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))

    task = instantiate(cfg.dataset)
    reward = instantiate(cfg.reward)
    # the algorithm checks its settings (against the reward too) before the policy loads, which takes seconds
    context = AlgoContext(temperature=cfg.generation.sampling.temperature,
                          max_new_tokens=cfg.generation.sampling.max_new_tokens,
                          total_iterations=cfg.run.iterations, seed=cfg.run.seed, reward=reward)
    algo = instantiate(cfg.algo, context=context)
    filters = [instantiate(f) for f in cfg.filters.values() if f is not None]
    distributed.check_algorithm(dist, algo)
    policy = instantiate(cfg.policy, device=distributed.device_for(dist, cfg.run.device), log=console.print)
    distributed.broadcast_parameters(dist, policy.model)  # LoRA adapters start the same on every rank
    task.prepare(policy.tokenizer)
    generator = instantiate(cfg.generation, policy=policy)
    decoding = generator.describe() if hasattr(generator, "describe") else type(generator).__name__  # summary.json
    reward.bind(policy)
    logger = instantiate(cfg.logger) if dist.is_main else NullLogger()

    sampler = PromptSampler(task.train_examples(), seed=cfg.run.seed)
    if hasattr(algo, "check_data"):  # an algorithm that needs something of the data (algo=prime: answers)
        algo.check_data(sampler.examples)
    warn_repeated_prompts(cfg.run.prompts_per_iteration, len(sampler.examples), algo.samples_per_prompt)
    test_set = list(task.test_examples())[: cfg.run.eval_size]
    if not test_set:
        raise UserError("the data set's test split is empty; evaluation needs at least one example")
    test_set = distributed.shard(test_set, dist.rank, dist.world_size)
    checkpoints = Checkpointer(run_dir, cfg.run.keep_checkpoints, dist)
    completed = checkpoints.restore(policy, algo, sampler)
    if sharded is not None:  # after the restore: checkpoints hold whole weights
        sharding.check_generator(generator)
        policy.shard(sharded)
        algo.setup(policy)  # the optimizer over the shards now (DeepSpeed builds its engine), restored state in
        console.print(f"sharded training over {dist.world_size} processes ({sharded.name})")
    start = 0 if completed is None else completed + 1
    if completed is not None:
        console.print(f"resuming {run_dir} after iteration {completed} of {cfg.run.iterations}")
        if dist.is_main:
            drop_rollouts_after(run_dir, completed)
    metrics = MetricsFile(run_dir / "metrics.jsonl", resume_from=start)
    identity = provenance.sweep_identity(run_dir)  # a sweep's job: named by its overrides, grouped by sweep
    logger.start(run_dir, OmegaConf.to_container(cfg, resolve=True),
                 cfg.run.name or identity.get("name", run_dir.name), group=identity.get("group"))
    launch.started = True

    def rollouts(prompts: list, iteration: int, row: dict[str, Any]) -> Batch:
        """Generate and score completions for `prompts` (gold too, when references exist); time both."""
        mark = time.perf_counter()
        batch = generator.generate(prompts, n=algo.samples_per_prompt)
        batch.iteration = iteration
        row["time/generate"] = row.get("time/generate", 0.0) + time.perf_counter() - mark
        progress.stage(iteration, "score")
        mark = time.perf_counter()
        reward.score(batch)
        if batch.has_references():
            batch.gold = check(batch.completion, batch.reference, task.answer_format)
        row["time/score"] = row.get("time/score", 0.0) + time.perf_counter() - mark
        return batch

    def checkpoint(iteration: int) -> None:
        """Save when the cadence says so or a signal asked to stop (every rank agrees), then stop if one did."""
        if distributed.any_rank(cadence.due(iteration) or guard.pending):
            with guard.deferred():
                checkpoints.save(iteration, policy, algo, sampler)
            cadence.saved()

    def run_eval(iteration: int) -> dict[str, float]:
        began = time.perf_counter()
        with policy.full_weights():
            out = evaluate(generator, test_set, task.answer_format, list(cfg.run.eval_pass_k), cfg.run.eval_samples,
                           seed=eval_seed(cfg.run.seed + dist.rank, iteration))
        out["time/eval"] = time.perf_counter() - began
        return distributed.reduce_metrics(dist, out, weight=len(test_set))

    try:
        with ProgressDisplay(cfg.run.iterations, start) as progress, guard.finishing():
            if start == 0:
                progress.stage(0, "eval")
                row = {"iteration": 0, "world_size": dist.world_size, **run_eval(0)}
                if dist.is_main:
                    metrics.append(row)
                logger.log(row, step=0)
                progress.done(row)
                checkpoint(0)
            for iteration in range(max(start, 1), cfg.run.iterations + 1):
                began = time.perf_counter()
                row: dict[str, Any] = {"iteration": iteration, "world_size": dist.world_size}

                progress.stage(iteration, "generate")
                prompts = distributed.shard(sampler.sample(cfg.run.prompts_per_iteration), dist.rank, dist.world_size)
                with policy.full_weights():  # FSDP / ZeRO-3: whole weights on every rank while it samples and scores
                    batch = rollouts(prompts, iteration, row)
                    batch, kept, filter_metrics = collect(
                        batch, filters, lambda n: rollouts(sampler.sample(n), iteration, row), len(prompts))
                row.update(batch_metrics(batch))
                row.update(reward.metrics(batch))
                row.update(hacking_metrics(batch, task))
                row.update(process_metrics(batch))
                row.update(filter_metrics)

                progress.stage(iteration, "update")
                mark = time.perf_counter()
                if not distributed.should_update(dist, algo, len(kept)):
                    update = skipped("no rollouts left after filtering")
                else:
                    update = algo.update(policy, kept)
                    if "loss" not in update and SKIPPED not in update:  # no loss: it trained on nothing
                        update = skipped(f"{type(algo).__name__} reported no loss", **update)
                    if SKIPPED not in update:
                        generator.sync(policy)
                row.update(update)
                if SKIPPED in update:
                    warnings.warn(f"iteration {iteration}: {update[SKIP_REASON]}; update skipped")
                mark_kept(batch, kept)
                row["time/update"] = time.perf_counter() - mark

                if cfg.run.save_rollouts and (shards := distributed.gather_to_main(dist, batch)):
                    Batch.concat(shards).save(run_dir / "rollouts" / f"iter_{iteration:04d}.parquet")
                if (cfg.run.eval_every and iteration % cfg.run.eval_every == 0) or iteration == cfg.run.iterations:
                    progress.stage(iteration, "eval")
                    row.update(run_eval(iteration))
                row["time/iteration"] = time.perf_counter() - began
                row = distributed.reduce_metrics(dist, row)
                if dist.is_main:
                    metrics.append(row)
                logger.log(row, step=iteration)
                logger.log_samples(batch, iteration, cfg.run.log_samples)
                progress.done(row)
                checkpoint(iteration)
            with guard.deferred():
                checkpoints.write_final(policy)
    finally:
        extra = {"run_dir": str(run_dir), "world_size": dist.world_size,
                 "sharding": sharded.name if sharded is not None else "none", "decoding": decoding}
        if dist.active:
            with policy.full_weights():  # ZeRO-3 / FSDP: every rank sees the whole weights
                extra["rank_param_sha256"] = distributed.gather_to_main(dist, distributed.param_digest(policy.model))
            for name, model in getattr(algo, "trained_models", dict)().items():  # critic, PRIME's PRM
                extra[f"rank_{name}_param_sha256"] = distributed.gather_to_main(dist, distributed.param_digest(model))
            extra["rank_local_params"] = distributed.gather_to_main(dist, sharding.local_parameters(policy.model))
        if dist.is_main:
            write_summary(run_dir, metrics.rows, extra)
        logger.finish()
    return run_dir


def evaluation_dataset(dataset: DictConfig) -> DictConfig:
    """The data set for `rewardlab eval`: a lone `dataset.path` is the file to evaluate, every row of it
    (training holds `test_size` rows out of it instead). Few-shot examples need a separate train file."""
    if dataset.get("path") is None or dataset.get("test_path") is not None:
        return dataset
    if dataset.get("prompt", {}).get("few_shot", 0):
        raise UserError("dataset.prompt.few_shot takes examples from a train split: give dataset.path=<train file> "
                        "dataset.test_path=<file to evaluate>, or dataset.prompt.few_shot=0")
    dataset = dataset.copy()
    dataset.test_path, dataset.path = dataset.path, None
    return dataset


def evaluate_only(cfg: DictConfig, run_dir: Path) -> dict[str, float]:
    """`rewardlab eval`: the policy's accuracy on the data set's test split, written to eval.json (with the
    composed config.yaml). Only the test data is read (data/source.py reads a train split on first use). An
    eval that fails leaves no directory it created (Launch, as `train` does)."""
    launch = Launch()
    launch.accept(run_dir, main=True)
    try:
        out, record = _evaluate(cfg)
        launch.started = True
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        write_json_atomic(run_dir / "eval.json", record)
    except BaseException:
        launch.failed()
        raise
    return out


def _evaluate(cfg: DictConfig) -> tuple[dict[str, float], dict[str, Any]]:
    quiet_libraries(cfg.run.verbose)
    setup_torch(cfg.run)
    search = configured(cfg.get("search"), cfg.get("reward") is not None)
    task = instantiate(evaluation_dataset(cfg.dataset))
    policy = instantiate(cfg.policy, device=cfg.run.device, log=console.print)
    task.prepare(policy.tokenizer)
    generator = instantiate(cfg.generation, policy=policy)
    reward = None
    if search is not None:
        reward = instantiate(cfg.reward)
        reward.bind(policy)
    test_set = list(task.test_examples())[: cfg.run.eval_size]
    if not test_set:
        raise UserError("the data set's test split is empty; nothing to evaluate")
    began = time.perf_counter()
    out = evaluate(generator, test_set, task.answer_format, list(cfg.run.eval_pass_k), cfg.run.eval_samples,
                   seed=eval_seed(cfg.run.seed, 0), search=search, reward=reward)
    out.update({"eval/size": float(len(test_set)), "time/eval": time.perf_counter() - began})
    named = {} if search is None else {"search": search.name, "reward": reward.name}
    return out, {"policy": policy.source, **named, **out}
