"""The embedded tiny policy: exact round trip through Auto*, and a safe concurrent cached build."""

import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewardlab.policy.tiny import TinyBuild, ensure_tiny


def test_tokenizer_round_trips_through_auto_classes(tiny_policy):
    tokenizer = AutoTokenizer.from_pretrained(tiny_policy.source)
    for text in ["17+5=22\n22+3=25\n#### 25", "3*4=12\n\n  -7+0=-7", "(1/2):?"]:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text)  # one token per character
        assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"


def test_model_round_trips_and_is_about_a_million_parameters(tiny_policy, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_policy.source)
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.tensor([[4, 5, 6, 7]])
    assert torch.equal(model(ids).logits, again(ids).logits)


def test_warm_start_learned_the_format(tiny_policy):
    from rewardlab.data.arith import ArithTask
    from rewardlab.generation.hf import HFGenerator

    test = ArithTask().test_examples()[:32]
    batch = HFGenerator(tiny_policy).generate(test, n=1, greedy=True)
    assert sum("#### " in c for c in batch.completion) >= 28
    assert all(f == "stop" for f in batch.finish_reason[:28])


def test_concurrent_builds_produce_one_complete_model(tmp_path):
    code = ("import sys; from rewardlab.policy.tiny import TinyBuild, ensure_tiny; "
            "print(ensure_tiny(TinyBuild(warmup_steps=3, warmup_batch_size=4), log=lambda *a: None))")
    env = {**os.environ, "REWARDLAB_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    outputs = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1
    built = [d for d in tmp_path.iterdir() if d.name.startswith("tiny-")]
    assert len(built) == 1 and (built[0] / "model.safetensors").exists()
    assert not [d for d in tmp_path.iterdir() if d.name.startswith(".tiny-build-")]
    assert json.loads((built[0] / "rewardlab_build.json").read_text())["warmup_steps"] == 3


def test_cache_key_depends_on_settings():
    assert TinyBuild().key() != TinyBuild(warmup_steps=10).key()
    assert TinyBuild().key() == TinyBuild().key()


def test_a_first_run_build_leaves_the_runs_random_stream_alone(tmp_path, monkeypatch):
    """Building the tiny model inside a seeded run must not reseed it: a run on a fresh machine (which
    builds) and a run with the cached model then sample the same completions."""
    monkeypatch.setenv("REWARDLAB_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    ensure_tiny(TinyBuild(warmup_steps=2, warmup_batch_size=4), log=lambda *a: None)
    assert torch.equal(torch.rand(3), expected)
