"""Native policy-gradient update (GRPO family), written here because TRL's GRPOTrainer owns its own
generation loop and has no step-level credit.

Per token t of completion i: ratio rho = pi/pi_old, loss = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)
+ beta * KL_t with the k3 estimator KL_t = pi_ref/pi - log(pi_ref/pi) - 1, aggregated by `loss_agg`:
`sequence_mean` (mean over each sequence's tokens, then sequences), `token_mean` (all tokens of the
minibatch), `constant` (sum / (max_new_tokens * sequences), Dr. GRPO). Log-probs use logits / temperature,
the same distribution the generator sampled from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from rewardlab.algos import AlgoContext
from rewardlab.algos.advantages import ESTIMATORS
from rewardlab.config import schema
from rewardlab.distributed import all_reduce_gradients
from rewardlab.errors import UserError
from rewardlab.rollout import Batch


@schema("algo", "pg")
@dataclass
class PGConfig:
    _target_: str = "rewardlab.algos.pg.PolicyGradient"
    samples_per_prompt: int = 8
    advantage: str = "grpo"
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    beta: float = 0.0  # KL coefficient to the frozen initial policy (k3 estimator)
    eps_low: float = 0.2
    eps_high: float = 0.2
    num_iterations: int = 1  # passes over each batch
    minibatch_size: int = 0  # completions per optimizer step; 0 = the whole batch
    micro_batch_size: int = 64  # completions per forward/backward (gradient accumulation)
    loss_agg: str = "sequence_mean"  # sequence_mean | token_mean | constant
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"  # constant | linear | cosine (over run.iterations)
    lr_warmup_iterations: int = 0


@dataclass
class Tensors:
    """A batch as padded tensors: [left-padded prompt | right-padded completion]."""

    input_ids: torch.Tensor  # (N, P + C)
    attention_mask: torch.Tensor  # (N, P + C)
    position_ids: torch.Tensor  # (N, P + C)
    completion_mask: torch.Tensor  # (N, C) 1 on completion tokens
    completion_width: int


def to_tensors(batch: Batch, pad_id: int, device: torch.device) -> Tensors:
    P = max(len(p) for p in batch.prompt_ids)
    C = max(1, max(len(c) for c in batch.completion_ids))
    ids, attn, cmask = [], [], []
    for p, c in zip(batch.prompt_ids, batch.completion_ids):
        left, right = P - len(p), C - len(c)
        ids.append([pad_id] * left + p + c + [pad_id] * right)
        attn.append([0] * left + [1] * (len(p) + len(c)) + [0] * right)
        cmask.append([1] * len(c) + [0] * right)
    input_ids = torch.tensor(ids, device=device)
    attention = torch.tensor(attn, device=device)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return Tensors(input_ids, attention, positions, torch.tensor(cmask, device=device, dtype=torch.float), C)


def token_logprobs(model, t: Tensors, rows: torch.Tensor | slice, temperature: float,
                   with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (n, C) of the completion tokens under `model`, and optionally per-token entropy."""
    C = t.completion_width
    out = model(input_ids=t.input_ids[rows], attention_mask=t.attention_mask[rows],
                position_ids=t.position_ids[rows], logits_to_keep=C + 1)
    logits = out.logits[:, :-1].float() / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    targets = t.input_ids[rows][:, -C:]
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def clipped_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 eps_low: float, eps_high: float, beta: float = 0.0, ref_logps: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss (n, C) and per-token diagnostics; advantages are (n,) or (n, C)."""
    adv = advantages if advantages.dim() == 2 else advantages[:, None].expand_as(logps)
    ratio = torch.exp(logps - old_logps)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    loss = -torch.min(unclipped, clipped)
    stats = {"clipped": (((ratio < 1 - eps_low) & (adv < 0)) | ((ratio > 1 + eps_high) & (adv > 0))).float()}
    if beta > 0 and ref_logps is not None:
        delta = ref_logps - logps
        kl = torch.exp(delta) - delta - 1
        loss = loss + beta * kl
        stats["kl"] = kl.detach()
    return loss * mask, stats


def aggregate(token_loss: torch.Tensor, mask: torch.Tensor, how: str, n_seqs: int, n_tokens: float,
              max_new_tokens: int) -> torch.Tensor:
    """This micro-batch's share of the minibatch loss, so accumulated gradients equal the full loss's."""
    if how == "sequence_mean":
        return (token_loss.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seqs
    if how == "token_mean":
        return token_loss.sum() / max(n_tokens, 1.0)
    if how == "constant":
        return token_loss.sum() / (max_new_tokens * n_seqs)
    raise UserError(f"algo.loss_agg={how!r} is not one of sequence_mean, token_mean, constant")


class PolicyGradient:
    """Group policy gradient with a clipped ratio; estimator, clipping and aggregation are settings."""

    def __init__(self, context: AlgoContext | None = None, **settings: Any) -> None:
        context = context or AlgoContext()
        self.cfg = PGConfig(**{k: v for k, v in settings.items() if k != "_target_"})
        if self.cfg.advantage not in ESTIMATORS:
            raise UserError(f"algo.advantage={self.cfg.advantage!r} is not one of {sorted(ESTIMATORS)}")
        self.samples_per_prompt = self.cfg.samples_per_prompt
        self.temperature, self.max_new_tokens = context.temperature, context.max_new_tokens
        self.total_iterations = context.total_iterations
        self.updates = 0
        self.generator = torch.Generator().manual_seed(context.seed)
        self.optimizer: torch.optim.Optimizer | None = None
        self.reference: torch.nn.Module | None = None

    # ---- state carried across iterations (checkpointed) -----------------------------------------
    def setup(self, policy) -> None:
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(policy.model.parameters(), lr=self.cfg.lr,
                                               weight_decay=self.cfg.weight_decay, betas=tuple(self.cfg.betas))
        if self.cfg.beta > 0 and self.reference is None:
            self.reference = policy.load_fresh().eval().requires_grad_(False)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict() if self.optimizer else None, "updates": self.updates,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], policy) -> None:
        self.setup(policy)
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        self.updates = state["updates"]
        self.generator.set_state(state["generator"])

    def lr_factor(self) -> float:
        warm = self.cfg.lr_warmup_iterations
        if warm and self.updates < warm:
            return (self.updates + 1) / warm
        progress = min(1.0, (self.updates - warm) / max(1, self.total_iterations - warm))
        if self.cfg.lr_schedule == "linear":
            return 1.0 - progress
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    # ---- the update ----------------------------------------------------------------------------
    def advantages(self, batch: Batch) -> torch.Tensor:
        index = {pid: i for i, pid in enumerate(batch.groups())}
        groups = torch.tensor([index[p] for p in batch.prompt_id])
        rewards = torch.tensor(batch.reward, dtype=torch.float64)
        return ESTIMATORS[self.cfg.advantage](rewards, groups).float()

    def update(self, policy, batch: Batch) -> dict[str, float]:
        self.setup(policy)
        cfg, model, device = self.cfg, policy.model, policy.device
        adv = self.advantages(batch)
        batch.advantages = adv.tolist()
        t = to_tensors(batch, policy.tokenizer.pad_token_id, device)
        adv = adv.to(device)
        mask = t.completion_mask
        n = len(batch)
        if cfg.num_iterations > 1 or 0 < cfg.minibatch_size < n:
            old = self._old_logprobs(batch, model, t)
        else:
            old = None  # one optimizer step on the sampling policy: rho = 1 exactly
        ref = self._ref_logprobs(t) if self.reference is not None else None
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * self.lr_factor()
        model.train()
        sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
        steps = 0
        size = cfg.minibatch_size if cfg.minibatch_size > 0 else n
        for _ in range(cfg.num_iterations):
            order = torch.randperm(n, generator=self.generator).to(device)
            for start in range(0, n, size):
                rows = order[start : start + size]
                stats = self._step(model, t, rows, adv, old, ref, mask)
                for k, v in stats.items():
                    sums[k] += v
                steps += 1
        model.eval()
        self.updates += 1
        lengths = mask.sum(-1)
        out = {k: v / steps for k, v in sums.items()}
        out.update({"lr": self.optimizer.param_groups[0]["lr"], "advantage/mean": float(adv.mean()),
                    "advantage/abs_mean": float(adv.abs().mean()), "update/steps": float(steps),
                    "update/tokens": float(lengths.sum())})
        if ref is None:
            out.pop("kl")
        return out

    def _step(self, model, t: Tensors, rows: torch.Tensor, adv, old, ref, mask) -> dict[str, float]:
        cfg = self.cfg
        self.optimizer.zero_grad(set_to_none=True)
        n_seqs, n_tokens = len(rows), float(mask[rows].sum())
        totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        for start in range(0, len(rows), cfg.micro_batch_size):
            micro = rows[start : start + cfg.micro_batch_size]
            m = mask[micro]
            logps, entropy = token_logprobs(model, t, micro, self.temperature, with_entropy=True)
            old_logps = logps.detach() if old is None else old[micro]
            token_loss, stats = clipped_loss(logps, old_logps, adv[micro], m, cfg.eps_low, cfg.eps_high,
                                             cfg.beta, None if ref is None else ref[micro])
            loss = aggregate(token_loss, m, cfg.loss_agg, n_seqs, n_tokens, self.max_new_tokens)
            loss.backward()
            totals["loss"] += float(loss.detach())
            totals["entropy"] += float((entropy * m).sum()) / max(n_tokens, 1.0)
            totals["clip_fraction"] += float((stats["clipped"] * m).sum()) / max(n_tokens, 1.0)
            if "kl" in stats:
                totals["kl"] += float((stats["kl"] * m).sum()) / max(n_tokens, 1.0)
        all_reduce_gradients(model.parameters())  # data parallel: average over ranks (no-op in one process)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        self.optimizer.step()
        totals["grad_norm"] = float(norm)
        return totals

    @torch.no_grad()
    def _old_logprobs(self, batch: Batch, model, t: Tensors) -> torch.Tensor:
        """The sampling policy's log-probs: from the generator when it recorded them, else recomputed."""
        if batch.sample_logprobs is not None and all(len(l) == len(c) for l, c in zip(batch.sample_logprobs, batch.completion_ids)):
            C = t.completion_width
            return torch.tensor([l + [0.0] * (C - len(l)) for l in batch.sample_logprobs], device=t.input_ids.device)
        return self._forward_logprobs(model, t)

    @torch.no_grad()
    def _ref_logprobs(self, t: Tensors) -> torch.Tensor:
        return self._forward_logprobs(self.reference, t)

    def _forward_logprobs(self, model, t: Tensors) -> torch.Tensor:
        was_training = model.training
        model.eval()
        chunks = [token_logprobs(model, t, slice(s, s + self.cfg.micro_batch_size), self.temperature)[0]
                  for s in range(0, t.input_ids.shape[0], self.cfg.micro_batch_size)]
        model.train(was_training)
        return torch.cat(chunks)
