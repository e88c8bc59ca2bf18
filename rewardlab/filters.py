"""Filters: what is kept between scoring and the update. Each is `Filter(batch) -> Batch` and
reports what it did through `last_metrics`.

Filters run in the order of their `order` (then config order): reward shaping (overlong penalty) first,
then row drops (non-finite rewards), then group drops. The zero-variance drop sees the final rewards;
dynamic sampling decides on correctness (or the reward before shaping, kept in `extra['reward_unshaped']`),
never on length, and also tells the loop to sample more prompts until the batch is full
(rewardlab.sampling.collect).
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rollout import Batch


class Filter:
    """Base class: subclasses implement `keep(batch) -> list[int]`."""

    name = "filter"
    order = 10

    def __init__(self) -> None:
        self.last_metrics: dict[str, float] = {}

    def keep(self, batch: Batch) -> list[int]:
        raise NotImplementedError

    def __call__(self, batch: Batch) -> Batch:
        rows = self.keep(batch)
        self.last_metrics = {f"filter/{self.name}/dropped": float(len(batch) - len(rows))}
        return batch if len(rows) == len(batch) else batch.select(rows)


class DropNonFinite(Filter):
    """Drops rows whose combined reward is NaN or infinite (a broken reward must not train the policy)."""

    name = "nonfinite"

    def keep(self, batch: Batch) -> list[int]:
        rows = [i for i, r in enumerate(batch.reward) if r is not None and math.isfinite(r)]
        if len(rows) < len(batch):
            warnings.warn(f"{len(batch) - len(rows)} of {len(batch)} rollouts have a NaN or infinite reward: "
                          f"dropped before the update (counted in filter/nonfinite/dropped)")
        return rows


class DropZeroVarianceGroups(Filter):
    """Drops groups whose rewards are all equal: they carry no signal for group-relative advantages."""

    name = "zero_variance"
    order = 20

    def keep(self, batch: Batch) -> list[int]:
        out: list[int] = []
        for rows in batch.groups().values():
            if len({batch.reward[i] for i in rows}) > 1:
                out.extend(rows)
        return out


@schema("filter", "dynamic_sampling")
class DynamicSamplingConfig:
    _target_: str = "rewardlab.filters.DynamicSampling"
    max_rounds: int = 4  # generate-and-score rounds per iteration at most (the first included)
    metric: str = "gold"  # gold (verifiable correctness) | reward (before any length penalty) | a reward column


class DynamicSampling(Filter):
    """DAPO dynamic sampling: keep a group only when its `metric` differs within it (for correctness:
    0 < correct < G, verl's `filter_groups.metric: acc`), and have the loop sample more prompts until
    `run.prompts_per_iteration` groups are kept, in at most `max_rounds` rounds. No length penalty enters
    the decision, so all-correct groups of different lengths are dropped: they carry no correctness signal."""

    name = "dynamic_sampling"
    order = 20

    def __init__(self, max_rounds: int = 4, metric: str = "gold") -> None:
        super().__init__()
        if max_rounds < 1:
            raise UserError(f"filters.dynamic_sampling.max_rounds={max_rounds} must be at least 1")
        self.max_rounds, self.metric = max_rounds, metric

    def values(self, batch: Batch) -> list[float | None]:
        """The column the decision is made on."""
        if self.metric == "gold":
            if batch.gold is None:
                raise UserError("filters.dynamic_sampling.metric=gold needs reference answers and this data set has "
                                "none: set filters.dynamic_sampling.metric=reward or a reward component's name")
            return batch.gold
        if self.metric == "reward":
            return batch.extra.get("reward_unshaped", batch.reward)
        if self.metric not in batch.rewards:
            raise UserError(f"filters.dynamic_sampling.metric={self.metric!r} is not gold, reward or a reward "
                            f"column of this run ({', '.join(batch.rewards) or 'none'})")
        return batch.rewards[self.metric]

    def keep(self, batch: Batch) -> list[int]:
        values = self.values(batch)
        out: list[int] = []
        for rows in batch.groups().values():
            if len({values[i] for i in rows if values[i] is not None and math.isfinite(values[i])}) > 1:
                out.extend(rows)
        return out


@schema("filter", "overlong")
class OverlongConfig:
    _target_: str = "rewardlab.filters.OverlongPenalty"
    max_length: int = 48  # L_max in tokens (the preset sets it to generation.sampling.max_new_tokens)
    cache: int = 8  # L_cache: the penalty ramps linearly over the last `cache` tokens
    column: Optional[str] = "overlong"  # reward column the penalty is recorded in


class OverlongPenalty(Filter):
    """DAPO's overlong penalty, added to the reward: 0 up to L_max - L_cache tokens, then linear down to
    -1 at L_max, and -1 beyond. Keeps every row."""

    name = "overlong"
    order = 0

    def __init__(self, max_length: int = 48, cache: int = 8, column: str | None = "overlong") -> None:
        super().__init__()
        if not 0 < cache <= max_length:
            raise UserError(f"filters.overlong needs 0 < cache <= max_length, got cache={cache}, "
                            f"max_length={max_length}")
        self.max_length, self.cache, self.column = max_length, cache, column

    def penalty(self, length: int) -> float:
        free = self.max_length - self.cache
        if length <= free:
            return 0.0
        if length <= self.max_length:
            return (free - length) / self.cache
        return -1.0

    def __call__(self, batch: Batch) -> Batch:
        penalties = [self.penalty(len(ids)) for ids in batch.completion_ids]
        batch.extra.setdefault("reward_unshaped", list(batch.reward))
        batch.reward = [r + p for r, p in zip(batch.reward, penalties)]
        if self.column:
            batch.rewards[self.column] = penalties
        self.last_metrics = {f"filter/{self.name}/penalized": sum(p < 0 for p in penalties) / max(len(batch), 1),
                             f"filter/{self.name}/mean": sum(penalties) / max(len(batch), 1)}
        return batch
