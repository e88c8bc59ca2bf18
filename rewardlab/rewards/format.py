"""Format reward (`reward=format`): did the completion follow the required answer format."""

from __future__ import annotations

import re
from typing import Optional

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.answers import extract_answer
from rewardlab.rollout import Batch


@schema("reward", "format")
class FormatConfig:
    _target_: str = "rewardlab.rewards.format.FormatReward"
    name: str = "format"
    answer_format: str = "hash"  # hash | boxed: an answer in that form must be extractable
    pattern: Optional[str] = None  # a regex the whole completion must match instead (re.fullmatch, DOTALL)
    correct: float = 1.0
    incorrect: float = 0.0


class FormatReward(Reward):
    """`correct` when the completion matches `pattern` (or has an answer in `answer_format`), else `incorrect`."""

    def __init__(self, name: str = "format", answer_format: str = "hash", pattern: str | None = None,
                 correct: float = 1.0, incorrect: float = 0.0) -> None:
        super().__init__(name)
        if answer_format not in ("hash", "boxed"):
            raise UserError(f"reward.answer_format={answer_format!r} is not one of hash, boxed")
        try:
            self.pattern = re.compile(pattern, re.DOTALL) if pattern else None
        except re.error as exc:
            raise UserError(f"reward.pattern={pattern!r} is not a valid regular expression ({exc})") from exc
        self.answer_format, self.correct, self.incorrect = answer_format, correct, incorrect
        self.passing = correct

    def follows(self, completion: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(completion.strip()) is not None
        return extract_answer(completion, self.answer_format) is not None

    def compute(self, batch: Batch) -> list[float]:
        return [self.correct if self.follows(c) else self.incorrect for c in batch.completion]
