"""Filters: what is kept between scoring and the update. Each is `Filter(batch) -> Batch` and
reports what it dropped through `last_metrics`."""

from __future__ import annotations

import math

from rewardlab.rollout import Batch


class Filter:
    """Base class: subclasses implement `keep(batch) -> list[int]`."""

    name = "filter"

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
        return [i for i, r in enumerate(batch.reward) if r is not None and math.isfinite(r)]


class DropZeroVarianceGroups(Filter):
    """Drops groups whose rewards are all equal: they carry no signal for group-relative advantages."""

    name = "zero_variance"

    def keep(self, batch: Batch) -> list[int]:
        out: list[int] = []
        for rows in batch.groups().values():
            if len({batch.reward[i] for i in rows}) > 1:
                out.extend(rows)
        return out
