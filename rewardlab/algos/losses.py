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

from rewardlab.algos.packing import SCALED_LOGITS, long_tensor, packable, packed_head_input
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
    input_ids = long_tensor(ids).to(device)
    attention = long_tensor(attn).to(device)
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
    return Tensors(input_ids, attention, positions, long_tensor(cmask).to(device=device, dtype=torch.float), C)


CHUNK_ELEMENTS = 1 << 25  # logits elements (rows x tokens x vocabulary) handled at once: 128 MB in fp32


def _blocks(n: int, C: int, V: int) -> list[tuple[slice, slice]]:
    """(rows, tokens) blocks of an (n, C, V) tensor of about CHUNK_ELEMENTS each: whole rows when they fit,
    else runs of tokens of one row (a 1,024-token row at a 151,936-word vocabulary is 622 MB in fp32)."""
    tokens = max(1, min(C, CHUNK_ELEMENTS // V))
    rows = max(1, CHUNK_ELEMENTS // (tokens * V)) if tokens == C else 1
    return [(slice(r, min(r + rows, n)), slice(c, min(c + tokens, C)))
            for r in range(0, n, rows) for c in range(0, C, tokens)]


def _forward(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Per position: the target's log-prob, the logsumexp (for backward) and optionally the entropy."""
    n, C, V = logits.shape[0], logits.shape[1] - 1, logits.shape[2]
    logps = torch.empty(n, C, device=logits.device, dtype=torch.float32)
    lse = torch.empty_like(logps)
    ent = torch.empty_like(logps) if entropy else None
    with torch.no_grad():
        for rows, cols in _blocks(n, C, V):
            z = logits[rows, cols].float() / temperature
            lse[rows, cols] = z.logsumexp(-1)
            logps[rows, cols] = z.gather(-1, targets[rows, cols].unsqueeze(-1)).squeeze(-1) - lse[rows, cols]
            if ent is not None:
                logp = z.sub_(lse[rows, cols].unsqueeze(-1))
                ent[rows, cols] = -(logp.exp() * logp).sum(-1)
    return logps, lse, ent


class SelectiveLogSoftmax(torch.autograd.Function):
    """log softmax(logits / T) at `targets`, block by block in fp32 (logsumexp and gather, as TRL's
    `selective_log_softmax` and verl's `logprobs_from_logits`): no full-vocabulary copy of the logits in
    either pass. `logits` is (n, C + 1, V) as the model returns it (position t predicts token t + 1); the
    backward writes the gradient (one-hot minus softmax, over T) straight into one tensor of the logits'
    shape and dtype. With `entropy`, also each position's entropy (no gradient)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: bool):
        logps, lse, ent = _forward(logits, targets, temperature, entropy)
        ctx.save_for_backward(logits, targets, lse)
        ctx.temperature = temperature
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logps, ent

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_entropy: torch.Tensor | None):
        logits, targets, lse = ctx.saved_tensors
        n, C, V = logits.shape[0], logits.shape[1] - 1, logits.shape[2]
        out = torch.zeros_like(logits)
        for rows, cols in _blocks(n, C, V):
            g = grad[rows, cols].unsqueeze(-1) / ctx.temperature
            p = (logits[rows, cols].float() / ctx.temperature).sub_(lse[rows, cols].unsqueeze(-1)).exp_()
            out[rows, cols] = p.mul_(-g).scatter_add_(-1, targets[rows, cols].unsqueeze(-1), g).to(out.dtype)
        return out, None, None, None


def selective_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                       with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """fp32 log-probs (n, C) of `targets` (n, C) under logits (n, C + 1, V) / temperature, and optionally
    the per-position entropy; equal to log_softmax + gather without its (n, C, V) fp32 copies."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return SelectiveLogSoftmax.apply(logits, targets, temperature, with_entropy)
    logps, _, ent = _forward(logits, targets, temperature, with_entropy)
    return logps, ent


FUSED_HEAD_MIN_VOCAB = 32_768  # from this vocabulary size on, no (n, C, V) logits are made: TRL's fused LM head ...
FUSED_HEAD_DEVICES = ("cuda",)  # ... on these devices (its Triton kernel), `HeadLogSoftmax` elsewhere (on CPU TRL
# folds 4096 x 32768 fp32 tiles in torch ops with full-tile temporaries: no smaller, twice as slow, BENCHMARKS.md)


class HeadLogSoftmax(torch.autograd.Function):
    """log softmax((hidden @ weight.T + bias) / T) at `targets`: the LM head's projection, the chunked
    selective log-softmax above and its backward done a block of tokens (CHUNK_ELEMENTS logits) at a time,
    recomputing each block's logits in backward, so neither pass holds more than one block of logits. Written
    here because TRL's `ChunkedLogProbFunction` (the same idea) has only a Triton kernel, and on CPU its torch
    fallback makes several full-tile temporaries and scores every prompt position. `hidden` (n, C, H) is the
    head's input at the positions that predict `targets` (n, C); fp32 log-probs, optionally the entropy (no
    gradient). The weight's gradient is accumulated in one tensor of its shape and dtype (fp32 here: exact)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor,
                temperature: float, entropy: bool):
        flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        logps = torch.empty(flat.shape[0], device=hidden.device, dtype=torch.float32)
        lse = torch.empty_like(logps)
        ent = torch.empty_like(logps) if entropy else None
        with torch.no_grad():
            for block in _token_blocks(flat.shape[0], weight.shape[0]):
                z = _project(flat[block], weight, bias, temperature)
                lse[block] = z.logsumexp(-1)
                logps[block] = z.gather(-1, flat_targets[block, None]).squeeze(-1) - lse[block]
                if ent is not None:
                    logp = z.sub_(lse[block, None])
                    ent[block] = -logp.exp().mul_(logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        if ent is not None:
            ctx.mark_non_differentiable(ent)
        return logps.view(targets.shape), None if ent is None else ent.view(targets.shape)

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_entropy: torch.Tensor | None):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        flat, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
        scaled = grad.reshape(-1, 1) / ctx.temperature  # d log p / d logit = (one-hot - softmax) / T
        want_hidden, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(flat) if want_hidden else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        for block in _token_blocks(flat.shape[0], weight.shape[0]):
            g = scaled[block]
            p = _project(flat[block], weight, bias, ctx.temperature).sub_(lse[block, None]).exp_()
            d = p.mul_(-g).scatter_add_(-1, flat_targets[block, None], g).to(weight.dtype)  # d loss / d logits
            if grad_hidden is not None:
                torch.mm(d, weight, out=grad_hidden[block])
            if grad_weight is not None:
                grad_weight.addmm_(d.t(), flat[block])
            if grad_bias is not None:
                grad_bias += d.sum(0)
        return (None if grad_hidden is None else grad_hidden.view(hidden.shape)), grad_weight, grad_bias, None, \
            None, None


def _token_blocks(tokens: int, V: int) -> list[slice]:
    step = max(1, CHUNK_ELEMENTS // V)
    return [slice(s, min(s + step, tokens)) for s in range(0, tokens, step)]


def _project(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, temperature: float
             ) -> torch.Tensor:
    """One block's logits / T in fp32, in a fresh tensor (edited in place by the callers)."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    return z.div_(temperature) if z.dtype == torch.float32 else z.float().div_(temperature)


def _inner(model):
    """The causal LM inside `model`: DDP's or DeepSpeed's `.module`, PEFT's base model."""
    inner = model
    while isinstance(getattr(inner, "module", None), torch.nn.Module):
        inner = inner.module
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def _output_head(inner):
    """The LM head of an unwrapped causal LM, or None where it has none."""
    return inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None


def chunked_head(model) -> torch.nn.Linear | None:
    """The LM head of `model` when log-probs come from `HeadLogSoftmax`: a large vocabulary (its logits cost
    1.2 GB per 8 rows of 256 tokens in fp32, and as much again for their gradient) off FUSED_HEAD_DEVICES, a
    plain `nn.Linear` with whole weights (not FSDP's DTensor nor ZeRO-3's partition) whose output the model
    returns as its logits (no soft-capping or scaling after it); otherwise None (the logits path)."""
    inner = _inner(model)
    head = _output_head(inner)
    if type(head) is not torch.nn.Linear or head.weight.shape[0] < FUSED_HEAD_MIN_VOCAB:
        return None
    weight = head.weight
    config = inner.config.get_text_config() if hasattr(inner.config, "get_text_config") else inner.config
    if (weight.device.type in FUSED_HEAD_DEVICES or type(weight.data) is not torch.Tensor or hasattr(weight, "ds_id")
            or any(getattr(config, name, None) not in (None, 1.0) for name in SCALED_LOGITS)):
        return None
    return head


def head_input(model, head: torch.nn.Linear, keep: int, **inputs) -> torch.Tensor:
    """The input (n, keep, H) of `head` in `model`'s forward on `inputs`, without its logits: a pre-hook takes
    the hidden states the model hands its head for the last `keep` positions and gives the head none of them
    (it returns (n, 0, V) logits). The call goes through `model` itself, so DDP, DeepSpeed and PEFT wrappers,
    activation checkpointing and the graph to the hidden states stay as they are."""
    taken: list[torch.Tensor] = []

    def take(_module, args):
        taken.append(args[0])
        return (args[0][:, :0],) + args[1:]

    handle = head.register_forward_pre_hook(take)
    try:
        model(**inputs, logits_to_keep=keep)
    finally:
        handle.remove()
    if len(taken) != 1:
        raise RuntimeError(f"the model called its LM head {len(taken)} times in one forward; expected once")
    return taken[0]


def fused_head(model, temperature: float):
    """The causal LM inside `model` with TRL's fused LM head (`trl.trainer.utils.add_fused_lm_head`, what
    GRPOTrainer uses) added for `temperature`, or None where another path is used: a small vocabulary, whose
    logits cost little and one matmul is faster; a device where TRL has no Triton kernel for it
    (FUSED_HEAD_DEVICES; `chunked_head` there); no output embeddings; or a head already added for another
    temperature. The fused head projects the hidden states through the LM head in tiles and keeps no
    (n, C, V) logits in either pass. Without `fused_lm_head=True` the model's forward is the original one, so
    decoding is unchanged."""
    inner = _inner(model)
    head = _output_head(inner)
    if head is None or head.weight.shape[0] < FUSED_HEAD_MIN_VOCAB or head.weight.device.type not in FUSED_HEAD_DEVICES:
        return None
    patched = inner.__dict__.get("_rewardlab_fused_temperature")
    if patched is None:
        from trl.trainer.utils import add_fused_lm_head

        add_fused_lm_head(inner, temperature=temperature, outputs=("log_probs", "entropy"))
        inner._rewardlab_fused_temperature = patched = temperature
    return inner if patched == temperature else None


def distinct_rows(t: Tensors, rows: torch.Tensor | slice) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where some of `rows` are the same rollout (the same prompt and completion tokens, so the same padded
    row), `(first, copies)`: the batch indices of each distinct row at its first occurrence, in the order of
    `rows`, and for each of `rows` the position of its row in `first`; None where every row is distinct."""
    index = torch.arange(t.input_ids.shape[0], device=t.input_ids.device)[rows]
    keys = torch.cat([t.input_ids[index], t.attention_mask[index]], dim=1)
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    if len(unique) == len(index):
        return None
    order = torch.arange(len(index), device=index.device)
    first = torch.full((len(unique),), len(index), device=index.device).scatter_reduce_(0, inverse, order, "amin")
    kept = first.argsort()  # distinct rows in the order they first occur, so prompts stay grouped as in `rows`
    rank = torch.empty_like(kept)
    rank[kept] = torch.arange(len(kept), device=index.device)
    return index[first[kept]], rank[inverse]


def _stochastic(model) -> bool:
    """Whether `model`'s forward is random (dropout active in training mode): then copies of a row would get
    different masks, and one pass for all of them is not the same computation."""
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(_inner(model), "config", None)

    def active(settings: dict) -> bool:  # e.g. Llama's attention_dropout, GPT-2's resid_pdrop; nested configs too
        return any(active(v) if isinstance(v, dict) else
                   isinstance(v, float) and v > 0 and (k.endswith("dropout") or k.endswith("pdrop"))
                   for k, v in settings.items())

    return config is not None and active(config.to_dict())


def token_logprobs(model, t: Tensors, rows: torch.Tensor | slice, temperature: float,
                   with_entropy: bool = False, packed: bool = False, unique: bool = True,
                   counts: dict[str, int] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (n, C) of the completion tokens under `model`, and optionally per-token entropy. At a
    large vocabulary through TRL's fused head (`fused_head`, CUDA) or `HeadLogSoftmax` (`chunked_head`,
    elsewhere): no (n, C + 1, V) logits in either pass. Otherwise the model returns logits for the last C + 1
    positions only, and the only (n, C + 1, V) tensors are those logits (kept for backward) and, in backward,
    their gradient. `packed`: the rows go through the model packed without padding where the model allows it
    (`packing.packable`; equal results to rounding, fewer tokens).

    `unique`: rows that are the same rollout (a group's samples often repeat one another: on the default run
    54% of the tokens of the rows that take the backward) go through the model once and their log-probs are
    copied to each (`distinct_rows`): the model's outputs for equal inputs are equal, and the backward of the
    copy sums the copies' gradients, so log-probs, entropy and gradients equal one pass per row to rounding,
    while each row keeps its own old log-probs, advantages and weights in the loss. Not where dropout is active.
    `counts["repeated"]`, where given, adds the number of rows that took a copy's log-probs."""
    if unique:
        distinct = distinct_rows(t, rows)
        if distinct is not None and not _stochastic(model):
            first, copies = distinct
            if counts is not None:
                counts["repeated"] = counts.get("repeated", 0) + len(copies) - len(first)
            logps, entropy = token_logprobs(model, t, first, temperature, with_entropy, packed, unique=False)
            return logps[copies], None if entropy is None else entropy[copies]
    C = t.completion_width
    ids, attention, positions = t.input_ids[rows], t.attention_mask[rows], t.position_ids[rows]
    inner = _inner(model)
    if packed and fused_head(model, temperature) is None and packable(inner) and \
            type(inner.get_output_embeddings().weight.data) is torch.Tensor:
        hidden = packed_head_input(model, inner, ids, attention, C + 1, C)
        head = chunked_head(model)
        if head is not None:
            return HeadLogSoftmax.apply(hidden[:, :-1], head.weight, head.bias, ids[:, -C:], temperature, with_entropy)
        return selective_logprobs(inner.get_output_embeddings()(hidden), ids[:, -C:], temperature, with_entropy)
    if fused_head(model, temperature) is not None:
        labels = ids.masked_fill(attention == 0, -100)
        labels[:, :-C] = -100  # only the completion is scored
        out = model(input_ids=ids, attention_mask=attention, position_ids=positions, labels=labels,
                    fused_lm_head=True)
        return out.log_probs[:, -C:], out.entropy[:, -C:].detach() if with_entropy else None
    head = chunked_head(model)
    if head is not None:
        hidden = head_input(model, head, C + 1, input_ids=ids, attention_mask=attention, position_ids=positions)
        logps, entropy = HeadLogSoftmax.apply(hidden[:, :-1], head.weight, head.bias, ids[:, -C:], temperature,
                                              with_entropy)
        return logps, entropy
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions, logits_to_keep=C + 1).logits
    return selective_logprobs(logits, ids[:, -C:], temperature, with_entropy)


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
