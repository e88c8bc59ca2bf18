"""The pieces of the policy-gradient loss: padded tensors, per-token log-probs, the clipped-ratio loss
with the k3 KL term, and its aggregation (METHODS.md §1).

Per token t of completion i: ratio rho = pi/pi_old, loss = -min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)
+ beta * KL_t with KL_t = pi_ref/pi - log(pi_ref/pi) - 1, aggregated by `loss_agg`: `sequence_mean` (mean
over each sequence's tokens, then sequences), `token_mean` (all tokens of the minibatch), `constant`
(sum / (max_new_tokens * sequences), Dr. GRPO). Log-probs use logits / temperature, the distribution the
generator sampled from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rewardlab.errors import UserError
from rewardlab.rollout import Batch


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
