"""Policy loading (hub presets, local paths), LoRA (adapters-off KL reference, save/load), checkpointing, bf16."""

from __future__ import annotations

import json
import random

import pytest
import torch

from rewardlab.algos import AlgoContext
from rewardlab.algos.pg import PolicyGradient
from rewardlab.data.arith import ArithTask
from rewardlab.errors import UserError
from rewardlab.generation.hf import HFGenerator, Sampling
from rewardlab.policy import load_policy, resolve_dtype
from rewardlab.policy.tiny import TinyBuild, ensure_tiny

torch.set_num_threads(1)  # a few shared cores: more intra-op threads only contend (generation was 100x slower)


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def scored_batch(policy, seed=0):
    """Eight completions of two arith prompts with random rewards: something to update on."""
    torch.manual_seed(seed)
    prompts = ArithTask(train_size=4, test_size=1).train_examples()[:2]
    batch = HFGenerator(policy, sampling=Sampling(temperature=1.0, max_new_tokens=12)).generate(prompts, n=4)
    rng = random.Random(seed)
    batch.reward = [float(rng.random() < 0.5) for _ in range(len(batch))]
    batch.reward[0], batch.reward[4] = 1.0, 0.0 if batch.reward[4] else 1.0
    return batch


def test_hub_presets_load_with_from_pretrained_on_the_hub_id(monkeypatch):
    import transformers

    tiny = str(ensure_tiny(TinyBuild()))
    calls = []
    real_model, real_tokenizer = (transformers.AutoModelForCausalLM.from_pretrained,
                                  transformers.AutoTokenizer.from_pretrained)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda source, **kw: calls.append(("model", source, kw["dtype"])) or real_model(tiny, **kw))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda source, **kw: calls.append(("tokenizer", source)) or real_tokenizer(tiny, **kw))
    from hydra import compose, initialize_config_module

    from rewardlab.config import register_schemas

    register_schemas()
    with initialize_config_module("rewardlab.conf", version_base="1.3"):
        cfg = compose("train", ["policy=qwen2.5-0.5b-instruct"])
    assert cfg.policy.hub_id == "Qwen/Qwen2.5-0.5B-Instruct" and cfg.policy.dtype == "auto"
    policy = load_policy(**{k: v for k, v in cfg.policy.items() if k != "_target_"}, device="cpu")
    assert calls == [("model", "Qwen/Qwen2.5-0.5B-Instruct", torch.float32),  # auto: float32 on CPU
                     ("tokenizer", "Qwen/Qwen2.5-0.5B-Instruct")]
    assert policy.source == "Qwen/Qwen2.5-0.5B-Instruct"


def test_dtype_auto_is_bf16_only_on_cuda():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="policy.dtype='fp8'"):
        resolve_dtype("fp8", torch.device("cpu"))


def test_missing_local_path_and_unknown_name_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"policy.path=.*nowhere does not exist"):
        load_policy(path=str(tmp_path / "nowhere"))
    with pytest.raises(UserError, match=r"needs policy.hub_id=<hub model id> or policy.path"):
        load_policy(name="my-model")


def test_lora_trains_only_adapters_and_the_reference_is_the_base_with_adapters_off():
    base = load_policy()
    policy = load_policy(lora={"r": 8, "alpha": 16})
    trainable = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    ids = torch.tensor([base.tokenizer("12+7=?\n")["input_ids"]])
    with torch.no_grad():  # move the adapters away from their no-op start
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    assert not torch.allclose(logits(policy.model, ids), logits(base.model, ids), atol=1e-4)
    with policy.reference() as reference:
        assert reference is policy.model  # no second copy of the model
        torch.testing.assert_close(logits(reference, ids), logits(base.model, ids))
    assert policy._reference is None
    assert not torch.allclose(logits(policy.model, ids), logits(base.model, ids), atol=1e-4)  # adapters back on


def test_restart_from_base_with_lora_gets_fresh_adapters_on_the_base():
    policy = load_policy(lora={"r": 4})
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
    policy.model.load_state_dict(policy.load_fresh().state_dict())  # what algo.restart_from_base does
    lora_b = [p for n, p in policy.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(torch.count_nonzero(p) == 0 for p in lora_b)  # new adapters: a no-op on the base


def test_full_model_reference_is_a_frozen_copy_loaded_once():
    policy = load_policy()
    with policy.reference() as first:
        assert first is not policy.model and not any(p.requires_grad for p in first.parameters())
    with policy.reference() as second:
        assert second is first


def test_pg_update_with_lora_and_kl_changes_adapters_only():
    policy = load_policy(lora={"r": 4})
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    algo = PolicyGradient(AlgoContext(temperature=1.0, max_new_tokens=12), samples_per_prompt=4, beta=0.1, lr=1e-2)
    for _ in range(2):
        metrics = algo.update(policy, scored_batch(policy))
    assert "kl" in metrics and metrics["kl"] > 0  # the second update sees adapters that moved off the base
    changed = {n for n, p in policy.model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_saved_lora_adapters_load_back_trainable_with_policy_path(tmp_path):
    policy = load_policy(lora={"r": 8})
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    policy.model.save_pretrained(tmp_path / "policy")  # as a checkpoint writes it
    policy.tokenizer.save_pretrained(tmp_path / "policy")
    saved = {p.name for p in (tmp_path / "policy").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= saved
    assert "model.safetensors" not in saved  # no full copy of the base weights
    loaded = load_policy(path=str(tmp_path / "policy"))
    assert loaded.source == policy.source == str(ensure_tiny(TinyBuild()))
    ids = torch.tensor([policy.tokenizer("3+4=?\n")["input_ids"]])
    torch.testing.assert_close(logits(loaded.model, ids), logits(policy.model, ids))
    assert any(p.requires_grad for n, p in loaded.model.named_parameters() if "lora_" in n)
    assert json.loads((tmp_path / "policy" / "adapter_config.json").read_text())["r"] == 8


def update_stats(batch, micro_batch_tokens=0, **policy_settings):
    """Loss, pre-clip gradient norm and forward passes of one update of a fresh tiny policy on `batch`."""
    policy = load_policy(**policy_settings)
    calls = []
    policy.model.register_forward_hook(lambda *args: calls.append(1))
    algo = PolicyGradient(AlgoContext(temperature=1.0, max_new_tokens=12), samples_per_prompt=4,
                          micro_batch_tokens=micro_batch_tokens)
    metrics = algo.update(policy, batch)
    return metrics["loss"], metrics["grad_norm"], len(calls)


@pytest.fixture(scope="module")
def batch():
    return scored_batch(load_policy(), seed=3)


def test_gradient_checkpointing_gives_the_same_gradients(batch):
    assert load_policy(gradient_checkpointing=True).model.is_activation_checkpointing
    plain, checkpointed = update_stats(batch), update_stats(batch, gradient_checkpointing=True)
    assert checkpointed[:2] == pytest.approx(plain[:2], rel=1e-5)


def test_token_budget_micro_batches_give_the_same_gradients(batch):
    width = max(map(len, batch.prompt_ids)) + max(map(len, batch.completion_ids))
    whole, split = update_stats(batch), update_stats(batch, micro_batch_tokens=2 * width)
    assert (whole[2], split[2]) == (1, 4)  # 8 rows: one forward pass, then two rows per pass
    assert split[:2] == pytest.approx(whole[:2], rel=1e-5)
