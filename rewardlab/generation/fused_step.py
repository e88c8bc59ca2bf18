"""The native engine's decoding step for Llama-family causal LMs (Llama, Qwen2, Mistral without a sliding window):
one token for every live row, computed from the model's own weights with a handful of tensor operations.

Why our own: a decoding step on a small model is a few dozen matrix products of one token per row, and what the
transformers forward adds around them (module calls, building a 4D mask from the 2D one, a cache that grows by
`torch.cat`, seven projections per layer) costs as much as the products themselves. Here each layer is four
products (q/k/v and gate/up concatenated into one matrix each, built from the model's weights at the start of each
`generate` call, since they change between updates; a model whose copies would pass CONCAT_BYTES, 256 MiB, such
as Qwen2.5-0.5B's 0.9 GB in fp32, keeps its seven products and makes no copy), the keys and values live in a cache
allocated once per chunk,
and the padding mask is the 2D one; the prompts' prefill is the same layers over the padded prompts, writing
each prompt's keys and values once per sample. On the embedded model a default decoding batch takes ~20% less
time (BENCHMARKS.md, section 1).

Same arithmetic as transformers' modeling_llama / modeling_qwen2 / modeling_mistral (RMSNorm in fp32, rotary
embeddings from the model's own `rotary_emb` so every rope type it knows is honoured, softmax(q k^T * scaling) v
with grouped key/value heads, SiLU-gated MLP): `tests/test_fused_step.py` checks the logits against the
transformers forward on the same inputs, fp32 and bf16, with and without biases, and that greedy decoding gives the
same tokens. FSDP and ZeRO-3 policies decode with it inside `policy.full_weights()`, where their weights are whole
(so sharded and data-parallel runs sample alike). Anything else (another family, a PEFT wrapper, weights still
sharded, quantized weights, a sliding window) decodes with the transformers forward: `fused_step_unsupported`
says why.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FAMILIES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")


def fused_step_unsupported(model) -> str | None:
    """Why `model` cannot decode with `FusedStep` (None when it can)."""
    # FSDP2 (`fully_shard`) makes a subclass of the model's class (FSDPLlamaForCausalLM): the family is in the MRO
    name = next((c.__name__ for c in type(model).__mro__ if c.__name__ in FAMILIES), type(model).__name__)
    if name not in FAMILIES:
        return f"{name} is not one of {', '.join(FAMILIES)}"
    config = model.config
    if getattr(config, "hidden_act", None) != "silu":
        return f"hidden_act={config.hidden_act!r}"
    if "sliding_attention" in (getattr(config, "layer_types", None) or ()) or (
            name == "MistralForCausalLM" and getattr(config, "sliding_window", None)):
        return "a sliding attention window"
    # whole weights only: FSDP2's unsharded parameters are plain tensors, sharded ones DTensors; a ZeRO-3 parameter
    # gathered for generation holds all its `ds_numel` elements, a partitioned one none
    if any(type(p.data) is not torch.Tensor or p.numel() != getattr(p, "ds_numel", p.numel())
           for p in model.parameters()):
        return "partitioned weights (FSDP or ZeRO-3 shards not gathered)"
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        linears = (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj,
                   mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not torch.nn.Linear for m in linears):
            return "projections that are not plain nn.Linear (PEFT or quantized)"
        if any(getattr(attention, extra, None) is not None for extra in ("q_norm", "k_norm", "sliding_window")):
            return "per-head q/k norms or a sliding window"
    if type(model.lm_head) is not torch.nn.Linear:
        return "an lm_head that is not a plain nn.Linear"
    return None


CONCAT_BYTES = 256 << 20  # concatenated q/k/v and gate/up copies up to this size in all; larger models project apart


class _Projection:
    """Several linear layers applied to one input, outputs side by side: one product over their weights
    concatenated (`fused`; a copy of them), or one product each (the model's own tensors, no copy)."""

    def __init__(self, linears: list[torch.nn.Linear], fused: bool) -> None:
        self.parts = [(m.weight, m.bias) for m in linears]
        if fused:
            bias = None
            if any(m.bias is not None for m in linears):  # a layer without one adds zeros
                bias = torch.cat([m.bias if m.bias is not None else m.weight.new_zeros(m.out_features)
                                  for m in linears])
            self.parts = [(torch.cat([m.weight for m in linears]), bias)]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.parts) == 1:
            return F.linear(x, *self.parts[0])
        return torch.cat([F.linear(x, weight, bias) for weight, bias in self.parts], dim=-1)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: normalized in fp32, cast back, then scaled (one fused operation in fp32, the same values)."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)
    x32 = x.float()
    return weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class FusedStep:
    """Decoding state for one chunk: `prefill` runs the prompts and fills the cache, `step` decodes one token for
    every live row, `select` keeps some rows. Weights are read when constructed; build one per `generate` call."""

    def __init__(self, model, concat_bytes: int = CONCAT_BYTES) -> None:
        self.model = model
        config = model.config
        first = model.model.layers[0].self_attn
        self.head_dim = first.head_dim
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.scaling = first.scaling
        groups = [([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj],
                   [layer.mlp.gate_proj, layer.mlp.up_proj]) for layer in model.model.layers]
        copies = sum(m.weight.numel() * m.weight.element_size() for qkv, gate_up in groups for m in qkv + gate_up)
        self.fused = copies <= concat_bytes
        self.layers = []
        for layer, (qkv, gate_up) in zip(model.model.layers, groups):
            attention, mlp = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon, _Projection(qkv, self.fused),
                attention.o_proj.weight, attention.o_proj.bias,
                layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon,
                _Projection(gate_up, self.fused), mlp.down_proj.weight, mlp.down_proj.bias, mlp.gate_proj.out_features))

    def prefill(self, input_ids: torch.Tensor, attention: torch.Tensor, n: int, max_new: int) -> torch.Tensor:
        """Run the left-padded prompts `input_ids` (prompts, width) (`attention` marks their real tokens), keep
        their keys and values `n` times each in a cache with room for `max_new` more tokens, and return the
        logits (prompts * n, vocab) of each row's first token (rows grouped by prompt)."""
        prompts, width = input_ids.shape
        device, heads, kv, d = input_ids.device, self.heads, self.kv_heads, self.head_dim
        rotary = self.model.model.rotary_emb
        self.angles = None
        if getattr(rotary, "rope_type", "default") not in ("dynamic", "longrope"):  # these depend on the length seen
            # cos and sin of every position the chunk can reach, once (the same values as one call per step)
            table = torch.arange(width + max_new + 1, device=device)[None]
            cos, sin = rotary(self.model.model.embed_tokens.weight.new_empty(()), table)
            self.angles = (cos[0], self._signed(sin[0]))
        self.length = width
        self.mask = torch.zeros((prompts * n, width + max_new), dtype=torch.bool, device=device)
        self.mask[:, :width] = attention.bool().repeat_interleave(n, dim=0)
        self.keys = [self.layers[0][3].new_empty((prompts * n, kv, width + max_new, d)) for _ in self.layers]
        self.values = [torch.empty_like(k) for k in self.keys]
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        # causal over the real tokens; a padding query sees itself (its output is never used)
        allowed = (causal & attention.bool()[:, None, :]) | torch.eye(width, dtype=torch.bool, device=device)

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            k, v = k.transpose(1, 2), v.transpose(1, 2)  # (prompts, kv heads, width, d)
            self.keys[index][:, :, :width] = k.repeat_interleave(n, dim=0)
            self.values[index][:, :, :width] = v.repeat_interleave(n, dim=0)
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=allowed[:, None],
                                                 scale=self.scaling, enable_gqa=True)
            return out.transpose(1, 2).reshape(prompts, width, heads * d)

        hidden = self.model.get_input_embeddings()(input_ids)
        hidden = self._layers(hidden, *self._angles(positions, hidden), attend)
        return self._logits(hidden[:, -1]).repeat_interleave(n, dim=0)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) of the token after `tokens` (rows,), which sit at `positions` (rows, 1)."""
        rows, slot, heads, kv, d = tokens.shape[0], self.length, self.heads, self.kv_heads, self.head_dim
        self.mask[:, slot] = True
        mask = self.mask[:, None, None, : slot + 1]

        def attend(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys, values = self.keys[index], self.values[index]
            keys[:, :, slot] = k
            values[:, :, slot] = v
            # grouped heads: the query heads of one key/value head attend as that many query positions
            out = F.scaled_dot_product_attention(q.view(rows, kv, heads // kv, d), keys[:, :, : slot + 1],
                                                 values[:, :, : slot + 1], attn_mask=mask, scale=self.scaling)
            return out.reshape(rows, heads * d)

        hidden = self.model.get_input_embeddings()(tokens)  # (rows, hidden)
        hidden = self._layers(hidden, *self._angles(positions[:, 0], hidden), attend)
        self.length += 1
        return self._logits(hidden)

    def select(self, keep: torch.Tensor) -> None:
        """Keep only rows `keep` (indices into the live rows)."""
        self.mask = self.mask.index_select(0, keep)
        self.keys = [k.index_select(0, keep) for k in self.keys]
        self.values = [v.index_select(0, keep) for v in self.values]

    def _angles(self, positions: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sign-folded sin (positions..., 1, head dim) of the rotary embedding at `positions`."""
        if self.angles is not None:
            cos, sin = (F.embedding(positions, table) for table in self.angles)
        else:
            cos, sin = self.model.model.rotary_emb(like, positions.reshape(1, -1))
            cos, sin = cos.view(*positions.shape, -1), self._signed(sin).view(*positions.shape, -1)
        return cos.unsqueeze(-2), sin.unsqueeze(-2)

    @staticmethod
    def _signed(sin: torch.Tensor) -> torch.Tensor:
        """rotate_half(x) * sin == (x's two halves swapped) * (sin with its first half negated)."""
        half = sin.shape[-1] // 2
        return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)

    def _layers(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """The decoder layers and final norm on `hidden` (..., hidden size). `attend(layer, q, k, v)` takes the
        rotated queries (..., heads, d), keys and values (..., kv heads, d) and returns (..., heads * d)."""
        lead, heads, kv, d = hidden.shape[:-1], self.heads, self.kv_heads, self.head_dim
        half = d // 2
        for index, (norm1, eps1, qkv, o, o_bias, norm2, eps2, gate_up, down, down_bias, inner) in \
                enumerate(self.layers):
            projected = qkv(_rms_norm(hidden, norm1, eps1)).view(*lead, heads + 2 * kv, d)
            qk = projected[..., : heads + kv, :]  # queries and keys take the rotary embedding together
            swapped = qk.view(*lead, heads + kv, 2, half).flip(-2).view(*lead, heads + kv, d)
            qk = torch.addcmul(qk * cos, swapped, sin)
            attended = attend(index, qk[..., :heads, :], qk[..., heads:, :], projected[..., heads + kv:, :])
            hidden = hidden + F.linear(attended, o, o_bias)
            h = gate_up(_rms_norm(hidden, norm2, eps2))
            hidden = hidden + F.linear(F.silu(h[..., :inner]) * h[..., inner:], down, down_bias)
        final = self.model.model.norm
        return _rms_norm(hidden, final.weight, final.variance_epsilon)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.model.lm_head.weight, self.model.lm_head.bias)
