"""Padding-free forward passes for the update: a micro-batch's rows packed end to end, each distinct prompt once.

A padded micro-batch is as wide as its longest prompt plus its longest completion, and every padding token
goes through every layer like a real one; and a GRPO group's rows all begin with the same prompt, which a padded
(or merely packed) pass computes once per row. On the embedded model the update is its matmuls (BENCHMARKS.md
§1): at the default run ~35% of a padded minibatch's tokens are padding and ~28% of the rest are prompt copies.
Here each micro-batch becomes one packed sequence: every distinct prompt of its rows once (rows with the same
prompt token ids share it), each followed by those rows' completions; position ids are each row's own (the
prompt 0..P-1, its completion from P), so every token goes through the linear layers, norms and rotary
embedding exactly as in its row. Attention is the only place where tokens meet: transformers' `sdpa` attention
function, given the pass's layout as a keyword argument the model hands down to it (`_install`), gathers for each row
the queries of its completion (and, for the first row of a prompt, the prompt's) and the keys and values of its
prompt and its own completion into one padded (rows, heads, L, d) layout, attends on it with a causal mask, and
scatters the outputs back. So every token attends to exactly the tokens it
attends to in the padded layout, and log-probs and gradients equal the padded pass's to rounding (the prompt's
gradient is the sum of its rows', as in the padded pass; tests/test_packing.py). The hidden states the LM head
receives are gathered back into the padded (n, C + 1, H) layout, so the loss, the head paths and the metrics are
those of the padded pass.

This is PrefixGrouper's decomposition (Liu et al. 2025, "Prefix Grouper: Efficient GRPO Training through
Shared-Prefix Forward"; verl's `actor.use_prefix_grouper` wraps the `prefix_grouper` package the same way, through
a keyword argument the model hands its attention function). Written here rather than taken from that package
because it lays out each group as a padded batch row (prefix + all suffixes, padded to the longest group), which
puts padding back into the linear layers; here the micro-batch stays one unpadded sequence and only attention
sees a padded layout. It pays off when a micro-batch holds several rows of a prompt: `algo.minibatch_order=groups`
(the default) keeps each group's rows in one minibatch, as verl does. Checked against the padded forward on the
same inputs (tests/test_packing.py), including rows that share a prompt and an empty completion.

Used only where that equality holds by construction: `packable` checks a decoder-only model type whose
attention is the standard causal one over position ids (no sliding windows, no soft-capped or scaled logits),
the `sdpa` attention implementation (transformers' default; `eager` runs padded), and a plain linear LM head. Elsewhere (flash-attention, TRL's
fused CUDA head, other architectures) the padded pass runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from transformers import AttentionInterface

# decoder-only families whose attention is plain causal attention with RoPE over `position_ids` and which
# hand their attention function the forward's keyword arguments; sliding windows are checked on the config
PACKABLE_TYPES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "olmo", "olmo2", "gemma", "granite")
# configs that scale or cap the logits after the head (the head alone does not give them)
SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier", "output_multiplier")


def packable(inner) -> bool:
    """Whether `inner` (an unwrapped causal LM) can run a packed pass with the same results as a padded one."""
    config = getattr(inner, "config", None)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if config is None or type(head) is not torch.nn.Linear or getattr(config, "model_type", None) not in PACKABLE_TYPES:
        return False
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    windowed = getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
    layer_types = getattr(config, "layer_types", None) or ()
    return not windowed and all(kind == "full_attention" for kind in layer_types) and \
        not any(getattr(config, name, None) not in (None, 1.0) for name in SCALED_LOGITS)


@dataclass
class Layout:
    """Where the packed sequence's tokens go in attention and back in the padded layout."""

    ids: torch.Tensor  # (1, T) the packed tokens: each distinct prompt once, then its rows' completions
    positions: torch.Tensor  # (1, T) each token's position in its own row
    queries: torch.Tensor  # (A, Lq) packed index of each attention row's queries (0 where padding)
    keys: torch.Tensor  # (A, Lk) packed index of each attention row's keys and values (0 where padding)
    allowed: torch.Tensor  # (A, Lq, Lk) bool: query i of row a may attend key j
    outputs: torch.Tensor  # (T,) where each packed token's attention output is in the (A * Lq) query slots
    hidden: torch.Tensor  # (n, keep) packed index of each padded-layout position the LM head receives
    prompts: int  # distinct prompts (for tests)
    calls: int = 0  # attention calls that used this layout (one per layer in the forward)


def layout(input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int, completion_width: int) -> Layout:
    """The shared-prompt layout of padded rows ([left-padded prompt | right-padded completion], as
    `losses.to_tensors` lays them out) whose last `keep` positions the LM head takes."""
    n, width = input_ids.shape
    prompt_end = width - completion_width
    ids, real = input_ids.tolist(), attention_mask.sum(dim=1).tolist()
    starts = attention_mask.int().argmax(dim=1).tolist()  # first real token: prompts are left-padded
    units: dict[tuple[int, ...], list[int]] = {}
    for row in range(n):
        units.setdefault(tuple(ids[row][starts[row]:prompt_end]), []).append(row)
    tokens: list[int] = []
    positions: list[int] = []
    attend: list[tuple[list[int], list[int], int]] = []  # (query indices, key indices, offset of query 0 in keys)
    hidden: list[list[int]] = [[]] * n
    for prompt, rows in units.items():
        P, base = len(prompt), len(tokens)
        tokens.extend(prompt)
        positions.extend(range(P))
        prompt_at = list(range(base, base + P))
        for k, row in enumerate(rows):
            L, at = real[row] - P, len(tokens)
            # the completion's last token predicts nothing (no later token attends to it and its output is not
            # scored): it is left out of the pass
            fed = L - 1 if P and L else L
            tokens.extend(ids[row][prompt_end : prompt_end + fed])
            positions.extend(range(P, P + fed))
            own = list(range(at, at + fed))
            if k == 0:  # the prompt's tokens are queried once, in its first row
                attend.append((prompt_at + own, prompt_at + own, 0))
            elif fed:
                attend.append((own, prompt_at + own, P))
            # padded column prompt_end - 1 + j: j = 0 the prompt's last token, then the completion but its last
            # token; the positions after (not scored) repeat the last
            column = ([base + P - 1] if P else []) + own
            hidden[row] = (column + column[-1:] * keep)[:keep]
    Lq, Lk = max(len(q) for q, _, _ in attend), max(len(k) for _, k, _ in attend)
    queries = long_tensor([i for q, _, _ in attend for i in q + [0] * (Lq - len(q))]).view(len(attend), Lq)
    keys = long_tensor([i for _, k, _ in attend for i in k + [0] * (Lk - len(k))]).view(len(attend), Lk)
    n_k = long_tensor([len(k) for _, k, _ in attend])
    offset = long_tensor([o for _, _, o in attend])
    outputs = [0] * len(tokens)  # each packed token is the query of exactly one attention row
    for a, (q, _, _) in enumerate(attend):
        for i, token in enumerate(q):
            outputs[token] = a * Lq + i
    i, j = torch.arange(Lq)[None, :, None], torch.arange(Lk)[None, None, :]
    allowed = (j <= offset[:, None, None] + i) & (j < n_k[:, None, None])
    allowed[:, :, 0] = True  # every real query sees its row's first token; padded queries get a row that is not empty
    device = input_ids.device
    return Layout(long_tensor(tokens).to(device)[None], long_tensor(positions).to(device)[None], queries.to(device),
                  keys.to(device), allowed.to(device), long_tensor(outputs).to(device),
                  long_tensor([i for row in hidden for i in row]).to(device).view(n, keep), len(units))


def long_tensor(values: list) -> torch.Tensor:
    """A list of ints (or of equal-length lists of ints) as an int64 tensor, through numpy: `torch.tensor` on
    Python lists costs ~7x more (~250 us for the ~1,300 ints of a default minibatch; a layout makes eight)."""
    return torch.from_numpy(np.array(values, dtype=np.int64))


def _accepting_shared_prompt(original: Callable) -> Callable:
    """transformers' `sdpa` attention function, taking one more keyword argument: `shared_prompt`, the packed
    pass's (Layout, mask). Without it the call goes to `original` as it was; with it, the packed sequence's
    queries, keys and values (1, heads, T, d) are gathered per row (module docstring), `original` attends on them
    with the layout's mask, and the outputs are scattered back to (1, T, heads, d)."""

    def attention(module, query, key, value, attention_mask, *args, shared_prompt=None, **kwargs):
        if shared_prompt is None:
            return original(module, query, key, value, attention_mask, *args, **kwargs)
        place, mask = shared_prompt
        place.calls += 1

        def rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:  # (1, h, T, d) -> (A, h, L, d)
            return x[0].index_select(1, index.view(-1)).view(x.shape[1], *index.shape, x.shape[-1]).transpose(0, 1)

        out, _ = original(module, rows(query, place.queries), rows(key, place.keys), rows(value, place.keys), mask,
                          *args, **kwargs)  # (A, Lq, heads, d)
        return out.reshape(-1, *out.shape[2:]).index_select(0, place.outputs)[None], None

    attention.accepts_shared_prompt = True
    return attention


def _install() -> None:
    """Make transformers' `sdpa` attention take `shared_prompt` (once per process; calls without it are
    unchanged). It is the attention function itself, not a different implementation named in the config for
    the pass's duration, because activation checkpointing recomputes a layer's forward during the backward,
    after the pass has returned: the keyword argument is part of the recomputed call, a config switch would not
    be. verl's PrefixGrouper integration patches the same registry the same way."""
    current = AttentionInterface()["sdpa"]  # a fresh interface: the library-wide mapping, no local override
    if not getattr(current, "accepts_shared_prompt", False):
        AttentionInterface.register("sdpa", _accepting_shared_prompt(current))


def packed_head_input(model, inner, input_ids: torch.Tensor, attention_mask: torch.Tensor, keep: int,
                      completion_width: int) -> torch.Tensor:
    """The LM head's input (n, keep, H) at the last `keep` positions of the padded rows ([left-padded prompt
    | right-padded completion], as `losses.to_tensors` lays them out), computed by one forward of `model`
    over the rows packed without padding, each distinct prompt once. Positions of the padded layout that hold
    padding get the hidden state of the row's last token (their log-probs are masked out by the caller)."""
    _install()
    place = layout(input_ids, attention_mask, keep, completion_width)
    mask = place.allowed[:, None]
    taken: list[torch.Tensor] = []
    head = inner.get_output_embeddings()

    def take(_module, args):
        taken.append(args[0])
        return (args[0][:, :0],) + args[1:]

    handle = head.register_forward_pre_hook(take)
    try:
        # a 4-D mask is taken as given (no mask is built for the packed sequence); attention uses the layout's
        model(input_ids=place.ids, attention_mask=mask[:1, :, :1, :1], position_ids=place.positions, logits_to_keep=0,
              shared_prompt=(place, mask))
    finally:
        handle.remove()
    if len(taken) != 1:
        raise RuntimeError(f"the model called its LM head {len(taken)} times in one forward; expected once")
    layers = getattr(inner.config, "num_hidden_layers", None)
    if place.calls == 0 or (layers is not None and place.calls != layers):
        # a layer that attended without the layout attended over the whole packed sequence: refuse, not train on it
        raise RuntimeError(f"{place.calls} of the model's attention calls received the packed pass's layout "
                           f"(expected one per layer, {layers}): this model's forward does not hand its keyword "
                           "arguments to its attention function; set algo.padding_free=false")
    # index_select, not advanced indexing: a prompt's last token feeds every row of its group, and the backward
    # of `x[index]` sums repeated indices with parallel atomic adds on CPU (an order that varies with the load,
    # so runs would not repeat bit for bit); index_select's backward (index_add_) sums them in order
    hidden = taken[0][0]
    return hidden.index_select(0, place.hidden.view(-1)).view(*place.hidden.shape, hidden.shape[-1])
