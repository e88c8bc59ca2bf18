"""`bench=process`: ProcessBench's first-error identification for a process reward (METHODS.md §5).

The file is ProcessBench's format (Qwen/ProcessBench on the hub): one JSON object per line with `id`,
`generator`, `problem`, `steps` (a list of strings), `label` (the index of the first wrong step, -1 when
every step is right) and `final_answer_correct`; `problem`, `steps` and `label` are required, other fields
pass through, and `reference` is read by rewards that check the final answer (arith_steps). The file's own
steps are scored, never re-split: a PRM (`reward=prm`, any format) through its step probabilities, any other
process reward (`arith_steps`...) through its `score_steps`. The predicted first error is the first step
scored below `bench.threshold`; for a PRM the threshold is on the probability whatever `reward.scale`
(0.5 is ProcessBench's argmax of the two classes). As ProcessBench's evaluation code computes it:
acc_error = exact-match accuracy on rows with label >= 0, acc_correct = accuracy (predicted -1) on rows
with label -1, F1 = 2·acc_error·acc_correct / (acc_error + acc_correct) (0 when both are 0; NaN when a
side has no rows). `bench.data=arith` builds such a file from the policy's own samples of the arith TEST
split, labelled by the exact step checker (rewards/arith_steps.py), and writes it to
`<run dir>/processbench_arith.jsonl` for reuse with `bench.data=<that file>`; `bench.split=train` samples the
last `bench.prompts` problems of the TRAIN split instead (`rewardlab label` labels the first ones), a held-out
file for choosing settings.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

from omegaconf import DictConfig

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.io import write_text_atomic

FORMAT = "ProcessBench's fields problem, steps (list of strings), label (first wrong step, -1: none)"


@schema("bench", "process")
class ProcessBenchConfig:
    name: str = "process"
    data: str = "arith"  # a JSONL file in ProcessBench's format, or `arith` (built from the policy's samples)
    threshold: float = 0.5  # a step scored below this is wrong (a PRM: its probability of a correct step)
    prompts: int = 64  # bench.data=arith: test problems sampled
    samples_per_prompt: int = 4  # bench.data=arith: samples per problem
    split: str = "test"  # bench.data=arith: test (its first problems) | train (its LAST problems, which `rewardlab
    # label` never reaches: a held-out file to choose PRM settings on without touching the test split)


def read_processbench(path: Path) -> list[dict[str, Any]]:
    """The rows of a ProcessBench-format JSONL file; a row missing a field, with steps that are not a
    list of strings, or a label that is not -1 or the index of one of its steps, is a UserError naming
    the file and line."""
    from rewardlab.scoring import json_lines

    rows = []
    for number, row in json_lines(path):
        where = f"{path}:{number}"
        if not isinstance(row, dict):
            raise UserError(f"{where} is not a JSON object; a ProcessBench file has {FORMAT}")
        for key in ("problem", "steps", "label"):
            if key not in row:
                raise UserError(f"{where} has no `{key}` field; a ProcessBench file has {FORMAT}")
        steps, label = row["steps"], row["label"]
        if not isinstance(steps, list) or not steps or not all(isinstance(s, str) for s in steps):
            raise UserError(f"{where}: `steps` must be a non-empty list of strings")
        if not isinstance(label, int) or isinstance(label, bool) or label < -1:
            raise UserError(f"{where}: `label` {label!r} must be a step index or -1 (every step right)")
        if label >= len(steps):
            raise UserError(f"{where}: `label` {label} is past its last step (it has {len(steps)} steps, "
                            f"0-{len(steps) - 1}; -1 means every step is right)")
        rows.append(row)
    return rows


def first_error(scores: Sequence[float], threshold: float) -> int:
    """The index of the first step scored below `threshold` (a NaN score counts as wrong), -1 if none."""
    return next((k for k, s in enumerate(scores) if not s >= threshold), -1)


def processbench_f1(predictions: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """ProcessBench's metrics from predicted and labelled first-error indices (-1: no error)."""
    erroneous = [p == l for p, l in zip(predictions, labels) if l != -1]
    correct = [p == -1 for p, l in zip(predictions, labels) if l == -1]
    acc_error = sum(erroneous) / len(erroneous) if erroneous else math.nan
    acc_correct = sum(correct) / len(correct) if correct else math.nan
    total = acc_error + acc_correct
    f1 = 2 * acc_error * acc_correct / total if total > 0 else (0.0 if total == 0 else math.nan)
    return {"process/acc_error": acc_error, "process/acc_correct": acc_correct, "process/f1": f1,
            "process/erroneous": float(len(erroneous)), "process/correct": float(len(correct))}


def require_step_scores(reward) -> None:
    """A UserError naming `reward` unless it scores given steps (a PRM or a ProcessReward)."""
    from rewardlab.rewards.prm import PRMReward
    from rewardlab.rewards.process import ProcessReward

    if not isinstance(reward, (PRMReward, ProcessReward)):
        raise UserError(f"bench=process needs a process reward that scores each step (prm, arith_steps); "
                        f"reward {reward.name!r} ({type(reward).__name__}) gives no step scores")


def step_scores(reward, batch, steps: list[list[str]]) -> list[list[float]]:
    """The reward's score of each given step (a PRM: its probabilities); a reward without step scores is a
    UserError naming it."""
    from rewardlab.rewards.prm import PRMReward

    require_step_scores(reward)
    if isinstance(reward, PRMReward):
        scores = reward.step_scores([batch.raw_question(i) for i in range(len(batch))], steps)
    else:
        scores = reward.score_steps(batch, steps)
    for number, (row, given) in enumerate(zip(scores, steps), start=1):
        if len(row) != len(given):
            raise UserError(f"reward {reward.name!r} scored {len(row)} of the {len(given)} steps of row {number}; "
                            f"check reward.step_tag / reward.format for this model")
    return [[float(s) for s in row] for row in scores]


def arith_processbench(cfg: DictConfig, policy) -> list[dict[str, Any]]:
    """ProcessBench-format rows from the policy's arith test samples, labelled by the exact step checker
    (completions with no step are left out: ProcessBench rows always have steps)."""
    from rewardlab.rewards.arith_steps import gold_check
    from rewardlab.rmlab.bench import sample_arith
    from rewardlab.steps import split_steps

    batch, gold = sample_arith(cfg, policy)
    rows = []
    for i, completion in enumerate(batch.completion):
        steps = split_steps(completion)
        if not steps:
            continue
        checked = gold_check(batch.prompt[i], steps, batch.reference[i])
        label = next((k for k, ok in enumerate(checked) if not ok), -1)
        rows.append({"id": f"{batch.prompt_id[i]}-{len(rows)}", "generator": policy.source,
                     "problem": batch.raw_question(i), "steps": steps, "final_answer_correct": gold[i] == 1.0,
                     "label": label, "reference": batch.reference[i]})
    if not rows:
        raise UserError("the policy wrote no step in any arith sample; nothing to benchmark")
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Score every row's steps with `cfg.reward`; write per-row predictions to scored.jsonl; return the F1."""
    from rewardlab.rmlab.bench import data_file
    from rewardlab.scoring import batch_from_rows, build_reward

    rows = None if cfg.bench.data == "arith" else read_processbench(data_file(cfg.bench.data, FORMAT))
    reward, policy = build_reward(cfg)
    require_step_scores(reward)
    if rows is None:
        rows = arith_processbench(cfg, policy)
        write_text_atomic(run_dir / "processbench_arith.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    steps = [list(r["steps"]) for r in rows]
    batch = batch_from_rows([{"prompt": r["problem"], "completion": "\n".join(s), "reference": r.get("reference")}
                             for r, s in zip(rows, steps)], policy.tokenizer)
    scores = step_scores(reward, batch, steps)
    predictions = [first_error(s, cfg.bench.threshold) for s in scores]
    labels = [r["label"] for r in rows]
    metrics = {**processbench_f1(predictions, labels), "process/threshold": float(cfg.bench.threshold)}
    if not metrics["process/erroneous"] or not metrics["process/correct"]:
        warnings.warn(f"the ProcessBench rows have {metrics['process/erroneous']:.0f} erroneous and "
                      f"{metrics['process/correct']:.0f} correct samples: F1 needs both")
    write_text_atomic(run_dir / "scored.jsonl", "".join(
        json.dumps({**r, "step_scores": s, "prediction": p, "match": p == r["label"]}) + "\n"
        for r, s, p in zip(rows, scores, predictions)))
    table = [{"samples": "erroneous (label >= 0)", "rows": int(metrics["process/erroneous"]),
              "accuracy": metrics["process/acc_error"]},
             {"samples": "correct (label = -1)", "rows": int(metrics["process/correct"]),
              "accuracy": metrics["process/acc_correct"]},
             {"samples": "F1 (harmonic mean)", "rows": len(rows), "accuracy": metrics["process/f1"]}]
    return {"bench": "process", "metrics": metrics, "rows": table}
