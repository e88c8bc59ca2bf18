"""`rewardlab label`: Monte-Carlo step labels from the policy's own samples (Math-Shepherd, METHODS.md §4).

For each prompt the policy samples `label.samples_per_prompt` solutions; each is cut into steps by the splitter
the process rewards use (rewardlab.steps.StepSplit). A step's label comes from `label.rollouts` continuations of
the solution up to and including that step: soft = the fraction whose final answer equals the reference
(rewardlab.answers.check), hard = any does. The prefix a continuation starts from is the rendered prompt the
policy reads plus the solution's own text up to the next step, so a chat template is applied once, as in normal
generation. A finished solution's last step needs no rollouts: the solution is its only continuation, so its
label is the solution's own outcome.

`label.method=mc` rolls out every prefix of a prompt's solutions in one `generate` call. `binary_search`
(OmegaPRM) labels a correct finished solution right throughout and, for the others, searches for the first
prefix from which no rollout succeeds: a prefix with a success moves the search later, one without moves it
earlier; steps before the first wrong one are right, it and every later step wrong. Each round is one call for
all of a prompt's solutions still searching. Soft labels are measured where rollouts ran; a step the search
labelled without rollouts gets its hard label as 0.0 / 1.0. TRL has no step labeller (its PRM trainer only
consumes such labels), so this is written here.

Rows go to `<run dir>/labels.jsonl` in TRL's stepwise-supervision format (`prompt` = the raw question,
`completions` = the steps, `labels`) plus `soft_labels`, `reference` and where each row came from; a prompt's
rows are appended, flushed and fsynced when it finishes. Each prompt's sampling is seeded from (run.seed, its
index), so a rerun into the same directory drops a partly written last line and the rows of the last prompt
present (it may be incomplete), redoes that prompt and continues: the file ends as an uninterrupted run's would.
On arith the hard and soft (> 0.5) labels are compared per step with the exact step checker.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from rewardlab.answers import check
from rewardlab.config import command_schema
from rewardlab.data.base import Example
from rewardlab.errors import UserError
from rewardlab.generation.hf import Sampling
from rewardlab.io import write_json_atomic, write_text_atomic
from rewardlab.steps import StepSplit

METHODS = ("mc", "binary_search")
LABELS_FILE = "labels.jsonl"


@dataclass
class LabelSettings:
    """`label.*`: what to label and how."""

    prompts: int = 256  # the first N prompts of the data set's train split (1024 rows: README "The reward-model lab")
    samples_per_prompt: int = 4  # solutions sampled per prompt (one labels row each)
    rollouts: int = 8  # continuations per step prefix
    method: str = "mc"  # mc (every prefix) | binary_search (OmegaPRM: first wrong step, fewer rollouts)
    temperature: float = 0.7  # of the solutions and the rollouts (1.0: only 34% of steps right, 0.7: 45%)
    top_p: float = 1.0
    max_new_tokens: int = 48  # budget of a solution and of a continuation (conf/label.yaml: the data set's)
    split: StepSplit = field(default_factory=StepSplit)


@dataclass
class LabelRunConfig:
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    verbose: bool = False


@dataclass
class LabelConfig:
    run: LabelRunConfig = field(default_factory=LabelRunConfig)
    label: LabelSettings = field(default_factory=LabelSettings)
    policy: Any = None
    dataset: Any = None
    generation: Any = None


command_schema("_label_schema", LabelConfig)


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`'s sampling: its labels do not depend on which prompts ran before it."""
    return (seed * 1_000_003 + index * 7919 + 4242) % (2**63)


@dataclass
class Solution:
    """One sampled solution: its steps, the text to continue from after each, and what is known of its end."""

    steps: list[str]
    prefixes: list[str]  # prefixes[k]: the solution's text through step k (and the separator after it)
    finished: bool  # it ended with a stop token, so the full text is its own only continuation
    correct: bool  # its own final answer equals the reference


def solution_of(text: str, finished: bool, correct: bool, split: StepSplit) -> Solution:
    """Steps and continuation prefixes of a completion; a prefix keeps the separator before the next step."""
    pieces = split.split(text)
    steps = [step for step, _ in pieces]
    prefixes = []
    for k, (_, end) in enumerate(pieces):
        if k + 1 < len(pieces):
            prefixes.append(text[: text.find(steps[k + 1], end)])
        else:
            prefixes.append(text)
    return Solution(steps, prefixes, finished, correct)


class Labeller:
    """Labels the steps of one prompt's sampled solutions with rollouts from `generator`."""

    def __init__(self, generator, settings: LabelSettings, answer_format: str) -> None:
        self.check(settings)
        self.generator, self.settings, self.answer_format = generator, settings, answer_format
        self.sampling = Sampling(temperature=settings.temperature, top_p=settings.top_p, top_k=0,
                                 max_new_tokens=settings.max_new_tokens)

    @staticmethod
    def check(settings: LabelSettings) -> None:
        """Refuse settings that cannot label anything (before any file is touched)."""
        if settings.method not in METHODS:
            raise UserError(f"label.method={settings.method!r} is not one of {', '.join(METHODS)}")
        for key in ("prompts", "samples_per_prompt", "rollouts", "max_new_tokens"):
            if getattr(settings, key) < 1:
                raise UserError(f"label.{key} must be at least 1, got {getattr(settings, key)}")
        settings.split.separator()

    def rollout_successes(self, example: Example, prefixes: Sequence[str]) -> list[int]:
        """How many of `label.rollouts` continuations of each prefix reach the reference (one generate call)."""
        if not prefixes:
            return []
        n = self.settings.rollouts
        starts = [Example(id=f"{example.id}/{j}", prompt=example.prompt + p, answer=example.answer)
                  for j, p in enumerate(prefixes)]
        out = self.generator.generate(starts, n=n, sampling=self.sampling)
        full = [prefixes[i // n] + text for i, text in enumerate(out.completion)]
        ok = check(full, [example.answer] * len(full), self.answer_format)
        return [int(sum(ok[j * n : (j + 1) * n])) for j in range(len(prefixes))]

    def sample(self, example: Example) -> list[Solution]:
        out = self.generator.generate([example], n=self.settings.samples_per_prompt, sampling=self.sampling)
        correct = check(out.completion, [example.answer] * len(out.completion), self.answer_format)
        return [solution_of(text, reason == "stop", bool(ok), self.settings.split)
                for text, reason, ok in zip(out.completion, out.finish_reason, correct)]

    def label(self, example: Example) -> list[dict[str, Any]]:
        """One row per sampled solution with at least one step: steps, hard and soft labels, rollouts spent."""
        solutions = [s for s in self.sample(example) if s.steps]
        if self.settings.method == "mc":
            labelled = self._mc(example, solutions)
        else:
            labelled = self._binary_search(example, solutions)
        return [{"completions": s.steps, "labels": [x > 0 for x in soft], "soft_labels": soft, "rollouts": spent}
                for s, (soft, spent) in zip(solutions, labelled)]

    def _mc(self, example: Example, solutions: list[Solution]) -> list[tuple[list[float], int]]:
        """Every prefix rolled out, all of the prompt's in one call (a finished last step: its own outcome)."""
        n = self.settings.rollouts
        jobs = [(i, k) for i, s in enumerate(solutions) for k in range(len(s.steps))
                if not (s.finished and k == len(s.steps) - 1)]
        wins = dict(zip(jobs, self.rollout_successes(example, [solutions[i].prefixes[k] for i, k in jobs])))
        out = []
        for i, s in enumerate(solutions):
            soft = [wins[(i, k)] / n if (i, k) in wins else float(s.correct) for k in range(len(s.steps))]
            out.append((soft, n * sum(1 for j, _ in jobs if j == i)))
        return out

    def _binary_search(self, example: Example, solutions: list[Solution]) -> list[tuple[list[float], int]]:
        """OmegaPRM's search for the first prefix from which nothing succeeds; rounds batched over solutions."""
        n = self.settings.rollouts
        low = [-1] * len(solutions)  # the latest prefix known good (-1: the bare prompt, assumed good)
        # the earliest prefix known bad: a finished wrong solution's last step; past the end when unknown
        high = [len(s.steps) if s.correct and s.finished else len(s.steps) - 1 if s.finished else len(s.steps)
                for s in solutions]
        measured: list[dict[int, float]] = [{} for _ in solutions]
        for i, s in enumerate(solutions):
            if s.finished:
                measured[i][len(s.steps) - 1] = float(s.correct)
        searching = [i for i, s in enumerate(solutions) if not (s.finished and s.correct)]
        while True:
            searching = [i for i in searching if high[i] - low[i] > 1]
            if not searching:
                break
            middle = [(low[i] + high[i]) // 2 for i in searching]
            wins = self.rollout_successes(example, [solutions[i].prefixes[m] for i, m in zip(searching, middle)])
            for i, m, w in zip(searching, middle, wins):
                measured[i][m] = w / n
                if w > 0:
                    low[i] = m
                else:
                    high[i] = m
        out = []
        for i, s in enumerate(solutions):
            soft = [measured[i].get(k, float(k < high[i])) for k in range(len(s.steps))]
            spent = n * sum(1 for k in measured[i] if not (s.finished and k == len(s.steps) - 1))
            out.append((soft, spent))
        return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The complete rows of a labels file; a last line cut short by a kill (no newline, or not JSON) is dropped."""
    if not path.exists():
        return []
    lines = path.read_text().split("\n")
    rows = []
    for number, line in enumerate(lines[:-1], start=1):  # lines[-1] is "" or an unterminated (partial) line
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines) - 1:
                raise UserError(f"{path} line {number} is not JSON; it was not written by `rewardlab label` "
                                f"(choose a new hydra.run.dir)") from None
    return rows


def resume_point(path: Path, prompts: int) -> int:
    """Cut `path` to the rows of prompts before the last prompt present (which may be incomplete) and
    return that prompt's index: the next one to label. Zero for a new file. Refused, with the file left as
    it is, when it holds rows of prompts past `prompts`."""
    rows = read_rows(path)
    if not rows:
        return 0
    last = rows[-1]["prompt_index"]
    if last >= prompts:
        raise UserError(f"{path} already holds labels for {last + 1} prompts, more than label.prompts={prompts}; "
                        f"give label.prompts >= {last + 1} to continue it")
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows if r["prompt_index"] < last))
    return last


def append_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """Append one prompt's rows and force them to disk before the next prompt starts."""
    with open(path, "a") as handle:
        handle.write("".join(json.dumps(r) + "\n" for r in rows))
        handle.flush()
        os.fsync(handle.fileno())


def agreement(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Per-step agreement of the hard and soft (> 0.5) labels with arith's exact step checker."""
    from rewardlab.rewards.arith_steps import gold_check

    steps = hard = soft = gold_right = 0
    for row in rows:
        gold = gold_check(row["prompt"], row["completions"], row["reference"])
        steps += len(gold)
        gold_right += sum(gold)
        hard += sum(g == h for g, h in zip(gold, row["labels"]))
        soft += sum(g == (s > 0.5) for g, s in zip(gold, row["soft_labels"]))
    if not steps:
        return {}
    return {"label/agreement_hard": hard / steps, "label/agreement_soft": soft / steps,
            "label/agree_hard_steps": float(hard), "label/agree_soft_steps": float(soft),
            "label/gold_right_fraction": gold_right / steps}


def _check_same_run(run_dir: Path, cfg: DictConfig) -> None:
    """A rerun into a directory with labels continues it only with the same settings (label.prompts may grow)."""
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved, now = OmegaConf.to_container(OmegaConf.load(saved_path)), OmegaConf.to_container(cfg, resolve=True)
    for side in (saved, now):
        side.get("label", {}).pop("prompts", None)
        side.get("run", {}).pop("verbose", None)
        side.get("run", {}).pop("threads", None)
    if saved != now:
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        raise UserError(f"{run_dir} holds labels made with other settings ({', '.join(changed)}); rerun with "
                        f"the same settings to continue them, or choose a new hydra.run.dir")


def _progress():
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from rewardlab.tracking import console

    return Progress(TextColumn("[bold]labelling prompts"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TextColumn("eta"), TimeRemainingColumn(), console=console, disable=not sys.stderr.isatty())


def label(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Label `label.prompts` prompts into `<run dir>/labels.jsonl` (continuing what is there); summary.json
    and metrics.jsonl hold the counts and, on arith, the agreement with the exact step checker."""
    from rewardlab.run import Launch

    launch = Launch()  # a job refused before it starts leaves no directory it created, as `train`
    launch.accept(run_dir, main=True)
    try:
        return _label(cfg, run_dir, launch)
    except BaseException:
        launch.failed()
        raise


def _label(cfg: DictConfig, run_dir: Path, launch) -> dict[str, Any]:
    from hydra.utils import instantiate

    from rewardlab.data.arith import ArithTask
    from rewardlab.run import setup_torch
    from rewardlab.tracking import console, quiet_libraries

    quiet_libraries(cfg.run.verbose)
    setup_torch(cfg.run)
    settings: LabelSettings = OmegaConf.to_object(cfg.label)
    Labeller.check(settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LABELS_FILE
    _check_same_run(run_dir, cfg)
    task = instantiate(cfg.dataset)
    count = min(settings.prompts, len(task.train_examples()))
    if not count:
        raise UserError("the data set's train split is empty; nothing to label")
    start = resume_point(path, count)
    policy = instantiate(cfg.policy, device=cfg.run.device, log=console.print)
    task.prepare(policy.tokenizer)
    examples = list(task.train_examples())[:count]
    labeller = Labeller(instantiate(cfg.generation, policy=policy), settings, task.answer_format)
    launch.started = True
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    path.touch()
    if start:
        console.print(f"continuing {path}: {start} of {len(examples)} prompts already labelled")
    began = time.perf_counter()
    with _progress() as progress:
        bar = progress.add_task("label", total=len(examples), completed=start)
        for index in range(start, len(examples)):
            example = examples[index]
            torch.manual_seed(prompt_seed(cfg.run.seed, index))
            rows = [{"prompt": example.question or example.prompt, **row, "reference": example.answer,
                     "id": example.id, "prompt_index": index, "sample": j}
                    for j, row in enumerate(labeller.label(example))]
            append_rows(path, rows)
            progress.advance(bar)
            if not progress.console.is_terminal and (index + 1) % max(1, len(examples) // 10) == 0:
                took = time.perf_counter() - began  # a log's stand-in for the bar: elapsed and estimated left
                left = took / (index + 1 - start) * (len(examples) - index - 1)
                console.print(f"labelled {index + 1}/{len(examples)} prompts ({took:.0f} s, eta {left:.0f} s)")
    rows = read_rows(path)
    steps = sum(len(r["labels"]) for r in rows)
    summary: dict[str, Any] = {
        "label/prompts": float(len(examples)), "label/rows": float(len(rows)), "label/steps": float(steps),
        "label/rollouts": float(sum(r["rollouts"] for r in rows)),
        "label/right_fraction": sum(sum(r["labels"]) for r in rows) / max(steps, 1),
        "label/seconds": time.perf_counter() - began, "label/resumed_at_prompt": float(start)}
    if isinstance(task, ArithTask):
        summary.update(agreement(rows))
    write_text_atomic(run_dir / "metrics.jsonl", json.dumps({"iteration": 0, **summary}, sort_keys=True) + "\n")
    write_json_atomic(run_dir / "summary.json", {"final": summary, "method": settings.method,
                                                  "labels": str(path)})
    return summary
