"""`bench=pairs`: RewardBench's pairwise accuracy for any reward (METHODS.md §5).

The file is RewardBench's format (allenai/reward-bench on the hub): one JSON object per line with
`prompt`, `chosen`, `rejected` and optionally `subset`, `chosen_model`, `rejected_model`, `id`; other
fields pass through, and `reference` is read by rewards that need one (verifiable). Each row's prompt +
chosen and prompt + rejected are scored by the reward together in one batch (grouped by prompt, as
`rewardlab score` groups rows). A row counts 1 when chosen scores above rejected, ½ on a tie, 0 below;
a row where either score is not finite (NaN, inf) counts 0 and is reported in `pairs/nonfinite`, as
RewardBench's `chosen > rejected` would score it. `bench.data=arith` builds such a file from the
policy's own arith samples: per test problem, one correct completion as chosen, one incorrect as rejected.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.io import write_text_atomic

REQUIRED = ("prompt", "chosen", "rejected")
FORMAT = "RewardBench's fields prompt, chosen, rejected (optional subset, id)"
NO_SUBSET = "(none)"


@schema("bench", "pairs")
class PairsBenchConfig:
    name: str = "pairs"
    data: str = "arith"  # a JSONL file in RewardBench's format, or `arith` (built from the policy's samples)
    prompts: int = 64  # bench.data=arith: test problems sampled
    samples_per_prompt: int = 8  # bench.data=arith: samples per problem, to find a correct and an incorrect one


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """The rows of a RewardBench-format JSONL file; a row without a required field, or with a non-text
    chosen / rejected, is a UserError naming the file and line."""
    from rewardlab.scoring import json_lines

    rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number} is not a JSON object; a pairs file has {FORMAT}")
        for key in REQUIRED:
            if key not in row:
                raise UserError(f"{path}:{number} has no `{key}` field; a pairs file has {FORMAT}")
        for key in ("chosen", "rejected"):
            if not isinstance(row[key], str):
                raise UserError(f"{path}:{number}: `{key}` must be a string (the response text)")
        rows.append(row)
    return rows


def pair_accuracy(chosen: Sequence[float], rejected: Sequence[float],
                  subsets: Optional[Sequence[str]] = None) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, table rows) of pairwise accuracy: 1 when chosen > rejected, ½ on a tie, 0 otherwise or
    when either score is not finite; overall and per subset (when any row has one)."""
    subsets = list(subsets) if subsets is not None else [NO_SUBSET] * len(chosen)
    outcome, ties, nonfinite = [], [], []
    for c, r in zip(chosen, rejected):
        bad = not (math.isfinite(c) and math.isfinite(r))
        nonfinite.append(bad)
        ties.append(not bad and c == r)
        outcome.append(0.0 if bad else 1.0 if c > r else 0.5 if c == r else 0.0)

    def summary(label: str, idx: list[int]) -> dict[str, Any]:
        return {"subset": label, "pairs": len(idx), "accuracy": sum(outcome[i] for i in idx) / len(idx),
                "ties": sum(ties[i] for i in idx), "nonfinite": sum(nonfinite[i] for i in idx)}

    every = summary("all", list(range(len(outcome))))
    metrics = {"pairs/accuracy": every["accuracy"], "pairs/rows": float(every["pairs"]),
               "pairs/ties": float(every["ties"]), "pairs/nonfinite": float(every["nonfinite"])}
    rows = []
    if any(s != NO_SUBSET for s in subsets):
        for label in dict.fromkeys(subsets):
            row = summary(label, [i for i, s in enumerate(subsets) if s == label])
            metrics[f"pairs/accuracy/{label}"] = row["accuracy"]
            rows.append(row)
    return metrics, rows + [every]


def arith_pairs(cfg: DictConfig, policy) -> list[dict[str, Any]]:
    """RewardBench-format rows from the policy's arith test samples: for each problem with both, its first
    correct completion (chosen) and first incorrect one (rejected), with the reference answer."""
    from rewardlab.rmlab.bench import sample_arith

    batch, gold = sample_arith(cfg, policy)
    rows: list[dict[str, Any]] = []
    for prompt_id, members in batch.groups().items():
        right = [i for i in members if gold[i] == 1.0]
        wrong = [i for i in members if gold[i] == 0.0]
        if right and wrong:
            i, j = right[0], wrong[0]
            rows.append({"id": len(rows), "prompt": batch.raw_question(i), "chosen": batch.completion[i],
                         "chosen_model": policy.source, "rejected": batch.completion[j],
                         "rejected_model": policy.source, "subset": "arith", "reference": batch.reference[i]})
    if not rows:
        raise UserError(f"no arith test problem among bench.prompts={cfg.bench.prompts} got both a correct and an "
                        f"incorrect completion; raise bench.prompts or bench.samples_per_prompt")
    return rows


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Score every pair with `cfg.reward`; write the per-pair scores to scored.jsonl; return the accuracy."""
    from rewardlab.rmlab.bench import data_file
    from rewardlab.scoring import batch_from_rows, build_reward

    rows = None if cfg.bench.data == "arith" else read_pairs(data_file(cfg.bench.data, FORMAT))
    reward, policy = build_reward(cfg)
    if rows is None:
        rows = arith_pairs(cfg, policy)
        write_text_atomic(run_dir / "rewardbench_arith.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    scored = [{"prompt": r["prompt"], "completion": r[key], "reference": r.get("reference")}
              for r in rows for key in ("chosen", "rejected")]
    batch = batch_from_rows(scored, policy.tokenizer)
    reward.score(batch)
    chosen, rejected = batch.reward[0::2], batch.reward[1::2]
    subsets = [str(r["subset"]) if r.get("subset") is not None else NO_SUBSET for r in rows]
    metrics, table = pair_accuracy(chosen, rejected, subsets)
    write_text_atomic(run_dir / "scored.jsonl", "".join(
        json.dumps({**r, "chosen_score": c, "rejected_score": s}) + "\n" for r, c, s in zip(rows, chosen, rejected)))
    return {"bench": "pairs", "metrics": metrics, "rows": table}
