"""Process reward models in each format: tiny random models saved locally, loaded via from_pretrained."""

import math

import pytest
import torch
from reward_fixtures import make_batch, save_tiny

from rewardlab.errors import UserError
from rewardlab.rewards.prm import PRMReward
from rewardlab.steps import aggregate_steps

PROMPTS = ["17+5=?\n", "3+4+10=?\n", "1+1=?\n"]
COMPLETIONS = ["17+5=22\n#### 22", "3+4=7\n7+10=17\n#### 17", ""]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("prms")
    return {
        "math_shepherd": save_tiny(root / "ms", "causal", special=["ки"]),
        "qwen_prm": save_tiny(root / "qwen", "token", special=["<extra_0>"], num_labels=2),
        "token_classification": save_tiny(root / "tc", "token", num_labels=1),
        "sequence": save_tiny(root / "seq", "sequence", num_labels=1),
    }


def reference_scores(prm: PRMReward, prompt: str, completion: str) -> list[float]:
    """One row, unbatched, straight from the model: the scores the PRM must reproduce."""
    ids, positions = prm._encode(prompt, [s for s, _ in prm.split.split(completion)])
    with torch.no_grad():
        logits = prm.model(input_ids=torch.tensor([ids])).logits[0, positions]
    if prm.format == "math_shepherd":
        return logits[:, prm.candidates].softmax(-1)[:, 0].tolist()
    return logits[:, 0].sigmoid().tolist() if logits.shape[-1] == 1 else logits.softmax(-1)[:, 1].tolist()


@pytest.mark.parametrize("fmt", ["math_shepherd", "qwen_prm", "token_classification"])
def test_formats_detected_and_batched_scores_match_single_rows(models, fmt):
    prm = PRMReward(model=str(models[fmt]), batch_size=2, device="cpu")
    assert prm.format == fmt
    batch = make_batch(PROMPTS, COMPLETIONS)
    prm.score(batch)
    assert [len(s) for s in batch.step_rewards] == [2, 3, 0]
    assert batch.steps[1] == ["3+4=7", "7+10=17", "#### 17"]
    for row in range(2):
        expected = reference_scores(prm, PROMPTS[row], COMPLETIONS[row])
        assert batch.step_rewards[row] == pytest.approx(expected, abs=1e-5)
        assert batch.rewards["prm"][row] == pytest.approx(min(expected), abs=1e-5)
    assert batch.reward[2] == 0.0  # no steps, no credit


def test_step_tags_sit_after_each_step(models):
    prm = PRMReward(model=str(models["math_shepherd"]), device="cpu")
    ids, positions = prm._encode("1+1=?\n", ["1+1=2", "#### 2"])
    assert len(positions) == 2 and all(ids[p] == prm.tag_id for p in positions)
    text = prm.tokenizer.decode(ids[: positions[0] + 1])
    assert text.endswith("1+1=2 ки")


def test_known_outputs_from_fixed_heads(models):
    """Zeroed heads give exact probabilities: P(+)=1/2, P(positive)=3/4, sigmoid(log 4)=4/5."""
    batch = make_batch(PROMPTS[:2], COMPLETIONS[:2])
    ms = PRMReward(model=str(models["math_shepherd"]), device="cpu", aggregate="prod")
    torch.nn.init.zeros_(ms.model.lm_head.weight)
    assert ms.compute(batch) == pytest.approx([0.25, 0.125])
    qwen = PRMReward(model=str(models["qwen_prm"]), device="cpu", aggregate="mean")
    torch.nn.init.zeros_(qwen.model.score.weight)
    with torch.no_grad():
        qwen.model.score.bias.copy_(torch.tensor([0.0, math.log(3.0)]))
    assert qwen.compute(batch) == pytest.approx([0.75, 0.75])
    tc = PRMReward(model=str(models["token_classification"]), device="cpu", aggregate="last")
    torch.nn.init.zeros_(tc.model.score.weight)
    with torch.no_grad():
        tc.model.score.bias.fill_(math.log(4.0))
    assert tc.compute(batch) == pytest.approx([0.8, 0.8])


def test_chat_template_is_applied_for_qwen_format(tmp_path):
    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    path = save_tiny(tmp_path / "qwen_chat", "token", special=["<extra_0>"], chat_template=template)
    prm = PRMReward(model=str(path), device="cpu")
    ids, positions = prm._encode("1+1=?", ["1+1=2", "#### 2"])
    text = prm.tokenizer.decode(ids)  # the char vocabulary has no letters: roles decode as <unk>
    assert text.endswith("1+1=?" + "<unk>" * len("<assistant>") + "1+1=2<extra_0>#### 2<extra_0>")
    assert len(ids) > len(prm.tokenizer.encode("1+1=?1+1=2<extra_0>#### 2<extra_0>"))
    assert len(positions) == 2


def test_aggregate():
    scores = [0.9, 0.2, 0.5]
    assert aggregate_steps(scores, "min") == 0.2 and aggregate_steps(scores, "last") == 0.5
    assert aggregate_steps(scores, "prod") == pytest.approx(0.09)
    assert aggregate_steps(scores, "mean") == pytest.approx(1.6 / 3)
    with pytest.raises(UserError, match="aggregate"):
        aggregate_steps(scores, "max")


def test_user_errors(models, tmp_path):
    with pytest.raises(UserError, match="not a known PRM format"):
        PRMReward(model=str(models["qwen_prm"]), format="shepherd")
    with pytest.raises(UserError, match="cannot tell the PRM format"):
        PRMReward(model=str(models["sequence"]), device="cpu")
    with pytest.raises(UserError, match="step_tag"):
        PRMReward(model=str(models["math_shepherd"]), step_tag="", device="cpu")
    with pytest.raises(UserError, match="cannot be loaded"):
        PRMReward(model=str(tmp_path / "missing"), device="cpu")


def test_math_shepherd_head_at_tags_equals_the_full_forward(models):
    """The two-row head applied at the tags gives the scores of the full vocabulary forward (the path used
    for models whose logits are not a plain linear map)."""
    prm = PRMReward(model=str(models["math_shepherd"]), batch_size=2, device="cpu")
    assert prm.head is not None
    steps = [[s for s, _ in prm.split.split(c)] for c in COMPLETIONS]
    fast = prm.step_scores(PROMPTS, steps)
    prm.head = None
    assert fast == [pytest.approx(s, abs=1e-6) for s in prm.step_scores(PROMPTS, steps)]
    assert [len(s) for s in fast] == [2, 3, 0]
