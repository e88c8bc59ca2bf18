"""Padding-free forward passes for the update: a micro-batch's rows packed end to end, no padding tokens.

A padded micro-batch is as wide as its longest prompt plus its longest completion, and every padding token
goes through every layer like a real one. On the embedded model the update is its matmuls (BENCHMARKS.md §1),
and at the default run ~35% of a padded minibatch's tokens are padding (completions of 5 to 40 tokens, mean
~25). verl removes padding with flash-attention's variable-length kernels (`use_remove_padding`), which exist
on CUDA only; TRL's GRPOTrainer pads. Here the rows are packed first-fit decreasing into bins as long as the
longest row (so a bin's attention costs no more than a padded row's), position ids restart at each row, and
each bin gets a block-diagonal causal 4-D attention mask, which transformers' `sdpa` and `eager` attention use
as given: every token attends to exactly the tokens it attends to in the padded layout, so log-probs and
gradients equal the padded pass's to rounding (tests/test_packing.py). The hidden states the LM head receives
are gathered back into the padded (n, C + 1, H) layout, so the loss, the head paths and the metrics are those
of the padded pass.

Used only where that equality holds by construction: `packable` checks a decoder-only model type whose
attention is the standard causal one over position ids (no sliding windows, no soft-capped or scaled logits),
an `sdpa` or `eager` attention implementation, and a plain linear LM head. Elsewhere (flash-attention, TRL's
fused CUDA head, other architectures) the padded pass runs.
"""

from __future__ import annotations

import torch

# decoder-only families whose attention is plain causal attention with RoPE over `position_ids` and which
# take a 4-D mask as given (transformers' masking_utils); sliding windows are checked on the config
PACKABLE_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "olmo", "olmo2", "gemma", "granite")
# configs that scale or cap the logits after the head (the head alone does not give them)
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def packable(inner) -> bool:
    """Whether `inner` (an unwrapped causal LM) can run a packed pass with the same results as a padded one."""
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if config is None or type(head) is not torch.nn.Linear or getattr(config, "model_type", None) not in PACKABLE_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or ()
    return not windowed and all(kind == "full_attention" for kind in layer_types) and \
        not any(getattr(config, name, None) not in (None, 1.0) for name in SCALED_LOGITS)


def _bins(lengths: list[int]) -> list[list[int]]:
    """Row indices packed first-fit decreasing into bins of the longest length (stable for equal lengths)."""
    width = max(lengths)
    bins: list[list[int]] = []
    room: list[int] = []
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        for b, free in enumerate(room):
            if lengths[row] <= free:
                bins[b].append(row)
                room[b] -= lengths[row]
                break
        else:
            bins.append([row])
            room.append(width - lengths[row])
    return bins


def packed_head_input(model, inner, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int
                      ) -> torch.Tensor:
    """The LM head's input (n, keep, H) at the last `keep` positions of the padded rows ([left-padded prompt
    | right-padded completion], as `losses.to_tensors` lays them out), computed by one forward of `model`
    over the rows packed without padding. Positions of the padded layout that hold padding get the hidden
    state of the row's last token (their log-probs are masked out by the caller)."""
    n, width = input_ids.shape
    real = attention_mask.bool()
    starts = real.int().argmax(dim=1).tolist()  # first real token: prompts are left-padded
    lengths = real.sum(dim=1).tolist()
    bins = _bins(lengths)
    W = max(lengths)
    device = input_ids.device
    ids = input_ids.new_full((len(bins), W), int(input_ids[0, 0]))
    positions = torch.zeros((len(bins), W), dtype=torch.long, device=device)
    segment = torch.full((len(bins), W), -1, dtype=torch.long, device=device)
    offset = [0] * n
    for b, rows in enumerate(bins):
        at = 0
        for row in rows:
            length, start = lengths[row], starts[row]
            ids[b, at : at + length] = input_ids[row, start : start + length]
            positions[b, at : at + length] = torch.arange(length, device=device)
            segment[b, at : at + length] = row
            offset[row] = b * W + at
            at += length
    causal = torch.ones(W, W, dtype=torch.bool, device=device).tril()
    allowed = (segment[:, :, None] == segment[:, None, :]) & causal
    allowed |= torch.eye(W, dtype=torch.bool, device=device)  # trailing padding attends to itself: no empty row
    config = inner.config
    if config._attn_implementation == "eager":
        dtype = next(inner.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
    else:
        mask = allowed
    # padded position width - keep + j of row i is its token (j - (width - keep) - starts[i]) in packed order
    column = torch.arange(width - keep, width, device=device)[None, :] - torch.tensor(starts, device=device)[:, None]
    last = torch.tensor(lengths, device=device)[:, None] - 1
    index = torch.tensor(offset, device=device)[:, None] + column.clamp(min=0).minimum(last)

    taken: list[torch.Tensor] = []
    head = inner.get_output_embeddings()

    def take(_module, args):
        taken.append(args[0])
        return (args[0][:, :0],) + args[1:]

    handle = head.register_forward_pre_hook(take)
    try:
        model(input_ids=ids, attention_mask=mask[:, None], position_ids=positions, logits_to_keep=0)
    finally:
        handle.remove()
    if len(taken) != 1:
        raise RuntimeError(f"the model called its LM head {len(taken)} times in one forward; expected once")
    hidden = taken[0]
    return hidden.reshape(-1, hidden.shape[-1])[index.reshape(-1)].view(n, keep, hidden.shape[-1])
