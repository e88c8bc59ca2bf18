"""Self-certainty (`reward=self_certainty`, Intuitor): how far the policy's next-token distributions
are from uniform, from its own logits; no labels needed.

Per completion token t: KL(U ‖ p_t) = −log V − (1/V)·Σ_v log p_t(v); the reward is the mean over the
completion's tokens. `completion_logits` (shared with the reference-likelihood reward) runs the policy
over (context, target) token rows in right-padded batches.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch


def completion_logits(policy, rows: list[tuple[list[int], list[int]]], batch_size: int) -> Iterator[torch.Tensor]:
    """For each (context ids, target ids) row, the (len(target), V) float logits predicting the target."""
    pad = policy.tokenizer.pad_token_id
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        seqs = [c + t for c, t in chunk]
        width = max(map(len, seqs))
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs], device=policy.device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=policy.device)
        with torch.inference_mode():
            logits = policy.model(input_ids=ids, attention_mask=mask).logits
        for row, (context, target) in enumerate(chunk):
            yield logits[row, len(context) - 1 : len(context) + len(target) - 1].float()


def require_policy(reward: Reward) -> None:
    """Rewards that read the policy's logits fail clearly when scored without one."""
    if reward.policy is None:
        raise UserError(f"reward {reward.name} reads the policy's logits but none was bound; "
                        f"score it inside a run or with `rewardlab score ... policy=...`")


@schema("reward", "self_certainty")
class SelfCertaintyConfig:
    _target_: str = "rewardlab.rewards.self_certainty.SelfCertaintyReward"
    name: str = "self_certainty"
    batch_size: int = 32


class SelfCertaintyReward(Reward):
    """Mean over completion tokens of KL(uniform ‖ p_t) under the current policy (0 for empty completions)."""

    def __init__(self, name: str = "self_certainty", batch_size: int = 32) -> None:
        super().__init__(name)
        self.batch_size, self.policy = batch_size, None

    def bind(self, policy) -> None:
        self.policy = policy

    def compute(self, batch: Batch) -> list[float]:
        require_policy(self)
        rows = [(list(p), list(c)) for p, c in zip(batch.prompt_ids, batch.completion_ids)]
        out = []
        for logits in completion_logits(self.policy, rows, self.batch_size):
            if logits.shape[0] == 0:
                out.append(0.0)
                continue
            vocab = logits.shape[-1]
            kl = -math.log(vocab) - logits.log_softmax(-1).mean(-1)
            out.append(float(kl.mean()))
        return out
