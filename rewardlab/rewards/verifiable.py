"""The verifiable reward (`reward=verifiable`): `correct` when the completion's final answer is equivalent
to the reference. Extraction and equivalence live in rewardlab.answers, shared with the data sets,
evaluation and the gold column."""

from __future__ import annotations

from rewardlab.answers import check
from rewardlab.config import schema
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch


@schema("reward", "verifiable")
class VerifiableConfig:
    _target_: str = "rewardlab.rewards.verifiable.VerifiableReward"
    name: str = "verifiable"
    answer_format: str = "auto"  # auto | hash | boxed | last_number
    correct: float = 1.0
    incorrect: float = 0.0


class VerifiableReward(Reward):
    """`correct` when the extracted answer is equivalent to the reference, else `incorrect`."""

    def __init__(self, name: str = "verifiable", answer_format: str = "auto", correct: float = 1.0,
                 incorrect: float = 0.0) -> None:
        super().__init__(name)
        self.answer_format = answer_format
        self.correct, self.incorrect = correct, incorrect
        self.passing = correct

    def compute(self, batch: Batch) -> list[float]:
        ok = check(batch.completion, batch.reference, self.answer_format)
        return [self.correct if v else self.incorrect for v in ok]
