"""Padding-free update passes (rewardlab/algos/packing.py): the packed forward gives the padded forward's
log-probs, entropy and parameter gradients, on the embedded Llama and on a Qwen2-class model large enough in
vocabulary to take the chunked-head path, under sdpa and eager attention; and it is refused where the
equality would not hold."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import MistralConfig, Qwen2Config, Qwen2ForCausalLM

from rewardlab.algos import losses, packing


def ragged_batch(seed: int, n: int, vocab: int, pad: int):
    """Prompts of 1-9 tokens and completions of 0-15 (one empty), as the generator hands them to the update."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    completions = [[rng.randrange(3, vocab) for _ in range(0 if i == 2 else rng.randint(1, 15))] for i in range(n)]
    batch = SimpleNamespace(prompt_ids=prompts, completion_ids=completions)
    return losses.to_tensors(batch, pad, torch.device("cpu"))


def padded_and_packed(model, t, rows, temperature=0.7):
    """(log-probs, entropy, gradient) of a weighted log-prob sum, padded then packed, on the completion mask."""
    out = []
    weights = torch.linspace(-1.0, 2.0, t.completion_width)
    for packed in (False, True):
        model.zero_grad(set_to_none=True)
        logps, entropy = losses.token_logprobs(model, t, rows, temperature, with_entropy=True, packed=packed)
        m = t.completion_mask[rows]
        (logps * m * weights).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        out.append(((logps * m).detach(), entropy * m, grads))
    return out


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_pass_equals_the_padded_pass_on_the_embedded_policy(tiny_policy, attention):
    from rewardlab.policy import load_policy

    policy = load_policy(device="cpu", log=lambda *_: None)
    model = policy.model.train()
    model.config._attn_implementation = attention
    t = ragged_batch(0, 12, len(policy.tokenizer), policy.tokenizer.pad_token_id)
    assert packing.packable(model)
    (lp, ent, grad), (plp, pent, pgrad) = padded_and_packed(model, t, torch.tensor([5, 0, 2, 7, 1, 9, 11, 3]))
    torch.testing.assert_close(plp, lp, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pent, ent, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pgrad, grad, atol=2e-4, rtol=1e-4)
    assert grad.abs().max() > 1.0  # a real gradient, not two zeros


def test_packed_pass_equals_the_padded_pass_through_the_chunked_head():
    """A Qwen2-class model with a 32,768-word vocabulary: log-probs come from HeadLogSoftmax on CPU."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=losses.FUSED_HEAD_MIN_VOCAB, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).train()
    assert losses.chunked_head(model) is not None and packing.packable(model)
    t = ragged_batch(1, 6, 500, 0)
    (lp, ent, grad), (plp, pent, pgrad) = padded_and_packed(model, t, slice(0, 6), temperature=1.0)
    torch.testing.assert_close(plp, lp, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pent, ent, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pgrad, grad, atol=1e-5, rtol=1e-4)


def test_bins_hold_every_row_once_within_the_longest_length():
    rng = random.Random(3)
    lengths = [rng.randint(1, 50) for _ in range(64)]
    bins = packing._bins(lengths)
    assert sorted(r for b in bins for r in b) == list(range(64))
    assert all(sum(lengths[r] for r in b) <= max(lengths) for b in bins)
    assert len(bins) < 64 and len(bins) >= sum(lengths) / max(lengths)  # packs, and no bin is overfull


def test_models_whose_attention_packing_would_change_are_not_packed():
    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    from transformers import MistralForCausalLM

    windowed = MistralForCausalLM(MistralConfig(**small, sliding_window=8, attn_implementation="sdpa"))
    assert not packing.packable(windowed)
    full = MistralForCausalLM(MistralConfig(**small, sliding_window=None, attn_implementation="sdpa"))
    assert packing.packable(full)
    full.config._attn_implementation = "flash_attention_2"
    assert not packing.packable(full)
