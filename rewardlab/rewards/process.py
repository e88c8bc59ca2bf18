"""The process-reward base class: one score per step, split by the shared `StepSplit` (rewardlab.steps)."""

from __future__ import annotations

from abc import abstractmethod

from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch
from rewardlab.steps import StepSplit, aggregate_steps, split_steps


class ProcessReward(Reward):
    """A reward with one score per step: `score_steps(batch, steps)` gives them; this class splits the
    completions with the shared `StepSplit`, writes `batch.steps` / `batch.step_rewards`, and sets the
    scalar reward to their `aggregate` (min, last, prod, mean or sum; a completion with no step gets
    `empty`)."""

    AGGREGATES = ("min", "last", "prod", "mean", "sum")
    process = True

    def __init__(self, name: str, split: StepSplit | dict | None = None, aggregate: str = "min",
                 empty: float = 0.0) -> None:
        super().__init__(name)
        if aggregate not in self.AGGREGATES:
            raise UserError(f"reward.aggregate={aggregate!r} is not one of {', '.join(self.AGGREGATES)}")
        self.split = split if isinstance(split, StepSplit) else StepSplit(**(split or {}))
        self.aggregate, self.empty = aggregate, empty

    @abstractmethod
    def score_steps(self, batch: Batch, steps: list[list[str]]) -> list[list[float]]:
        """One score per step for every row."""

    def compute(self, batch: Batch) -> list[float]:
        steps = [split_steps(text, self.split) for text in batch.completion]
        scores = [[float(v) for v in row] for row in self.score_steps(batch, steps)]
        batch.steps, batch.step_rewards = steps, scores
        return [aggregate_steps(row, self.aggregate, self.empty) for row in scores]
