"""Pair builders for iterative DPO: turn a scored batch into (prompt, chosen, rejected) pairs.

Each builder works on one prompt's group and either builds a pair or records why it skipped the
group, so every iteration reports pairs built and pairs skipped by reason. Kendall's tau-b (CREAM) is
written here in a dozen lines because scipy is not a dependency.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from rewardlab.errors import UserError
from rewardlab.rollout import Batch


@dataclass
class Pair:
    """One DPO example; `label` is the probability that `chosen` is preferred (CREAM softens it)."""

    prompt_id: str
    prompt: str
    chosen: str
    rejected: str
    chosen_reward: float | None
    rejected_reward: float | None
    label: float = 1.0


@dataclass
class PairSet:
    pairs: list[Pair] = field(default_factory=list)
    skipped: Counter = field(default_factory=Counter)
    undefined_agreement: int | None = None  # CREAM: pairs whose ranking agreement was undefined

    def metrics(self) -> dict[str, float]:
        """Pairs built, skipped per reason, chosen/rejected reward means and the mean label."""
        out = {"pairs/built": float(len(self.pairs)), "pairs/skipped": float(sum(self.skipped.values()))}
        out.update({f"pairs/skipped/{reason}": float(n) for reason, n in sorted(self.skipped.items())})
        for side in ("chosen", "rejected"):
            values = [getattr(p, f"{side}_reward") for p in self.pairs if getattr(p, f"{side}_reward") is not None]
            if values:
                out[f"pairs/{side}_reward"] = sum(values) / len(values)
        margins = [p.chosen_reward - p.rejected_reward for p in self.pairs
                   if p.chosen_reward is not None and p.rejected_reward is not None]
        if margins:
            out["pairs/reward_margin"] = sum(margins) / len(margins)
        if self.pairs:
            out["pairs/label_mean"] = sum(p.label for p in self.pairs) / len(self.pairs)
        if self.undefined_agreement is not None:
            out["pairs/cream_undefined"] = float(self.undefined_agreement)
        return out


def _scored(scores: list, rows: list[int]) -> list[int]:
    return [i for i in rows if scores[i] is not None and math.isfinite(scores[i])]


def _extremes(scores: list, rows: list[int]) -> tuple[int, int]:
    """The highest- and lowest-scored rows (first occurrence wins ties, so results are deterministic)."""
    best = max(rows, key=lambda i: (scores[i], -i))
    worst = min(rows, key=lambda i: (scores[i], i))
    return best, worst


def _gap_reason(chosen: float, rejected: float, min_margin: float) -> str | None:
    if chosen <= rejected:
        return "tie" if chosen == rejected else "no_better"
    if chosen - rejected < min_margin:
        return "small_margin"
    return None


def _pick(batch: Batch, rows: list[int], min_margin: float, scores: list | None = None) -> tuple[int, int] | str:
    """The (best, worst) rows of one group by `scores` (the reward by default), or why the group gives no pair."""
    scores = batch.reward if scores is None else scores
    rows = _scored(scores, rows)
    if len(rows) < 2:
        return "too_few_scored"
    best, worst = _extremes(scores, rows)
    reason = _gap_reason(scores[best], scores[worst], min_margin)
    if reason is None and batch.completion[best] == batch.completion[worst]:
        reason = "identical"
    return reason or (best, worst)


def _pair(batch: Batch, best: int, worst: int, scores: list | None = None) -> Pair:
    scores = batch.reward if scores is None else scores
    return Pair(batch.prompt_id[best], batch.prompt[best], batch.completion[best], batch.completion[worst],
                scores[best], scores[worst])


def best_worst(batch: Batch, min_margin: float = 0.0) -> PairSet:
    """Highest vs lowest reward in each group; ties, gaps below `min_margin` and identical texts skipped."""
    out = PairSet()
    for rows in batch.groups().values():
        picked = _pick(batch, rows, min_margin)
        if isinstance(picked, str):
            out.skipped[picked] += 1
        else:
            out.pairs.append(_pair(batch, *picked))
    return out


def anchored_rejection(batch: Batch, anchors: Batch, min_margin: float = 0.0) -> PairSet:
    """Temporal Self-Rewarding: chosen = the current model's best sample, rejected = the lowest-scored of
    the *initial* model's samples for the same prompt (`anchors`, scored by the same reward)."""
    out = PairSet()
    anchor_groups = anchors.groups()
    for pid, rows in batch.groups().items():
        rows = _scored(batch.reward, rows)
        anchor_rows = _scored(anchors.reward, anchor_groups.get(pid, []))
        if not rows or not anchor_rows:
            out.skipped["no_anchor" if rows else "too_few_scored"] += 1
            continue
        best, _ = _extremes(batch.reward, rows)
        _, worst = _extremes(anchors.reward, anchor_rows)
        reason = _gap_reason(batch.reward[best], anchors.reward[worst], min_margin)
        if reason is None and batch.completion[best] == anchors.completion[worst]:
            reason = "identical"
        if reason:
            out.skipped[reason] += 1
            continue
        out.pairs.append(Pair(pid, batch.prompt[best], batch.completion[best], anchors.completion[worst],
                              batch.reward[best], anchors.reward[worst]))
    return out


def spin(batch: Batch) -> PairSet:
    """SPIN: chosen = the data set's reference response, rejected = the model's own first sample that
    differs from it (no reward needed; a prompt whose samples all equal the reference is skipped)."""
    out = PairSet()
    for pid, rows in batch.groups().items():
        gold = batch.solution[rows[0]]
        if not gold:
            out.skipped["no_reference_response"] += 1
            continue
        own = next((i for i in rows if batch.completion[i].strip() != gold.strip()), None)
        if own is None:
            out.skipped["matches_reference"] += 1
            continue
        reward = batch.reward[own] if batch.reward is not None else None
        out.pairs.append(Pair(pid, batch.prompt[own], gold, batch.completion[own], None, reward))
    return out


def kendall_tau(x: list[float], y: list[float]) -> float:
    """Kendall's tau-b of two rankings of the same items (NaN when either ranking is constant)."""
    concordant = discordant = ties_x = ties_y = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            dx, dy = x[i] - x[j], y[i] - y[j]
            if dx == 0 and dy == 0:
                continue
            if dx == 0:
                ties_x += 1
            elif dy == 0:
                ties_y += 1
            elif (dx > 0) == (dy > 0):
                concordant += 1
            else:
                discordant += 1
    denominator = math.sqrt((concordant + discordant + ties_x) * (concordant + discordant + ties_y))
    return (concordant - discordant) / denominator if denominator else float("nan")


def cream(batch: Batch, current: list[float] | None, previous: list[float] | None,
          min_margin: float = 0.0) -> PairSet:
    """CREAM: the best and worst rows of each group under `current` (the model's own ranking, one score per
    row; the run's reward when None) labelled lambda = (tau + 1) / 2, tau the Kendall agreement of `current`
    and `previous` (the previous model's scores) over the group. Undefined agreement (a constant ranking, or
    no previous model) leaves lambda = 1. Pair rewards are the `current` scores."""
    scores = batch.reward if current is None else current
    out = PairSet(undefined_agreement=0)
    for rows in batch.groups().values():
        picked = _pick(batch, rows, min_margin, scores)
        if isinstance(picked, str):
            out.skipped[picked] += 1
            continue
        pair = _pair(batch, *picked, scores)
        scored = _scored(scores, rows)
        tau = float("nan") if previous is None else kendall_tau([scores[i] for i in scored],
                                                                [previous[i] for i in scored])
        if math.isnan(tau):
            out.undefined_agreement += 1
        else:
            pair.label = (tau + 1) / 2
        out.pairs.append(pair)
    return out


def dno(batch: Batch, min_margin: float = 0.0) -> PairSet:
    """DNO-style: pairs labelled by a pairwise judge. Chosen = highest win rate in the group, rejected =
    lowest, kept only when the judge's direct verdict between the two prefers the chosen one."""
    if "pairwise_prefs" not in batch.extra:
        raise UserError("algo.pairs=dno needs the pairwise judge's verdicts; use reward=pairwise_judge")
    prefs, position = batch.extra["pairwise_prefs"], batch.extra["group_index"]
    out = PairSet()
    for rows in batch.groups().values():
        picked = _pick(batch, rows, min_margin)
        if isinstance(picked, str):
            out.skipped[picked] += 1
            continue
        best, worst = picked
        direct = prefs[best][position[worst]]
        if direct is None or not math.isfinite(direct):
            out.skipped["no_direct_verdict"] += 1
        elif direct <= 0.5:
            out.skipped["judge_disagrees"] += 1
        else:
            out.pairs.append(_pair(batch, best, worst))
    return out
