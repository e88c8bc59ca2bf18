"""The reward interface: `score(batch)` adds the reward's column and sets the combined `reward`."""

from __future__ import annotations

from abc import ABC, abstractmethod

from rewardlab.rollout import Batch


class Reward(ABC):
    """A named reward component. Rewards see the whole batch (some need the group or a model)."""

    #: the score of a pass for pass/fail rewards (verifiable: `correct`), RFT's default threshold; None if graded
    passing: float | None = None
    #: whether `score` writes one score per step (`batch.step_rewards`), which process credit needs
    process: bool = False

    def __init__(self, name: str) -> None:
        self.name = name

    @abstractmethod
    def compute(self, batch: Batch) -> list[float]:
        """One score per row."""

    def score(self, batch: Batch) -> None:
        values = [float(v) for v in self.compute(batch)]
        batch.rewards[self.name] = values
        batch.reward = list(values)

    def bind(self, policy) -> None:
        """Receive the live policy before the first `score` (self-judging rewards need it); no-op by default."""

    def metrics(self, batch: Batch) -> dict[str, float]:
        """Per-iteration diagnostics of this reward (parse failures, agreement, ...); none by default."""
        return {}
