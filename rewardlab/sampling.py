"""Collecting one iteration's training batch: filter the scored rollouts and, when dynamic sampling
is on (DAPO), score more prompts until the batch has enough groups or the round cap is reached."""

from __future__ import annotations

from typing import Callable, Sequence

from rewardlab.filters import DynamicSampling, Filter
from rewardlab.rollout import Batch


def apply_filters(batch: Batch, filters: Sequence[Filter], metrics: dict[str, float]) -> Batch:
    """Run `filters` in their order, adding each one's metrics into `metrics` (summed over rounds)."""
    for f in sorted(filters, key=lambda f: f.order):
        batch = f(batch)
        for key, value in f.last_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + value
    return batch


def collect(batch: Batch, filters: Sequence[Filter], more: Callable[[int], Batch], groups: int
            ) -> tuple[Batch, Batch, dict[str, float]]:
    """(every scored row, the rows to train on, metrics) from a first scored `batch`.

    With a `DynamicSampling` filter, `more(n)` generates and scores n more prompts while fewer than `groups`
    groups are kept, for at most its `max_rounds` rounds in all; the kept rows are cut to `groups` groups.
    """
    metrics: dict[str, float] = {}
    batch.extra["row"] = list(range(len(batch)))  # each row's index in the returned scored batch
    scored, kept = [batch], [apply_filters(batch, filters, metrics)]
    refill = next((f for f in filters if isinstance(f, DynamicSampling)), None)

    def kept_groups() -> int:
        return sum(len(b.groups()) for b in kept)

    while refill is not None and kept_groups() < groups and len(scored) < refill.max_rounds:
        extra = more(groups - kept_groups())
        extra.extra["row"] = list(range(sum(map(len, scored)), sum(map(len, scored)) + len(extra)))
        scored.append(extra)
        kept.append(apply_filters(extra, filters, metrics))
    everything = Batch.concat(scored) if len(scored) > 1 else batch
    kept_rows = Batch.concat(kept) if len(kept) > 1 else kept[0]
    chosen = list(kept_rows.groups().values())[:groups] if refill is not None else None
    if chosen is not None and sum(map(len, chosen)) < len(kept_rows):
        kept_rows = kept_rows.select([i for rows in chosen for i in rows])
    metrics["filter/kept_fraction"] = len(kept_rows) / max(len(everything), 1)
    if refill is not None:
        metrics["sampling/rounds"] = float(len(scored))
        metrics["sampling/kept_groups"] = float(len(kept_rows.groups()))
    return everything, kept_rows, metrics
