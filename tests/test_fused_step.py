"""The native engine's own decoding step (rewardlab/generation/fused_step.py) against the transformers forward
on the same inputs: Llama (with and without attention biases), Qwen2 (q/k/v biases), Mistral, in fp32 and
bf16, with left-padded prompts of different lengths and rows leaving the batch midway; greedy decoding through
the generator gives the same tokens either way; and the models it must not take are refused with the reason."""

from __future__ import annotations

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from rewardlab.generation.fused_step import FusedStep, fused_step_unsupported
from rewardlab.generation.hf import HFGenerator

SHAPE = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=97, max_position_embeddings=128, pad_token_id=0,
             bos_token_id=1, eos_token_id=2)


def build(kind: str, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE))
    elif kind == "llama-bias":
        model = LlamaForCausalLM(LlamaConfig(**SHAPE, attention_bias=True, mlp_bias=True, tie_word_embeddings=False,
                                             rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0}))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=True))
    else:
        model = MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=None, head_dim=32, rope_parameters={
            "rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}))
    for p in model.parameters():  # random biases too (they start at zero)
        torch.nn.init.normal_(p, std=0.2)
    return model.to(dtype).eval()


PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [18]]


def reference_logits(model, rows: list[list[int]]) -> torch.Tensor:
    """The last position's logits of a full forward (no cache) over left-padded rows."""
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attention, position_ids=positions).logits[:, -1].float()


@pytest.mark.parametrize("kind", ["llama", "llama-bias", "qwen2", "mistral"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("concat", [True, False], ids=["concatenated", "apart"])
@torch.inference_mode()
def test_each_step_gives_the_transformers_forwards_logits(kind, dtype, concat):
    """Prefill and steps; q/k/v and gate/up concatenated (small models) or projected apart (CONCAT_BYTES)."""
    model = build(kind, dtype)
    assert fused_step_unsupported(model) is None
    n = 2  # each prompt sampled twice, as the engine repeats the prefill cache
    width = max(map(len, PROMPTS))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in PROMPTS])
    attention = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in PROMPTS])
    positions = (attention.cumsum(1) - 1).clamp(min=0)
    step = FusedStep(model, concat_bytes=1 << 30 if concat else 0)
    assert step.fused == concat
    tolerance = 2e-5 if dtype == torch.float32 else 0.1
    got = step.prefill(ids, attention, n, max_new=6).float()
    want = reference_logits(model, PROMPTS).repeat_interleave(n, dim=0)
    assert (got - want).abs().max() <= tolerance * want.abs().max(), (kind, dtype, "prefill")
    rows = [list(r) for r in PROMPTS for _ in range(n)]
    live = list(range(len(rows)))
    position = positions[:, -1:].repeat_interleave(n, dim=0) + 1
    generator = torch.Generator().manual_seed(1)
    for t in range(6):
        tokens = torch.randint(3, 97, (len(live),), generator=generator)
        for row, token in zip(live, tokens.tolist()):
            rows[row].append(token)
        got = step.step(tokens, position).float()
        want = reference_logits(model, [rows[r] for r in live])
        scale = want.abs().max()
        assert (got - want).abs().max() <= tolerance * scale, (kind, dtype, t, float((got - want).abs().max()))
        if dtype == torch.float32:
            assert torch.equal(got.argmax(-1), want.argmax(-1))
        position = position + 1
        if t in (1, 3):  # rows leave the batch, as finished rows do
            keep = torch.tensor([i for i in range(len(live)) if i % 3 != 1])
            step.select(keep)
            live, position = [live[i] for i in keep.tolist()], position[keep]


class _Tokenizer:
    pad_token_id, eos_token_id = 0, 2

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + (ord(c) % 90) for c in text]}

    def batch_decode(self, ids, skip_special_tokens=True):
        return [" ".join(map(str, row)) for row in ids]


class _Policy:
    def __init__(self, model):
        self.model, self.tokenizer, self.device = model, _Tokenizer(), torch.device("cpu")


@pytest.mark.parametrize("kind", ["llama-bias", "qwen2"])
def test_greedy_decoding_gives_the_same_tokens_with_either_step(kind):
    from rewardlab.data.base import Example

    policy = _Policy(build(kind))
    prompts = [Example(id=str(i), prompt=p, answer="") for i, p in
               enumerate(["1+2=", "33*4=", "a", "long prompt here", "xyz"])]
    fused = HFGenerator(policy, sampling={"max_new_tokens": 12}).generate(prompts, n=1, greedy=True)
    plain = HFGenerator(policy, sampling={"max_new_tokens": 12}, fused_step=False).generate(prompts, n=1,
                                                                                          greedy=True)
    assert fused.completion_ids == plain.completion_ids
    assert max(map(len, fused.completion_ids)) > 1


def test_models_it_cannot_take_are_refused_with_the_reason():
    from peft import LoraConfig, get_peft_model

    assert "Qwen3ForCausalLM" in fused_step_unsupported(Qwen3ForCausalLM(Qwen3Config(**SHAPE)))
    windowed = Qwen2ForCausalLM(Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4,
                                            max_window_layers=0))
    assert "sliding" in fused_step_unsupported(windowed)
    assert "sliding" in fused_step_unsupported(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=8)))
    assert "hidden_act" in fused_step_unsupported(LlamaForCausalLM(LlamaConfig(**SHAPE, hidden_act="gelu")))
    lora = get_peft_model(build("llama"), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert fused_step_unsupported(lora) is not None
    assert "nn.Linear" in fused_step_unsupported(lora.base_model.model)


def test_the_run_summary_says_how_it_decodes(tmp_path):
    """`HFGenerator.describe` (summary.json's `decoding`): the path taken, or why not."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "rewardlab", "train", "run.iterations=1", "run.eval_size=2",
                          "run.prompts_per_iteration=2", "logger=none", f"hydra.run.dir={tmp_path}"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["decoding"] == "decoding: native engine, rewardlab's own prefill and step (generation/fused_step.py)"
    policy = _Policy(build("qwen2"))
    assert "own prefill and step" in HFGenerator(policy).describe()
    assert "generation.fused_step=false" in HFGenerator(policy, fused_step=False).describe()
    assert "model.generate" in HFGenerator(policy, engine="generate").describe()
    windowed = _Policy(MistralForCausalLM(MistralConfig(**SHAPE, sliding_window=8)))
    assert "the model's forward at each step (a sliding attention window)" in HFGenerator(windowed).describe()


def _resident_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


@pytest.mark.parametrize("engine,fused", [("native", True), ("native", False), ("generate", False)],
                         ids=["own-step", "model-forward", "model.generate"])
def test_decoding_memory_does_not_grow_with_the_steps(engine, fused, monkeypatch):
    """At a real vocabulary each step's temporaries are tens of MB (32 rows x 150,000 logits: 19 MB a copy). A
    per-step record of small tensors allocated between them pinned glibc's heap, which then grew by about that
    much every step (8 GB over 256 steps at the 0.5B shape). Resident memory from step 8 to step 80 must stay
    within a few temporaries, not grow with the steps (with the pinning it grew ~1.5 GB here)."""
    import rewardlab.generation.hf as hf
    from rewardlab.data.base import Example

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**SHAPE, "vocab_size": 150_000, "hidden_size": 16, "intermediate_size": 32,
                                            "num_hidden_layers": 1, "num_attention_heads": 2})).eval()
    seen: list[float] = []
    if engine == "native":  # called once per step
        sample = hf.sample_categorical
        monkeypatch.setattr(hf, "sample_categorical", lambda probs: (seen.append(_resident_mb()), sample(probs))[1])
    else:
        record = hf._LogprobRecorder.__call__
        monkeypatch.setattr(hf._LogprobRecorder, "__call__",
                            lambda self, ids, scores: (seen.append(_resident_mb()), record(self, ids, scores))[1])
    monkeypatch.setattr(hf, "stop_token_ids", lambda *_: [-1])  # no row stops: every step has all 32 rows
    prompts = [Example(id=str(i), prompt=p, answer="") for i, p in enumerate(["1+2=", "33*4=", "a", "xyz"])]
    batch = HFGenerator(_Policy(model), sampling={"max_new_tokens": 80}, engine=engine,
                        fused_step=fused).generate(prompts, n=8)
    assert len(seen) == 80 and all(len(c) == 80 for c in batch.completion_ids)
    growth = max(seen[8:]) - seen[8]
    assert growth < 250, f"resident memory grew {growth:.0f} MB over 72 decoding steps"
