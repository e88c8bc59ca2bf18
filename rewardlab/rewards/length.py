"""Length terms (`reward=length`): a linear penalty on completion tokens, or closeness to a target."""

from __future__ import annotations

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch


@schema("reward", "length")
class LengthConfig:
    _target_: str = "rewardlab.rewards.length.LengthReward"
    name: str = "length"
    mode: str = "penalty"  # penalty: -coef * tokens | target: -coef * |tokens - target| / target
    coef: float = 0.01
    target: int = 0


class LengthReward(Reward):
    """`penalty`: -coef·L; `target`: -coef·|L − target|/target, with L the completion's token count."""

    def __init__(self, name: str = "length", mode: str = "penalty", coef: float = 0.01, target: int = 0) -> None:
        super().__init__(name)
        if mode not in ("penalty", "target"):
            raise UserError(f"reward.mode={mode!r} is not one of penalty, target")
        if mode == "target" and target <= 0:
            raise UserError("reward.mode=target needs reward.target=<tokens> (a positive length)")
        self.mode, self.coef, self.target = mode, coef, target

    def compute(self, batch: Batch) -> list[float]:
        lengths = [len(ids) for ids in batch.completion_ids]
        if self.mode == "penalty":
            return [-self.coef * n for n in lengths]
        return [-self.coef * abs(n - self.target) / self.target for n in lengths]
