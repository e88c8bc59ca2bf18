"""Reward-hacking diagnostics, computed every iteration from the scored batch (before filtering).

They compare the proxy reward being optimized with gold correctness (the verifiable check against
the references) and with length, so a policy gaming its reward shows up in metrics.jsonl and W&B:
- `diag/reward_gold_corr`, `diag/reward_correct_mean`, `diag/reward_incorrect_mean`: does the proxy
  still rank correct completions above incorrect ones (Gao et al., over-optimization)?
- `diag/reward_length_corr`: Pearson correlation of reward with completion tokens (ODIN).
- `diag/gold_zero_variance`: fraction of groups whose completions are all right or all wrong.
- `diag/explore_distinct_correct`, `diag/explore_any_correct` (B-STaR exploration): distinct correct
  completions per prompt, and the fraction of prompts with at least one.
- `diag/exploit_best_of_k`, `diag/exploit_random`, `diag/exploit_gain` (B-STaR exploitation): gold
  accuracy of the reward's best-of-K pick per prompt vs a uniformly random pick.
- `diag/<prm>/step_agreement` (arith): how often a learned PRM's step verdict (score ≥ 0.5) agrees
  with the exact arith step checker.
"""

from __future__ import annotations

import math

from rewardlab.rewards.tiny_prm import check_arith_steps
from rewardlab.rollout import Batch
from rewardlab.steps import split_steps


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation, or None when either side is constant (undefined)."""
    n = len(xs)
    if n < 2:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 1e-12 or syy <= 1e-12:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def step_agreement(batch: Batch, step_scores: list[list[float]]) -> float | None:
    """Fraction of arith steps where (PRM score ≥ 0.5) equals the exact checker's label."""
    agree = total = 0
    for completion, scores in zip(batch.completion, step_scores):
        labels = check_arith_steps(split_steps(completion))
        if len(labels) != len(scores):
            continue
        agree += sum((s >= 0.5) == bool(lab) for s, lab in zip(scores, labels))
        total += len(labels)
    return agree / total if total else None


def hacking_metrics(batch: Batch, task=None) -> dict[str, float]:
    """The diagnostics above for one scored batch; gold-based ones only when `batch.gold` exists."""
    from rewardlab.data.arith import ArithTask

    out: dict[str, float | None] = {}
    rewards = [float(r) for r in batch.reward]
    finite = [i for i, r in enumerate(rewards) if math.isfinite(r)]
    out["diag/reward_length_corr"] = pearson([rewards[i] for i in finite],
                                             [float(len(batch.completion_ids[i])) for i in finite])
    if isinstance(task, ArithTask):
        for key, scores in batch.extra.items():
            if key.endswith("/step_scores"):
                out[f"diag/{key.rsplit('/', 1)[0]}/step_agreement"] = step_agreement(batch, scores)
    if batch.gold is None:
        return {k: v for k, v in out.items() if v is not None}
    rows = [i for i in finite if batch.gold[i] is not None]
    gold = {i: float(batch.gold[i]) for i in rows}
    out["diag/reward_gold_corr"] = pearson([rewards[i] for i in rows], [gold[i] for i in rows])
    correct = [rewards[i] for i in rows if gold[i] > 0.5]
    wrong = [rewards[i] for i in rows if gold[i] <= 0.5]
    out["diag/reward_correct_mean"] = sum(correct) / len(correct) if correct else None
    out["diag/reward_incorrect_mean"] = sum(wrong) / len(wrong) if wrong else None
    groups = [[i for i in g if i in gold] for g in batch.groups().values()]
    groups = [g for g in groups if g]
    if groups:
        out["diag/gold_zero_variance"] = sum(len({gold[i] for i in g}) == 1 for g in groups) / len(groups)
        distinct = [len({" ".join(batch.completion[i].split()) for i in g if gold[i] > 0.5}) for g in groups]
        out["diag/explore_distinct_correct"] = sum(distinct) / len(groups)
        out["diag/explore_any_correct"] = sum(d > 0 for d in distinct) / len(groups)
        best, random_pick = [], []
        for g in groups:
            top = max(rewards[i] for i in g)
            tied = [i for i in g if rewards[i] == top]
            best.append(sum(gold[i] for i in tied) / len(tied))
            random_pick.append(sum(gold[i] for i in g) / len(g))
        out["diag/exploit_best_of_k"] = sum(best) / len(groups)
        out["diag/exploit_random"] = sum(random_pick) / len(groups)
        out["diag/exploit_gain"] = out["diag/exploit_best_of_k"] - out["diag/exploit_random"]
    return {k: v for k, v in out.items() if v is not None}
