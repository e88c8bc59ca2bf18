"""Reference likelihood (`reward=ref_likelihood`, RLPR): the policy's mean per-token probability of the
reference answer placed after the completion's own reasoning; no verifier needed.

The reasoning is the completion up to its last `answer_prefix` (the whole completion when it has
none); then `answer_prefix` + reference are appended and the reference tokens are scored. The response
text (reasoning, prefix and reference) is encoded once, after the policy's own prompt tokens, and the
reference's tokens are those whose character span reaches into the reference (offsets), so `"#### Paris"`
is scored as the model writes it (`" Paris"` one token), never as a token boundary it would not produce.
"""

from __future__ import annotations

import torch

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rewards.self_certainty import completion_logits, require_policy
from rewardlab.rollout import Batch


@schema("reward", "ref_likelihood")
class RefLikelihoodConfig:
    _target_: str = "rewardlab.rewards.ref_likelihood.RefLikelihoodReward"
    name: str = "ref_likelihood"
    answer_prefix: str = "#### "  # what introduces the final answer (arith/GSM8K style)
    batch_size: int = 32


class RefLikelihoodReward(Reward):
    """Mean probability of the reference answer's tokens given the prompt and the completion's reasoning."""

    def __init__(self, name: str = "ref_likelihood", answer_prefix: str = "#### ", batch_size: int = 32) -> None:
        super().__init__(name)
        self.answer_prefix, self.batch_size, self.policy = answer_prefix, batch_size, None

    def bind(self, policy) -> None:
        self.policy = policy

    def reasoning(self, completion: str) -> str:
        """The completion without its own final answer, ending in a newline before the prefix."""
        marker = self.answer_prefix.strip()
        cut = completion.rfind(marker) if marker else -1
        text = completion[:cut] if cut >= 0 else completion
        return text if not text.strip() or text.endswith("\n") else text + "\n"

    @staticmethod
    def split(tokenizer, context: str, reference: str) -> tuple[list[int], list[int]]:
        """`context + reference` encoded once: (tokens before the reference, the tokens that cover it)."""
        encoded = tokenizer(context + reference, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        start = next((k for k, (_, end) in enumerate(encoded["offset_mapping"]) if end > len(context)), len(ids))
        return ids[:start], ids[start:]

    def compute(self, batch: Batch) -> list[float]:
        require_policy(self)
        if any(r is None for r in batch.reference):
            raise UserError("reward=ref_likelihood needs a reference answer for every row")
        tok = self.policy.tokenizer
        if not getattr(tok, "is_fast", False):
            raise UserError("reward=ref_likelihood needs a fast (tokenizers-backed) policy tokenizer to locate the "
                            "reference's tokens by character offsets")
        rows = []
        for prompt_ids, completion, reference in zip(batch.prompt_ids, batch.completion, batch.reference):
            context, target = self.split(tok, self.reasoning(completion) + self.answer_prefix, str(reference))
            rows.append((list(prompt_ids) + context, target))
        out = []
        for (_, target), logits in zip(rows, completion_logits(self.policy, rows, self.batch_size)):
            index = torch.tensor(target, device=logits.device)[:, None]
            out.append(float(logits.softmax(-1).gather(1, index).mean()))
        return out
