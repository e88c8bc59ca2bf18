"""Chunked selective log-softmax (losses.py) equals the full log_softmax formula it replaced, in value,
entropy and gradient, for fp32 and bf16 logits and for every way the blocks cut the (rows, tokens) grid."""

from __future__ import annotations

import pytest
import torch

from rewardlab.algos import losses


def full_formula(logits: torch.Tensor, targets: torch.Tensor, temperature: float):
    """The formula before chunking: a full fp32 log_softmax over the vocabulary, then gather."""
    logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logps, -(logp_all.exp() * logp_all).sum(-1).detach()


@pytest.mark.parametrize("chunk", [1 << 25, 3 * 50, 7 * 50, 50])  # whole tensor, rows of 3 / 7 tokens, one position
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-5)])
def test_values_entropy_and_gradients_equal_the_full_log_softmax(monkeypatch, chunk, dtype, tol):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(0)
    n, C, V, temperature = 3, 7, 50, 0.7
    base = (torch.randn(n, C + 1, V, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, V, (n, C), generator=gen)
    weights = torch.randn(n, C, generator=gen)  # an arbitrary upstream gradient

    ours = base.clone().requires_grad_(True)
    logps, entropy = losses.selective_logprobs(ours, targets, temperature, with_entropy=True)
    (logps * weights).sum().backward()
    theirs = base.clone().requires_grad_(True)
    ref_logps, ref_entropy = full_formula(theirs, targets, temperature)
    (ref_logps * weights).sum().backward()

    assert logps.dtype == torch.float32 and not entropy.requires_grad
    torch.testing.assert_close(logps, ref_logps, atol=tol, rtol=tol)
    torch.testing.assert_close(entropy, ref_entropy, atol=tol, rtol=tol)
    assert ours.grad.dtype == dtype and not ours.grad[:, -1].any()  # the last position predicts nothing
    # bf16 gradients: both round the same fp32 value once, so they may differ by one bf16 step
    grad_tol = tol if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(ours.grad.float(), theirs.grad.float(), atol=grad_tol, rtol=grad_tol)


def test_no_grad_passes_match_and_keep_nothing():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 11, generator=gen)
    targets = torch.randint(0, 11, (2, 4), generator=gen)
    with torch.no_grad():
        logps, entropy = losses.selective_logprobs(logits, targets, 1.3)
    assert entropy is None and logps.grad_fn is None
    torch.testing.assert_close(logps, full_formula(logits, targets, 1.3)[0])


def test_blocks_cover_the_grid_once_within_the_budget(monkeypatch):
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 1000)
    for n, C, V in [(5, 9, 100), (4, 3, 100), (2, 1, 5000), (6, 40, 7)]:
        seen = torch.zeros(n, C, dtype=torch.int)
        for rows, cols in losses._blocks(n, C, V):
            seen[rows, cols] += 1
            block = len(range(n)[rows]) * len(range(C)[cols]) * V
            assert block <= max(1000, V)
        assert (seen == 1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_keeps_only_the_logits_themselves(dtype):
    """What autograd saves for backward: the logits (no copy), the targets and one fp32 value per position;
    the full formula also kept an fp32 (rows, tokens, vocabulary) log_softmax."""
    n, C, V = 2, 6, 1000
    logits = torch.randn(n, C + 1, V, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, V, (n, C))
    saved = []

    def keep(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        losses.selective_logprobs(logits, targets, 0.7, with_entropy=True)
    large = [s for s in saved if s.numel() >= n * C * V]
    assert len(large) == 1 and large[0].data_ptr() == logits.data_ptr() and large[0].dtype == dtype
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        full_formula(logits, targets, 0.7)
    assert any(s.numel() >= n * C * V and s.dtype == torch.float32 and s.data_ptr() != logits.data_ptr()
               for s in saved)  # the check above can fail: the old formula trips it


def _twins_and_batch(tied: bool, bias: bool = False):
    """Two identical one-layer Llama models at a vocabulary just over FUSED_HEAD_MIN_VOCAB (the second to run the
    logits path beside the first), and a batch of 3 rows x 9 tokens with a left-padded prompt and a right-padded
    completion (5 completion positions), with random per-token loss weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=losses.FUSED_HEAD_MIN_VOCAB + 7, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    models = [LlamaForCausalLM(config) for _ in range(2)]
    if bias:  # a head with a bias term (as some models have)
        for m in models:
            m.lm_head.bias = torch.nn.Parameter(torch.zeros(config.vocab_size))
        torch.nn.init.normal_(models[0].lm_head.bias)
    models[1].load_state_dict(models[0].state_dict())
    ids = torch.randint(0, config.vocab_size, (3, 9))
    attention = torch.ones_like(ids)
    attention[0, :2] = 0  # a left-padded prompt
    attention[2, -3:] = 0  # a shorter completion, right-padded
    t = losses.Tensors(ids, attention, (attention.cumsum(1) - 1).clamp(min=0), attention[:, -5:].float(), 5)
    return models, config, ids, t, torch.randn(3, 5)


def test_the_fused_head_at_a_large_vocabulary_equals_the_logits_path(monkeypatch):
    """token_logprobs through TRL's fused LM head (vocabulary >= FUSED_HEAD_MIN_VOCAB) gives the log-probs,
    entropy and parameter gradients of the plain logits path, and leaves the model's ordinary forward alone."""
    monkeypatch.setattr(losses, "FUSED_HEAD_DEVICES", ("cuda", "cpu"))  # on CPU only when asked (slower there)
    models, config, ids, t, weights = _twins_and_batch(tied=True)
    results = []
    for model, minimum in zip(models, [losses.FUSED_HEAD_MIN_VOCAB, 10**9]):
        monkeypatch.setattr(losses, "FUSED_HEAD_MIN_VOCAB", minimum)
        logps, entropy = losses.token_logprobs(model, t, slice(None), 0.7, with_entropy=True)
        (logps * weights * t.completion_mask).sum().backward()
        results.append((logps * t.completion_mask, entropy * t.completion_mask, model))
    (fused, fused_entropy, patched), (plain, plain_entropy, _) = results
    assert "_rewardlab_fused_temperature" in patched.__dict__  # the first went through the fused head
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(fused_entropy, plain_entropy, atol=1e-4, rtol=1e-5)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
    with torch.no_grad():  # decoding calls the forward without fused_lm_head: the original logits
        torch.testing.assert_close(patched(input_ids=ids).logits, models[1](input_ids=ids).logits)


@pytest.mark.parametrize("tied,bias", [(True, False), (False, True)])
def test_the_chunked_head_on_cpu_equals_the_logits_path_and_keeps_no_logits(monkeypatch, tied, bias):
    """At a large vocabulary on CPU, token_logprobs projects the head block by block (HeadLogSoftmax): the
    log-probs, entropy and every parameter gradient of the logits path, with several blocks per row, and no
    tensor of the logits' size saved for backward."""
    monkeypatch.setattr(losses, "CHUNK_ELEMENTS", 3 * (losses.FUSED_HEAD_MIN_VOCAB + 7))  # 3 tokens per block
    models, config, _, t, weights = _twins_and_batch(tied=tied, bias=bias)
    results = []
    for model, minimum in zip(models, [losses.FUSED_HEAD_MIN_VOCAB, 10**9]):
        monkeypatch.setattr(losses, "FUSED_HEAD_MIN_VOCAB", minimum)
        assert (losses.chunked_head(model) is not None) == (minimum < 10**9)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda x: saved.append(x.numel()) or x, lambda x: x):
            logps, entropy = losses.token_logprobs(model, t, slice(None), 0.7, with_entropy=True)
        (logps * weights * t.completion_mask).sum().backward()
        with torch.no_grad():
            again = losses.token_logprobs(model, t, slice(None), 0.7)[0]
        results.append((logps, entropy, again, max(saved)))
    (head, head_entropy, head_again, head_saved), (plain, plain_entropy, plain_again, plain_saved) = results
    torch.testing.assert_close(head, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(head_entropy, plain_entropy, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(head_again, plain_again, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(models[0].named_parameters(), models[1].parameters()):
        scale = float(q.grad.abs().max())  # fp32 sums in another order: equal to ~1e-6 of the largest entry
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5 * scale, rtol=1e-4, msg=name)
    logits_size = 3 * 6 * config.vocab_size
    assert plain_saved >= logits_size > head_saved  # the logits path keeps its logits; the head keeps none
