"""Generation stops at every EOS id of the model's generation_config.json, not only the tokenizer's.

The model is a one-layer Llama built so each token deterministically predicts the next (attention and MLP
zeroed, one-hot embeddings, lm_head a transition table): after "\\n" it writes "4", "2", then ";", the
second EOS id its generation_config lists; after "=" it writes "6", then the tokenizer's <eos>.
"""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace

import pytest
import torch

from rewardlab.data.base import Example
from rewardlab.generation.hf import HFGenerator, Sampling
from rewardlab.policy import load_policy, stop_token_ids
from rewardlab.policy.tiny import build_tokenizer, save_char_tokenizer

CHAINS = {"\n": "4", "4": "2", "2": ";", "=": "6", "6": "<eos>"}
PROMPTS = [Example("a", "1+1=?\n"), Example("b", "3+3=")]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    tokenizer.add_tokens([";"])  # a second stop token that is no special token: the text must still drop it
    vocab = len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "o_proj" in name or "down_proj" in name:  # the residual stream is the token's own embedding
                param.zero_()
        embed = torch.zeros(vocab, 32)
        embed[:, :vocab] = torch.eye(vocab)
        model.model.embed_tokens.weight.copy_(embed)
        table = torch.zeros(vocab, 32)
        for now, after in CHAINS.items():
            table[tokenizer.convert_tokens_to_ids(after), tokenizer.convert_tokens_to_ids(now)] = 10.0
        model.lm_head.weight.copy_(table)
    second = tokenizer.convert_tokens_to_ids(";")
    model.generation_config = GenerationConfig(eos_token_id=[second, tokenizer.eos_token_id])
    directory = tmp_path_factory.mktemp("two_eos")
    model.save_pretrained(directory)
    save_char_tokenizer(tokenizer, directory)
    assert json.loads((directory / "generation_config.json").read_text())["eos_token_id"] == [
        second, tokenizer.eos_token_id]
    return directory


@pytest.fixture(scope="module")
def policy(model_dir):
    return load_policy(path=str(model_dir), device="cpu", log=lambda *_: None)


def test_stop_ids_are_the_union_of_tokenizer_and_generation_config(policy):
    tokenizer = policy.tokenizer
    second = tokenizer.convert_tokens_to_ids(";")
    # the tokenizer's first, then generation_config.json's, no duplicate
    assert stop_token_ids(policy.model, policy.tokenizer) == (tokenizer.eos_token_id, second)
    policy.model.generation_config.eos_token_id = tokenizer.eos_token_id  # a single int, as many configs write it
    try:
        assert stop_token_ids(policy.model, tokenizer) == (tokenizer.eos_token_id,)
    finally:
        policy.model.generation_config.eos_token_id = [second, tokenizer.eos_token_id]


def test_the_generator_built_as_runs_build_it_stops_too(policy):
    from hydra.utils import instantiate

    generator = instantiate({"_target_": "rewardlab.generation.hf.HFGenerator"}, policy=policy)  # as run.py
    assert generator.generate(PROMPTS, greedy=True).finish_reason == ["stop", "stop"]


@pytest.mark.parametrize("engine", ["native", "generate"])
@pytest.mark.parametrize("greedy", [True, False])
def test_both_engines_stop_at_either_eos(policy, engine, greedy):
    tokenizer = policy.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    generator = HFGenerator(policy, engine=engine, sampling=Sampling(temperature=1.0, max_new_tokens=12))
    torch.manual_seed(0)
    batch = generator.generate(PROMPTS, n=1 if greedy else 3, greedy=greedy)
    per_prompt = 1 if greedy else 3
    assert batch.completion_ids == ([[ids("4"), ids("2"), ids(";")]] * per_prompt
                                    + [[ids("6"), tokenizer.eos_token_id]] * per_prompt)
    assert batch.finish_reason == ["stop"] * len(batch)
    assert batch.completion == ["42"] * per_prompt + ["6"] * per_prompt  # the stop token kept in ids, not in text
    if not greedy:  # the stop token's log-prob is recorded like any other (it is trained)
        assert [len(lp) for lp in batch.sample_logprobs] == [len(c) for c in batch.completion_ids]
        assert all(lp[-1] == pytest.approx(0.0, abs=1e-3) for lp in batch.sample_logprobs)


def test_vllm_wrapper_passes_every_stop_id_and_reads_either_as_stop(policy, monkeypatch):
    """The wrapper alone, on CPU: TRL's engine replaced by a stand-in that records its settings."""
    made = {}

    class StandIn:
        def __init__(self, **kwargs):
            made.update(kwargs)

        def generate(self, prompts, images, num_generations):
            ids = policy.tokenizer.convert_tokens_to_ids
            rows = [[ids("4"), ids("2"), ids(";")], [ids("6"), policy.tokenizer.eos_token_id], [ids("6"), ids("6")]]
            return prompts, rows, [[[-0.1]] * len(r) for r in rows], None

    monkeypatch.setattr("trl.generation.vllm_generation.VLLMGeneration", StandIn)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))  # after TRL's import probed for it
    from rewardlab.generation.vllm import VLLMGenerator

    generator = VLLMGenerator(replace(policy, device=torch.device("cuda")))
    assert made["generation_kwargs"] == {"stop_token_ids": list(stop_token_ids(policy.model, policy.tokenizer))}
    batch = generator.generate([*PROMPTS, Example("c", "5=")], n=1)
    assert batch.finish_reason == ["stop", "stop", "length"]
    assert batch.completion == ["42", "6", "66"]


def test_vllm_stops_at_either_eos(model_dir):
    pytest.importorskip("vllm", reason="vllm is not installed (pip install 'rewardlab[vllm]' on a GPU machine)")
    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a CUDA device")
    from rewardlab.generation.vllm import VLLMGenerator

    policy = load_policy(path=str(model_dir), device="cuda", log=lambda *_: None)
    generator = VLLMGenerator(policy, sampling=Sampling(temperature=1.0, max_new_tokens=12))
    ids = policy.tokenizer.convert_tokens_to_ids
    for greedy in (True, False):
        batch = generator.generate(PROMPTS, n=1 if greedy else 3, greedy=greedy)
        per_prompt = 1 if greedy else 3
        assert batch.completion_ids == ([[ids("4"), ids("2"), ids(";")]] * per_prompt
                                        + [[ids("6"), policy.tokenizer.eos_token_id]] * per_prompt)
        assert batch.finish_reason == ["stop"] * len(batch)
