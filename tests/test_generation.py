"""The transformers backend's two engines: the native KV-cache loop (one prefill per prompt, finished rows
dropped) must decode exactly what `model.generate` decodes greedily, sample from the right distribution,
and record log-probs equal to a full forward pass."""

import pytest
import torch

from rewardlab.algos.losses import to_tensors, token_logprobs
from rewardlab.data.arith import ArithTask
from rewardlab.errors import UserError
from rewardlab.generation.hf import HFGenerator, Sampling, sample_categorical


@pytest.fixture(scope="module")
def prompts():
    return ArithTask().test_examples()[:24]


def test_native_greedy_equals_model_generate(tiny_policy, prompts):
    native = HFGenerator(tiny_policy, engine="native").generate(prompts, n=1, greedy=True)
    hf = HFGenerator(tiny_policy, engine="generate").generate(prompts, n=1, greedy=True)
    assert native.completion_ids == hf.completion_ids
    assert native.finish_reason == hf.finish_reason
    # rows of different lengths were decoded together, so finished rows did leave the batch
    assert len({len(c) for c in native.completion_ids}) > 1


def test_native_chunks_by_whole_prompts_and_groups_rows(tiny_policy, prompts):
    torch.manual_seed(0)
    batch = HFGenerator(tiny_policy, batch_size=12).generate(prompts[:5], n=4)  # 3 prompts per chunk
    assert batch.prompt_id == [ex.id for ex in prompts[:5] for _ in range(4)]
    assert all(len(l) == len(c) for l, c in zip(batch.sample_logprobs, batch.completion_ids))


@pytest.mark.parametrize("engine", ["native", "generate"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampling_logprobs_and_entropy_match_a_forward_pass(tiny_policy, prompts, temperature, engine):
    """The recorded log-probs (the update's old log-probs) and per-token entropies (its `entropy` metric) equal
    what a forward pass over the finished rows computes at the same temperature."""
    torch.manual_seed(1)
    gen = HFGenerator(tiny_policy, engine=engine, sampling=Sampling(temperature=temperature, max_new_tokens=32))
    batch = gen.generate(prompts[:8], n=4)
    t = to_tensors(batch, tiny_policy.tokenizer.pad_token_id, tiny_policy.device)
    with torch.no_grad():
        forward, entropy = token_logprobs(tiny_policy.model, t, slice(None), temperature, with_entropy=True)
    for recorded_rows, want in ((batch.sample_logprobs, forward), (batch.sample_entropy, entropy)):
        assert [len(row) for row in recorded_rows] == [len(c) for c in batch.completion_ids]
        recorded = torch.zeros_like(want)
        for i, row in enumerate(recorded_rows):
            recorded[i, : len(row)] = torch.tensor(row)
        assert torch.allclose(recorded * t.completion_mask, want * t.completion_mask, atol=1e-4)
    assert float((entropy * t.completion_mask).sum()) > 1.0  # entropies that can be wrong: not all ~0


def test_native_first_token_frequencies_follow_the_policy(tiny_policy, prompts):
    """Sampled first tokens follow softmax(logits / T): a tiny generator bug (wrong row, no temperature)
    moves these frequencies far more than the tolerance. The prompt is the one whose next token the policy
    is least sure of (the tiny policy is built on each machine, and how peaked it is varies with the CPU)."""
    torch.manual_seed(2)
    temperature, n = 2.0, 4000

    def next_token_probs(example):
        ids = torch.tensor(tiny_policy.tokenizer(example.prompt, add_special_tokens=False)["input_ids"])[None]
        with torch.no_grad():
            return torch.softmax(tiny_policy.model(ids).logits[0, -1] / temperature, dim=-1)

    example, probs = min(((ex, next_token_probs(ex)) for ex in prompts), key=lambda pair: pair[1].max().item())
    batch = HFGenerator(tiny_policy, batch_size=n,
                        sampling=Sampling(temperature=temperature, max_new_tokens=1)).generate([example], n=n)
    counts = torch.bincount(torch.tensor([c[0] for c in batch.completion_ids]), minlength=len(probs)).float()
    assert (counts / n - probs).abs().max() < 0.03
    assert probs.max() < 0.9  # the test means something: T=2 spreads the mass over several tokens


def test_the_sampler_draws_each_token_at_its_probability_and_never_a_zero_one(monkeypatch):
    """`sample_categorical` (the native engine's sampler without top-k/top-p): frequencies over 200,000 draws per
    row within 0.005 of the probabilities (4 standard deviations at most), tokens of probability 0 (first, middle,
    last) never drawn, and a row whose mass sits on its last token alone always gives that token."""
    torch.manual_seed(3)
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [0.1, 0.1, 0.1, 0.1, 0.1, 0.5],
                          [0.0, 0.0, 0.0, 0.0, 0.0, 1.0], [1 / 3, 1 / 3, 1 / 3, 0.0, 0.0, 0.0]])
    n = 200_000
    draws = sample_categorical(probs.repeat_interleave(n, dim=0)).view(len(probs), n)
    for row, p in zip(draws, probs):
        frequencies = torch.bincount(row, minlength=len(p)).float() / n
        assert (frequencies - p).abs().max() < 0.005
        assert frequencies[p == 0].sum() == 0
    # the largest uniform number torch.rand can give, on rows whose sums are not exactly 1 (as the exp of an fp32
    # log-softmax): the last token with probability, not the zero-probability one after it
    largest = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0))
    monkeypatch.setattr(torch, "rand", lambda shape, **kw: torch.full(shape, float(largest), **kw))
    rows = torch.tensor([[0.25, 0.75, 0.0], [0.2, 0.8000001, 0.0], [0.1, 0.8999999, 0.0]])
    assert sample_categorical(rows).tolist() == [1, 1, 1]


def test_native_top_k_one_is_greedy(tiny_policy, prompts):
    greedy = HFGenerator(tiny_policy).generate(prompts[:8], n=1, greedy=True)
    top1 = HFGenerator(tiny_policy, sampling=Sampling(temperature=1.0, top_k=1, max_new_tokens=48)).generate(
        prompts[:8], n=3)
    assert top1.completion_ids == [c for c in greedy.completion_ids for _ in range(3)]


def test_unknown_engine_is_a_user_error(tiny_policy):
    with pytest.raises(UserError, match="generation.engine"):
        HFGenerator(tiny_policy, engine="fast")


def test_generate_engine_ignores_the_models_generation_config(tiny_policy, prompts):
    """Only generation.sampling applies: a repetition penalty in the model's generation_config.json (as Qwen
    ships) must not change what `model.generate` decodes, nor stay changed on the model afterwards."""
    config = tiny_policy.model.generation_config
    before = HFGenerator(tiny_policy, engine="generate").generate(prompts[:8], n=1, greedy=True)
    config.repetition_penalty, config.no_repeat_ngram_size = 50.0, 2
    try:
        after = HFGenerator(tiny_policy, engine="generate").generate(prompts[:8], n=1, greedy=True)
        assert tiny_policy.model.generation_config.repetition_penalty == 50.0
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = 1.0, 0
    assert after.completion_ids == before.completion_ids
