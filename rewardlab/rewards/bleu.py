"""BLEU against the reference response (`reward=bleu`, BLEUBERI), via sacrebleu's sentence BLEU."""

from __future__ import annotations

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch


@schema("reward", "bleu")
class BleuConfig:
    _target_: str = "rewardlab.rewards.bleu.BleuReward"
    name: str = "bleu"
    tokenize: str = "13a"  # sacrebleu tokenizer
    smooth_method: str = "exp"


class BleuReward(Reward):
    """Sentence BLEU / 100 of each completion against its row's reference response (`solution`)."""

    def __init__(self, name: str = "bleu", tokenize: str = "13a", smooth_method: str = "exp") -> None:
        from sacrebleu.metrics import BLEU

        super().__init__(name)
        self.metric = BLEU(tokenize=tokenize, smooth_method=smooth_method, effective_order=True)

    def compute(self, batch: Batch) -> list[float]:
        if any(s is None for s in batch.solution):
            raise UserError("reward=bleu needs a reference response (`solution`) for every row; "
                            "use a data set with reference solutions")
        return [self.metric.sentence_score(c, [s]).score / 100.0 for c, s in zip(batch.completion, batch.solution)]
