"""Outcome reward models (`reward=orm`): a sequence classifier's scalar (Bradley–Terry reward model).

The conversation the policy was shown (its raw messages, never the policy's rendered prompt) plus the
completion as the assistant's turn goes through the reward model's own chat template when its tokenizer
has one (as reward models are trained; the template writes its own BOS), else the raw question and the
completion as plain text with the tokenizer's own special tokens. The score is the first logit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch


@schema("reward", "orm")
@dataclass
class ORMConfig:
    _target_: str = "rewardlab.rewards.orm.ORMReward"
    name: str = "orm"
    model: Optional[str] = None  # local directory or hub id of a sequence-classification reward model
    batch_size: int = 16
    max_length: int = 4096
    device: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False


def orm_text(tokenizer, messages: list[dict[str, str]], completion: str) -> str:
    """What the reward model reads: its chat template over the conversation and the reply, or plain text
    (then encoded with the tokenizer's own special tokens). `rewardlab train-rm` trains on the same text."""
    if tokenizer.chat_template:
        exchange = [*messages, {"role": "assistant", "content": completion}]
        return tokenizer.apply_chat_template(exchange, tokenize=False)
    return [m["content"] for m in messages if m["role"] == "user"][-1] + completion


class ORMReward(Reward):
    """Scalar score of each (prompt, completion) from a sequence-classification reward model."""

    def __init__(self, name: str = "orm", model: str | None = None, batch_size: int = 16, max_length: int = 4096,
                 device: str = "auto", dtype: str = "float32", trust_remote_code: bool = False) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from rewardlab.policy import _DTYPES, resolve_device

        super().__init__(name)
        if model is None:
            raise UserError("reward=orm needs reward.model=<local directory or hub id of a reward model>")
        if dtype not in _DTYPES:
            raise UserError(f"reward.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
            loaded = AutoModelForSequenceClassification.from_pretrained(
                model, dtype=_DTYPES[dtype], trust_remote_code=trust_remote_code)
        except (OSError, ValueError) as exc:
            raise UserError(f"reward.model={model} is not a loadable sequence-classification model "
                            f"({str(exc).splitlines()[0]}); give a local directory or a hub id") from exc
        self.device = resolve_device(device)
        self.model = loaded.to(self.device).eval()
        self.batch_size, self.max_length = batch_size, max_length
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id

    def text(self, messages: list[dict[str, str]], completion: str) -> str:
        return orm_text(self.tokenizer, messages, completion)

    @torch.inference_mode()
    def compute(self, batch: Batch) -> list[float]:
        texts = [self.text(batch.conversation(i), c) for i, c in enumerate(batch.completion)]
        templated = bool(self.tokenizer.chat_template)  # a template writes its own specials (BOS included)
        scores: list[float] = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start : start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=True, max_length=self.max_length, add_special_tokens=not templated)
            logits = self.model(**enc.to(self.device)).logits
            scores.extend(float(v) for v in logits[:, 0].float().tolist())
        return scores
