"""`rewardlab train-rm rm=orm`: a Bradley-Terry outcome reward model (num_labels=1) trained by TRL's
RewardTrainer on preference pairs (TRL's `prompt`/`chosen`/`rejected`, or a run directory's correct and incorrect
completions of one prompt), scored on the held-out pairs by pair accuracy (a tie counts half). The shared loop,
the run directory and the model's save are in rewardlab/rmlab/train.py."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

import torch

from rewardlab.config import schema
from rewardlab.rewards.orm import orm_text
from rewardlab.rmlab.rm_data import read_preferences
from rewardlab.rmlab.train import pad_id, padded


@schema("rm", "orm")
@dataclass
class ORMTrainConfig:
    _target_: str = "rewardlab.rmlab.orm_training.ORMTraining"
    data: Optional[str] = None  # a preference JSONL file, or a `rewardlab train` run directory (its rollouts)
    eval_fraction: float = 0.1
    epochs: int = 2
    lr: float = 1e-3
    batch_size: int = 16
    max_length: int = 1024
    pairs_per_prompt: int = 4  # from rollouts: at most this many (correct, incorrect) pairs per prompt


class ORMTraining:
    """A Bradley-Terry reward model (num_labels=1) through TRL's RewardTrainer."""

    def __init__(self, **settings: Any) -> None:
        self.cfg = ORMTrainConfig(**{k: v for k, v in settings.items() if k != "_target_"})

    @staticmethod
    def key(row: dict) -> str:
        return json.dumps(row["messages"])

    def read(self, seed: int) -> list[dict]:
        return read_preferences(self.cfg.data, self.cfg.pairs_per_prompt, seed)

    def build(self, source: str, tokenizer):
        from transformers import AutoModelForSequenceClassification

        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1)
        model.config.pad_token_id = pad_id(tokenizer)
        return model

    def ids(self, tokenizer, messages: list[dict], completion: str) -> list[int]:
        """The tokens reward=orm scores (its own text and special-token rule), cut to max_length."""
        return tokenizer(orm_text(tokenizer, messages, completion), add_special_tokens=not tokenizer.chat_template,
                         truncation=True, max_length=self.cfg.max_length)["input_ids"]

    def trainer(self, model, tokenizer, rows: list[dict], settings: dict):
        from datasets import Dataset
        from trl import RewardConfig, RewardTrainer

        data = Dataset.from_dict({
            "chosen_ids": [self.ids(tokenizer, r["messages"], r["chosen"]) for r in rows],
            "rejected_ids": [self.ids(tokenizer, r["messages"], r["rejected"]) for r in rows]})
        args = RewardConfig(**settings, max_length=self.cfg.max_length, gradient_checkpointing=False)
        return RewardTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)

    @torch.inference_mode()
    def evaluate(self, model, tokenizer, rows: list[dict]) -> dict[str, float]:
        device = next(model.parameters()).device
        texts = [self.ids(tokenizer, r["messages"], r[side]) for r in rows for side in ("chosen", "rejected")]
        scores: list[float] = []
        for start in range(0, len(texts), self.cfg.batch_size):
            ids, mask = padded(texts[start : start + self.cfg.batch_size], pad_id(tokenizer), device)
            scores.extend(model(input_ids=ids, attention_mask=mask).logits[:, 0].float().tolist())
        wins = [1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(scores[::2], scores[1::2])]
        return {"pair_accuracy": sum(wins) / len(wins)}
