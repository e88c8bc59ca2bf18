"""The transformers backend: batched `generate` with left padding, stopping at EOS.

Sampling log-probs are recorded during generation by a logits processor that keeps one
(rows, vocab) buffer: at step t it sees the token sampled at t-1 in `input_ids` and gathers its
log-prob, so memory stays O(rows x steps) even for a 150k vocabulary. They are log-probs under the
temperature-scaled distribution, the same quantity the policy-gradient loss recomputes (identical to
the sampling distribution when top_p=1 and top_k=0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from rewardlab.config import schema
from rewardlab.data.base import Example
from rewardlab.rollout import Batch


@dataclass
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 48


@schema("generation", "hf")
class HFConfig:
    _target_: str = "rewardlab.generation.hf.HFGenerator"
    batch_size: int = 256  # rows per generate call
    sampling: Sampling = field(default_factory=Sampling)


class _LogprobRecorder(LogitsProcessor):
    def __init__(self, temperature: float) -> None:
        self.temperature = temperature
        self.previous: torch.Tensor | None = None
        self.taken: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.taken.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(rows, steps) log-probs of the generated tokens."""
        self.taken.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        return torch.stack(self.taken, dim=1)


class HFGenerator:
    """Generates with the policy's own model; `sync` is a no-op because it shares the weights."""

    def __init__(self, policy, batch_size: int = 256, sampling: Sampling | dict | None = None) -> None:
        self.policy = policy
        self.batch_size = batch_size
        self.sampling = sampling if isinstance(sampling, Sampling) else Sampling(**(sampling or {}))

    def sync(self, policy) -> None:
        self.policy = policy

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Example], n: int = 1, sampling: Sampling | None = None,
                 greedy: bool = False) -> Batch:
        """`n` completions per prompt, rows grouped by prompt; greedy decoding when `greedy`."""
        sampling = sampling or self.sampling
        tokenizer, model = self.policy.tokenizer, self.policy.model
        rows = [ex for ex in prompts for _ in range(n)]
        encoded = [tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] for ex in prompts]
        row_ids = [ids for ids in encoded for _ in range(n)]
        completion_ids: list[list[int]] = []
        logprobs: list[list[float]] = []
        finish: list[str] = []
        was_training = model.training
        model.eval()
        for start in range(0, len(rows), self.batch_size):
            chunk = row_ids[start : start + self.batch_size]
            ids, logps = self._generate_chunk(chunk, sampling, greedy)
            for row_tokens, row_logps in zip(ids, logps):
                completion_ids.append(row_tokens)
                logprobs.append(row_logps)
                finish.append("stop" if row_tokens and row_tokens[-1] == tokenizer.eos_token_id else "length")
        model.train(was_training)
        texts = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        return Batch(
            prompt_id=[ex.id for ex in rows], prompt=[ex.prompt for ex in rows], completion=texts,
            prompt_ids=row_ids, completion_ids=completion_ids, finish_reason=finish,
            reference=[ex.answer for ex in rows], solution=[ex.solution for ex in rows],
            sample_logprobs=None if greedy else logprobs,
        )

    def _generate_chunk(self, chunk: list[list[int]], sampling: Sampling, greedy: bool):
        tokenizer, model, device = self.policy.tokenizer, self.policy.model, self.policy.device
        width = max(map(len, chunk))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
        recorder = None if greedy else _LogprobRecorder(sampling.temperature)
        kwargs = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            logits_processor=LogitsProcessorList([recorder]))
        out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=sampling.max_new_tokens,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id, **kwargs)
        generated = out[:, width:]
        logps = recorder.finish(generated[:, -1]) if recorder is not None else None
        eos = tokenizer.eos_token_id
        is_eos = generated == eos
        has_eos = is_eos.any(dim=1)
        lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, torch.full_like(has_eos, generated.shape[1], dtype=torch.long))
        tokens = generated.tolist()
        lengths_list = lengths.tolist()
        ids = [row[:length] for row, length in zip(tokens, lengths_list)]
        if logps is None:
            return ids, [[] for _ in ids]
        logp_list = logps.tolist()
        return ids, [row[:length] for row, length in zip(logp_list, lengths_list)]
