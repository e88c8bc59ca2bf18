"""Majority vote (`reward=majority_vote`, test-time RL): the group's most common answer is the label.

No reference is needed: within each prompt's group the answers are clustered by mathematical
equivalence, the largest cluster's answer is the pseudo-label, and a completion scores 1 when its
answer equals it (completions with no answer never vote and score 0).
"""

from __future__ import annotations

from rewardlab.answers import answer_clusters, extract_answer
from rewardlab.config import schema
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch


@schema("reward", "majority_vote")
class MajorityVoteConfig:
    _target_: str = "rewardlab.rewards.majority_vote.MajorityVoteReward"
    name: str = "majority_vote"
    answer_format: str = "auto"  # auto | hash | boxed | last_number


def majority_labels(answers: list[str | None]) -> list[float]:
    """1.0 for rows whose answer is in the largest equivalence cluster (ties: first seen), else 0.0."""
    clusters = answer_clusters(answers)
    winner = set(max(clusters, key=len)) if clusters else set()
    return [float(i in winner) for i in range(len(answers))]


class MajorityVoteReward(Reward):
    """1 when the completion's answer agrees with its group's majority answer, else 0."""

    def __init__(self, name: str = "majority_vote", answer_format: str = "auto") -> None:
        super().__init__(name)
        self.answer_format = answer_format
        self.passing = 1.0

    def compute(self, batch: Batch) -> list[float]:
        out = [0.0] * len(batch)
        for rows in batch.groups().values():
            labels = majority_labels([extract_answer(batch.completion[i], self.answer_format) for i in rows])
            for i, label in zip(rows, labels):
                out[i] = label
        return out
