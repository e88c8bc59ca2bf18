"""The transformers backend: batched decoding with the policy's own model, left padding, stopping at EOS:
any of the policy's stop ids (the tokenizer's EOS and every EOS of the model's generation_config.json).
A completion that stops keeps its stop token in `completion_ids` (its log-prob is trained) and drops it
from the decoded text.

Two engines (`generation.engine`). `native` (the default) is a KV-cache decode loop over the model's
forward: each distinct prompt is prefilled once and its cache repeated for its `n` samples, and rows
that have emitted EOS leave the batch (their cache rows are dropped), so no compute goes to finished
rows or duplicate prompts. `generate` calls transformers' `model.generate`, which keeps finished rows
in the batch and prefills every copy of a prompt; it is kept for models whose cache cannot drop rows.
On the embedded task `native` is ~25% faster (BENCHMARKS.md) and greedy outputs are identical. For the
Llama family (`fused_step.py`: Llama, Qwen2, Mistral with plain weights) `native` runs the prefill and each step
with its own few tensor operations instead of the model's forward (`fused_step`, default on; the same logits to
rounding, tested against the forward). Without top-k/top-p it samples by the inverse CDF (`sample_categorical`).

Sampling follows transformers' warpers (temperature, then top-k, then top-p). The log-probs recorded
are under the temperature-scaled distribution, the same quantity the policy-gradient loss recomputes
(identical to the sampling distribution when top_p=1 and top_k=0). With `generate` they are recorded
by a logits processor that keeps one (rows, vocab) buffer, so memory stays O(rows x steps).
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch
from transformers import DynamicCache, GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from rewardlab.errors import UserError
from rewardlab.generation.fused_step import FusedStep, fused_step_unsupported

from rewardlab.config import schema
from rewardlab.data.base import Example
from rewardlab.policy import stop_token_ids
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
    engine: str = "native"  # native (KV-cache loop that drops finished rows) | generate (model.generate)
    fused_step: bool = True  # native engine, Llama/Qwen2/Mistral models: decode with rewardlab's own step (fused_step.py)
    sampling: Sampling = field(default_factory=Sampling)

ENGINES = ("native", "generate")


def decode_completions(tokenizer, completion_ids: list[list[int]], finish_reason: list[str]) -> list[str]:
    """The completions' text without their stop token (some chat models' EOS ids are not special tokens)."""
    kept = [ids[:-1] if reason == "stop" else ids for ids, reason in zip(completion_ids, finish_reason)]
    return tokenizer.batch_decode(kept, skip_special_tokens=True)


def token_entropy(logps: torch.Tensor) -> torch.Tensor:
    """Entropy of each row of a log-softmax: -sum p log p over the vocabulary."""
    return -(logps.exp() * logps).sum(dim=-1)


def sample_categorical(probs: torch.Tensor) -> torch.Tensor:
    """One token per row of `probs` (rows, vocab), by the inverse of each row's cumulative distribution: one
    uniform number per row, where `torch.multinomial` draws an exponential per vocabulary entry (most of a small
    model's sampling time). Tokens of probability 0 are never drawn (tests/test_generation.py checks the
    frequencies)."""
    cdf = probs.cumsum(dim=-1)
    total = cdf[:, -1:]
    # u < 1, so u * total < total (rounding cannot reach it): the index is always that of a token with probability
    u = torch.rand(total.shape, device=probs.device, dtype=cdf.dtype) * total
    return torch.searchsorted(cdf, u, right=True).squeeze(1)


def _rows(values: torch.Tensor, lengths: torch.Tensor) -> list[list]:
    """Each row of `values` (rows, steps) cut to its length, as Python lists."""
    return [row[:length] for row, length in zip(values.tolist(), lengths.tolist())]


class _LogprobRecorder(LogitsProcessor):
    """Records, at every step of `model.generate`, the sampled token's log-prob and the entropy of the
    temperature-scaled next-token distribution (the quantities the update's forward pass computes). Each step's
    values go into (steps, rows) buffers allocated at the first step, not a list of small per-step tensors:
    allocated between the steps' vocabulary-sized temporaries, those pin glibc's heap, which then grows by about
    a temporary's size every step (as the native loop's records did, `HFGenerator._decode_chunk`)."""

    def __init__(self, temperature: float, max_new_tokens: int) -> None:
        self.temperature = temperature
        self.max_new_tokens = max_new_tokens
        self.previous: torch.Tensor | None = None
        self.steps = 0
        self.taken = self.entropy = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.taken is None:
            self.taken, self.entropy = scores.new_empty((2, self.max_new_tokens, scores.shape[0]), dtype=torch.float32)
        if self.previous is not None:
            self.taken[self.steps - 1] = self.previous.gather(1, input_ids[:, -1:]).squeeze(1)
        self.previous = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.entropy[self.steps] = token_entropy(self.previous)
        self.steps += 1
        return scores

    def finish(self, last_tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, steps) log-probs of the generated tokens and (rows, steps) entropies."""
        self.taken[self.steps - 1] = self.previous.gather(1, last_tokens[:, None]).squeeze(1)
        return self.taken[: self.steps].T, self.entropy[: self.steps].T


@contextlib.contextmanager
def _own_settings_only(model):
    """`model.generate` under transformers' global defaults plus our arguments: the model's own
    generation_config.json (e.g. Qwen's repetition_penalty, top_k) would otherwise fill every setting we leave
    unset, changing what is sampled and making the recorded log-probs differ from what the loss recomputes."""
    own = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = own


class HFGenerator:
    """Generates with the policy's own model; `sync` is a no-op because it shares the weights."""

    def __init__(self, policy, batch_size: int = 256, sampling: Sampling | dict | None = None,
                 engine: str = "native", fused_step: bool = True) -> None:
        if engine not in ENGINES:
            raise UserError(f"generation.engine={engine!r} is not one of {', '.join(ENGINES)}")
        self.policy = policy
        self.batch_size = batch_size
        self.engine = engine
        self.fused_step = fused_step
        self.sampling = sampling if isinstance(sampling, Sampling) else Sampling(**(sampling or {}))

    def sync(self, policy) -> None:
        self.policy = policy

    def describe(self) -> str:
        """How this generator decodes, for the run's log."""
        if self.engine == "generate":
            return "decoding: transformers' model.generate"
        refused = fused_step_unsupported(self.policy.model) if self.fused_step else "generation.fused_step=false"
        if refused is None:
            return "decoding: native engine, rewardlab's own prefill and step (generation/fused_step.py)"
        return f"decoding: native engine, the model's forward at each step ({refused})"

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
        entropies: list[list[float]] = []
        finish: list[str] = []
        stops = set(stop_token_ids(model, tokenizer))
        was_training = model.training
        model.eval()
        per_chunk = max(1, self.batch_size // n)  # whole prompts per chunk (native prefills each prompt once)
        fused = FusedStep(model) if self.engine == "native" and self.fused_step and not fused_step_unsupported(
            model) else None  # weights read once per call: they change between updates
        for start in range(0, len(encoded), per_chunk):
            chunk = encoded[start : start + per_chunk]
            if self.engine == "native":
                ids, logps, entropy = self._decode_chunk(chunk, n, sampling, greedy, fused)
            else:
                ids, logps, entropy = self._generate_chunk([r for r in chunk for _ in range(n)], sampling, greedy)
            for row_tokens, row_logps, row_entropy in zip(ids, logps, entropy):
                completion_ids.append(row_tokens)
                logprobs.append(row_logps)
                entropies.append(row_entropy)
                finish.append("stop" if row_tokens and row_tokens[-1] in stops else "length")
        model.train(was_training)
        texts = decode_completions(tokenizer, completion_ids, finish)
        return Batch(
            prompt_id=[ex.id for ex in rows], prompt=[ex.prompt for ex in rows], completion=texts,
            prompt_ids=row_ids, completion_ids=completion_ids, finish_reason=finish,
            reference=[ex.answer for ex in rows], solution=[ex.solution for ex in rows],
            question=[ex.question for ex in rows], messages=[ex.messages for ex in rows],
            sample_logprobs=None if greedy else logprobs, sample_entropy=None if greedy else entropies,
        )

    @staticmethod
    def _cache_argument(model) -> str:
        """The forward's name for the KV cache: `cache` in newer transformers, `past_key_values` before."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"

    def _decode_chunk(self, prompts: list[list[int]], n: int, sampling: Sampling, greedy: bool,
                      fused: FusedStep | None = None):
        """`n` completions for each of `prompts` (token ids): prefill once per prompt, repeat the cache
        `n` times, then decode one token per step for the rows that have not yet emitted a stop id (with
        `fused`'s own step where given, else the model's forward)."""
        tokenizer, model, device = self.policy.tokenizer, self.policy.model, self.policy.device
        pad = tokenizer.pad_token_id
        stops = torch.tensor(stop_token_ids(model, tokenizer), device=device)
        width = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in prompts], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in prompts], device=device)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        rows = len(prompts) * n
        max_new = sampling.max_new_tokens
        if fused is not None:
            logits = fused.prefill(input_ids, attention, n, max_new)
        else:
            cache = DynamicCache(config=model.config)
            key = self._cache_argument(model)
            logits = model(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=True,
                           logits_to_keep=1, **{key: cache}).logits[:, -1].repeat_interleave(n, dim=0)
            cache.batch_repeat_interleave(n)
        attention = attention.repeat_interleave(n, dim=0)
        next_position = positions[:, -1:].repeat_interleave(n, dim=0) + 1
        active = torch.arange(rows, device=device)
        warpers = [] if greedy else [w for w in (
            TopKLogitsWarper(sampling.top_k) if sampling.top_k > 0 else None,
            TopPLogitsWarper(sampling.top_p) if sampling.top_p < 1.0 else None) if w is not None]
        # step s's live rows, their tokens (and log-probs, entropies) go to row s of buffers allocated once, then
        # into (rows, steps) at the end. Not a list of each step's small tensors: allocated between the steps' large
        # temporaries (logits over the vocabulary), they pin glibc's heap, which then grows by about the
        # temporaries' size every step (~8 GB over 256 steps at Qwen2.5-0.5B's vocabulary, bench/real_shape.py)
        live = torch.empty((max_new, rows), dtype=torch.long, device=device)
        sampled = torch.empty_like(live)
        chosen_logps, entropies = torch.empty((2, max_new, rows), device=device)
        counts: list[int] = []
        for step in range(max_new):
            scaled = logits.float()
            n_live = len(active)
            counts.append(n_live)
            live[step, :n_live] = active
            if greedy:
                chosen = scaled.argmax(dim=-1)
                sampled[step, :n_live] = chosen
            else:
                if sampling.temperature != 1.0:
                    scaled = scaled / sampling.temperature
                step_logps = torch.log_softmax(scaled, dim=-1)
                if warpers:
                    warped = scaled
                    for warp in warpers:
                        warped = warp(None, warped)
                    chosen = torch.multinomial(torch.softmax(warped, dim=-1), 1).squeeze(1)
                    step_entropy = token_entropy(step_logps)
                else:
                    probs = step_logps.exp()
                    chosen = sample_categorical(probs)
                    step_entropy = -(probs * step_logps).sum(dim=-1)
                sampled[step, :n_live] = chosen
                chosen_logps[step, :n_live] = step_logps.gather(1, chosen[:, None]).squeeze(1)
                entropies[step, :n_live] = step_entropy
            if step == max_new - 1:
                break
            keep = (~torch.isin(chosen, stops)).nonzero().squeeze(1)
            if len(keep) == 0:
                break
            if len(keep) < len(active):  # finished rows leave the batch and the cache
                if fused is not None:
                    fused.select(keep)
                else:
                    cache.batch_select_indices(keep)
                active, chosen, attention, next_position = active[keep], chosen[keep], attention[keep], next_position[keep]
            if fused is not None:
                logits = fused.step(chosen, next_position)
            else:
                attention = torch.cat([attention, attention.new_ones((len(active), 1))], dim=1)
                logits = model(input_ids=chosen[:, None], attention_mask=attention, position_ids=next_position,
                               use_cache=True, **{key: cache}).logits[:, -1]
            next_position = next_position + 1
        steps = len(counts)
        valid = torch.arange(rows, device=device)[None] < torch.tensor(counts, device=device)[:, None]  # (steps, rows)
        where = live[:steps][valid]
        column = torch.arange(steps, device=device)[:, None].expand(steps, rows)[valid]
        lengths = torch.bincount(where, minlength=rows)
        tokens = torch.full((rows, max_new), pad, dtype=torch.long, device=device)
        tokens[where, column] = sampled[:steps][valid]
        if greedy:
            return _rows(tokens, lengths), [[] for _ in lengths], [[] for _ in lengths]
        logps, entropy = torch.zeros((2, rows, max_new), device=device)
        logps[where, column] = chosen_logps[:steps][valid]
        entropy[where, column] = entropies[:steps][valid]
        return _rows(tokens, lengths), _rows(logps, lengths), _rows(entropy, lengths)

    def _generate_chunk(self, chunk: list[list[int]], sampling: Sampling, greedy: bool):
        tokenizer, model, device = self.policy.tokenizer, self.policy.model, self.policy.device
        width = max(map(len, chunk))
        pad = tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in chunk], device=device)
        attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in chunk], device=device)
        stops = stop_token_ids(model, tokenizer)
        recorder = None if greedy else _LogprobRecorder(sampling.temperature, sampling.max_new_tokens)
        kwargs = dict(do_sample=False) if greedy else dict(
            do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
            logits_processor=LogitsProcessorList([recorder]))
        with _own_settings_only(model):
            out = model.generate(input_ids=input_ids, attention_mask=attention, max_new_tokens=sampling.max_new_tokens,
                                 pad_token_id=pad, eos_token_id=list(stops), **kwargs)
        generated = out[:, width:]
        logps, entropy = recorder.finish(generated[:, -1]) if recorder is not None else (None, None)
        is_eos = torch.isin(generated, torch.tensor(stops, device=generated.device))
        has_eos = is_eos.any(dim=1)
        lengths = torch.where(has_eos, is_eos.int().argmax(dim=1) + 1, torch.full_like(has_eos, generated.shape[1], dtype=torch.long))
        if logps is None:
            return _rows(generated, lengths), [[] for _ in lengths], [[] for _ in lengths]
        return _rows(generated, lengths), _rows(logps, lengths), _rows(entropy, lengths)
