"""Shared builders for the reward tests: batches from plain text, tiny random models saved locally."""

from __future__ import annotations

from pathlib import Path

import torch

from rewardlab.policy.tiny import build_tokenizer, save_char_tokenizer
from rewardlab.rollout import Batch


def make_batch(prompts, completions, references=None, solutions=None, prompt_ids=None, tokenizer=None) -> Batch:
    """A Batch of rows; `prompt_ids` (row -> group id) defaults to the prompt text."""
    n = len(completions)
    encode = (lambda t: tokenizer.encode(t, add_special_tokens=False)) if tokenizer else (lambda t: list(range(len(t))))
    return Batch(prompt_id=list(prompt_ids or prompts), prompt=list(prompts), completion=list(completions),
                 prompt_ids=[encode(p) for p in prompts], completion_ids=[encode(c) for c in completions],
                 finish_reason=["stop"] * n, reference=list(references or [None] * n),
                 solution=list(solutions or [None] * n))


def save_tiny(directory: Path, kind: str, special: list[str] | None = None, num_labels: int = 2,
              chat_template: str | None = None, seed: int = 0) -> Path:
    """A randomly initialized tiny Llama (`causal`, `token`, `sequence` head) + char tokenizer, saved."""
    from transformers import (LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification,
                              LlamaForTokenClassification)

    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special})
    if chat_template:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id, num_labels=num_labels)
    cls = {"causal": LlamaForCausalLM, "token": LlamaForTokenClassification,
           "sequence": LlamaForSequenceClassification}[kind]
    model = cls(config)
    model.save_pretrained(directory)
    save_char_tokenizer(tokenizer, directory)
    return directory


class StepReward:
    """A fake process reward for composition tests: each completion line is a step score; outcome = min."""

    def __init__(self, name: str = "steps") -> None:
        self.name = name

    def bind(self, policy) -> None: ...

    def metrics(self, batch) -> dict:
        return {}

    def score(self, batch) -> None:
        batch.step_rewards = [[float(x) for x in c.split("\n")] for c in batch.completion]
        batch.rewards[self.name] = [min(s) for s in batch.step_rewards]
        batch.reward = list(batch.rewards[self.name])
