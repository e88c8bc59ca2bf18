"""The vLLM backend against the HF backend on the tiny policy: same Batch, same greedy text, weight sync.

Runs only where vllm is importable and a CUDA device is present; elsewhere the skip reason says which.
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (pip install 'rewardlab[vllm]' on a GPU machine)")
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM tests need a CUDA device")]

from rewardlab.algos import AlgoContext  # noqa: E402
from rewardlab.algos.losses import to_tensors, token_logprobs  # noqa: E402
from rewardlab.algos.pg import PolicyGradient  # noqa: E402
from rewardlab.data.arith import ArithTask  # noqa: E402
from rewardlab.generation.hf import HFGenerator, Sampling  # noqa: E402
from rewardlab.generation.vllm import VLLMGenerator  # noqa: E402
from rewardlab.policy import load_policy  # noqa: E402

SAMPLING = Sampling(temperature=0.8, max_new_tokens=24)


@pytest.fixture(scope="module")
def prompts():
    return ArithTask(test_size=16).test_examples()[:16]


def recomputed_logprobs(policy, batch):
    """The policy's own log-probs of the sampled tokens (what the loss uses), trimmed per row."""
    t = to_tensors(batch, policy.tokenizer.pad_token_id, policy.device)
    with torch.no_grad():
        logps, _ = token_logprobs(policy.model, t, slice(None), SAMPLING.temperature)
    return [row[: len(ids)].tolist() for row, ids in zip(logps, batch.completion_ids)]


def assert_logprobs_match(policy, batch):
    for sampled, recomputed in zip(batch.sample_logprobs, recomputed_logprobs(policy, batch)):
        assert sampled == pytest.approx(recomputed, abs=2e-3)


def test_vllm_batch_matches_the_hf_backend(prompts):
    policy = load_policy(device="cuda")
    hf, fast = HFGenerator(policy, sampling=SAMPLING), VLLMGenerator(policy, sampling=SAMPLING)
    greedy_hf, greedy_vllm = hf.generate(prompts, greedy=True), fast.generate(prompts, greedy=True)
    assert greedy_vllm.prompt_ids == greedy_hf.prompt_ids
    same = sum(a == b for a, b in zip(greedy_vllm.completion_ids, greedy_hf.completion_ids))
    assert same >= 0.9 * len(prompts)  # float ties may break differently on a few rows
    sampled = fast.generate(prompts, n=4)
    assert len(sampled) == 4 * len(prompts) and sampled.prompt_id[:4] == [prompts[0].id] * 4
    assert [len(lp) for lp in sampled.sample_logprobs] == [len(ids) for ids in sampled.completion_ids]
    assert set(sampled.finish_reason) <= {"stop", "length"}
    assert_logprobs_match(policy, sampled)


@pytest.mark.parametrize("lora", [{}, {"r": 8}])
def test_weights_reach_the_engine_after_an_update(prompts, lora):
    policy = load_policy(device="cuda", lora=lora)
    fast = VLLMGenerator(policy, sampling=SAMPLING)
    batch = fast.generate(prompts, n=4)
    batch.reward = [float(i % 3 == 0) for i in range(len(batch))]
    PolicyGradient(AlgoContext(temperature=SAMPLING.temperature, max_new_tokens=24), samples_per_prompt=4,
                   lr=5e-2).update(policy, batch)
    fast.sync(policy)
    after = fast.generate(prompts, n=2)
    assert_logprobs_match(policy, after)  # sampled by the updated weights...
    start = recomputed_logprobs(load_policy(device="cuda"), after)
    gap = max(abs(a - b) for rows in zip(after.sample_logprobs, start) for a, b in zip(*rows))
    assert gap > 1e-2  # ...which differ from the starting ones
