"""Padding-free update passes (rewardlab/algos/packing.py): the packed forward, each distinct prompt computed
once for all its rows, gives the padded forward's log-probs, entropy and parameter gradients, on the embedded
Llama (with and without activation checkpointing) and on every packable family, with and without rows that share
a prompt; and it is refused where the equality would not hold (eager attention runs padded)."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from transformers import MistralConfig, Qwen2Config, Qwen2ForCausalLM

from rewardlab.algos import losses, packing


GROUPS = (3, 1, 4, 2, 2)  # rows per prompt in `ragged_batch(..., shared=True)`: 12 rows, 5 prompts


def ragged_batch(seed: int, n: int, vocab: int, pad: int, shared: bool = False):
    """Prompts of 1-9 tokens and completions of 0-15 (row 2 and row 4 empty), as the generator hands them to the
    update; `shared`: the rows come in groups of GROUPS sharing a prompt, as GRPO's do (row 4, empty, is the
    first of its group: the prompt's own tokens are queried in that row)."""
    rng = random.Random(seed)
    if shared:
        assert n == sum(GROUPS)
        prompts = [p for size in GROUPS for p in [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))]] * size]
    else:
        prompts = [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))] for _ in range(n)]
    completions = [[rng.randrange(3, vocab) for _ in range(0 if i in (2, 4) else rng.randint(1, 15))] for i in range(n)]
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


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shared", [False, True])
def test_packed_pass_equals_the_padded_pass_on_the_embedded_policy(tiny_policy, shared, checkpointing):
    """Also under activation checkpointing, whose backward recomputes each layer's forward after the pass has
    returned: the recomputed attention must be the shared-prompt one again (it is, through the call's keyword
    argument; a config switch for the pass's duration was not, and the recomputation failed)."""
    from rewardlab.policy import load_policy

    policy = load_policy(device="cpu", log=lambda *_: None)
    model = policy.model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    t = ragged_batch(0, 12, len(policy.tokenizer), policy.tokenizer.pad_token_id, shared=shared)
    assert packing.packable(model)
    (lp, ent, grad), (plp, pent, pgrad) = padded_and_packed(model, t, torch.tensor([5, 0, 2, 7, 1, 4, 9, 11, 3]))
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
    t = ragged_batch(1, 12, 500, 0, shared=True)
    (lp, ent, grad), (plp, pent, pgrad) = padded_and_packed(model, t, slice(0, 12), temperature=1.0)
    torch.testing.assert_close(plp, lp, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pent, ent, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pgrad, grad, atol=1e-5, rtol=1e-4)


def test_rows_sharing_a_prompt_go_through_the_model_once():
    """The packed sequence holds each distinct prompt once and every completion once but its last token (which
    predicts nothing); each of its tokens is one attention query; the LM head gets, per padded position that
    predicts a completion token, its row's token (the prompt's last token first), and the positions after
    (not scored) the last of those again."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    t = ragged_batch(2, 12, 64, 0, shared=True)
    prompt_end = t.input_ids.shape[1] - t.completion_width
    prompts = [t.input_ids[r, :prompt_end][t.attention_mask[r, :prompt_end].bool()].tolist() for r in range(12)]
    completions = [int(c) for c in t.completion_mask.sum(dim=1).tolist()]
    place = packing.layout(t.input_ids, t.attention_mask, t.completion_width + 1, t.completion_width)
    distinct = {tuple(p) for p in prompts}
    assert place.prompts == len(GROUPS) == len(distinct)
    assert place.ids.shape[1] == sum(map(len, distinct)) + sum(max(c - 1, 0) for c in completions)  # not 12 prompts
    assert sorted(place.outputs.tolist()) == sorted(set(place.outputs.tolist()))  # each token queried once
    assert len(place.outputs) == place.ids.shape[1]
    seen = []
    handle = model.model.embed_tokens.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape))
    try:
        hidden = packing.packed_head_input(model, model, t.input_ids, t.attention_mask, t.completion_width + 1,
                                           t.completion_width)
    finally:
        handle.remove()
    assert seen == [place.ids.shape]
    # no advanced-indexing gather in the graph: its backward sums a shared prompt token's repeated indices with
    # parallel atomic adds on CPU, in an order that varies with the machine's load (runs would not repeat)
    nodes, stack = set(), [hidden.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in nodes:
            nodes.add(node)
            stack.extend(next_node for next_node, _ in node.next_functions)
    names = {type(node).__name__ for node in nodes}
    assert "IndexSelectBackward0" in names and "IndexBackward0" not in names
    packed = place.ids[0]
    for row in range(12):
        tokens = packed[place.hidden[row]].tolist()
        fed = max(completions[row] - 1, 0)
        assert tokens[0] == prompts[row][-1]
        assert tokens[1 : 1 + fed] == t.input_ids[row, prompt_end : prompt_end + fed].tolist()
        assert set(tokens[1 + fed :]) <= {tokens[fed]}


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
    full.config._attn_implementation = "eager"  # runs padded: the shared-prompt pass goes through sdpa
    assert not packing.packable(full)


FAMILIES = {"llama": "Llama", "qwen2": "Qwen2", "qwen3": "Qwen3", "mistral": "Mistral", "phi3": "Phi3", "olmo": "Olmo",
            "olmo2": "Olmo2", "gemma": "Gemma", "granite": "Granite"}


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_every_packable_family_gives_the_padded_pass_with_shared_prompts(model_type):
    """The shared-prompt pass reaches each family's attention through the keyword argument its forward hands
    down, with the family's own scaling (Gemma's head_dim, Granite's attention_multiplier) and q/k norms (Qwen3,
    OLMo2): log-probs and gradients equal the padded pass's on every family `packable` admits."""
    import transformers

    assert set(FAMILIES) == set(packing.PACKABLE_TYPES)
    torch.manual_seed(0)
    name = FAMILIES[model_type]
    extra = {"head_dim": 8} if model_type in ("gemma", "qwen3") else {}
    if model_type == "mistral":
        extra["sliding_window"] = None
    if model_type == "granite":
        extra.update(attention_multiplier=0.3, embedding_multiplier=2.0, residual_multiplier=0.5, logits_scaling=1.0)
    config = getattr(transformers, f"{name}Config")(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2, attn_implementation="sdpa", **extra)
    model = getattr(transformers, f"{name}ForCausalLM")(config).train()
    assert packing.packable(model)
    t = ragged_batch(1, 12, 64, 0, shared=True)
    (lp, ent, grad), (plp, pent, pgrad) = padded_and_packed(model, t, slice(0, 12), temperature=1.0)
    torch.testing.assert_close(plp, lp, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pent, ent, atol=5e-5, rtol=1e-5)
    torch.testing.assert_close(pgrad, grad, atol=1e-5, rtol=1e-4)
    assert grad.abs().max() > 0.1


def test_a_forward_that_does_not_hand_the_layout_to_attention_is_refused(monkeypatch):
    """A layer that attended without the layout would attend over the whole packed sequence: the pass raises
    instead of returning wrong hidden states (here the model drops its keyword arguments on the way down)."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config)
    t = ragged_batch(2, 12, 64, 0, shared=True)
    layer = type(model.model.layers[0])
    forward = layer.forward
    monkeypatch.setattr(layer, "forward", lambda self, hidden_states, *a, shared_prompt=None, **k:
                        forward(self, hidden_states, *a, **k))
    with pytest.raises(RuntimeError, match="0 of the model's attention calls received the packed pass's layout"):
        packing.packed_head_input(model, model, t.input_ids, t.attention_mask, t.completion_width + 1,
                                  t.completion_width)
