"""Reward families on crafted inputs with known outputs."""

import math

import pytest
import torch
from reward_fixtures import make_batch, save_tiny

from rewardlab.errors import UserError
from rewardlab.policy import Policy, load_tokenizer
from rewardlab.rewards.bleu import BleuReward
from rewardlab.rewards.format import FormatReward
from rewardlab.rewards.length import LengthReward
from rewardlab.rewards.majority_vote import MajorityVoteReward
from rewardlab.rewards.orm import ORMReward
from rewardlab.rewards.ref_likelihood import RefLikelihoodReward
from rewardlab.rewards.self_certainty import SelfCertaintyReward


def test_majority_vote_clusters_equivalent_answers_per_group():
    completions = ["#### 3", "#### 3.0", "#### 4", "no answer", "#### 7", "#### 8", "#### 8"]
    batch = make_batch(["p"] * 4 + ["q"] * 3, completions)
    MajorityVoteReward().score(batch)
    assert batch.reward == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]


def test_length_penalty_and_target():
    batch = make_batch(["p", "p"], ["abcd", "abcdefgh"])  # 4 and 8 "tokens"
    assert LengthReward(mode="penalty", coef=0.5).compute(batch) == [-2.0, -4.0]
    assert LengthReward(mode="target", coef=1.0, target=4).compute(batch) == [0.0, -1.0]
    with pytest.raises(UserError, match="target"):
        LengthReward(mode="target")


def test_format_reward():
    batch = make_batch(["p"] * 3, ["1+1=2\n#### 2", "the answer is 2", "\\boxed{2}"])
    assert FormatReward().compute(batch) == [1.0, 0.0, 0.0]
    assert FormatReward(answer_format="boxed").compute(batch) == [0.0, 0.0, 1.0]
    assert FormatReward(pattern=r"(\d+\+\d+=\d+\n)+#### \d+").compute(batch) == [1.0, 0.0, 0.0]
    with pytest.raises(UserError, match="regular expression"):
        FormatReward(pattern="(")


def test_bleu_against_reference_response():
    batch = make_batch(["p"] * 2, ["the cat sat on the mat", "dogs run fast"],
                       solutions=["the cat sat on the mat"] * 2)
    scores = BleuReward().compute(batch)
    assert scores[0] == pytest.approx(1.0) and scores[1] < 0.1
    with pytest.raises(UserError, match="reference response"):
        BleuReward().compute(make_batch(["p"], ["x"]))


@pytest.fixture(scope="module")
def random_lm(tmp_path_factory):
    path = save_tiny(tmp_path_factory.mktemp("lm") / "lm", "causal")
    from transformers import AutoModelForCausalLM

    return Policy(model=AutoModelForCausalLM.from_pretrained(path).eval(), tokenizer=load_tokenizer(str(path)),
                  source=str(path), device=torch.device("cpu"))


def test_self_certainty_is_zero_for_uniform_and_matches_the_formula(random_lm):
    tok = random_lm.tokenizer
    batch = make_batch(["1+1=?\n", "2+3=?\n"], ["1+1=2\n#### 2", "#### 5"], tokenizer=tok)
    reward = SelfCertaintyReward(batch_size=1)
    with pytest.raises(UserError, match="policy"):
        reward.compute(batch)
    reward.bind(random_lm)
    values = reward.compute(batch)
    ids = torch.tensor([batch.prompt_ids[0] + batch.completion_ids[0]])
    with torch.no_grad():
        logp = random_lm.model(input_ids=ids).logits[0].log_softmax(-1)
    n_prompt, vocab = len(batch.prompt_ids[0]), logp.shape[-1]
    per_token = [-math.log(vocab) - float(logp[t].mean()) for t in range(n_prompt - 1, ids.shape[1] - 1)]
    assert values[0] == pytest.approx(sum(per_token) / len(per_token), abs=1e-6)
    assert all(v > 0 for v in values)
    saved = random_lm.model.lm_head.weight.detach().clone()
    torch.nn.init.zeros_(random_lm.model.lm_head.weight)
    try:
        assert reward.compute(batch) == pytest.approx([0.0, 0.0], abs=1e-6)  # uniform: KL(U||U) = 0
    finally:
        with torch.no_grad():
            random_lm.model.lm_head.weight.copy_(saved)


def test_ref_likelihood(random_lm):
    reward = RefLikelihoodReward()
    assert reward.reasoning("1+1=2\n#### 2") == "1+1=2\n"
    assert reward.reasoning("1+1=2") == "1+1=2\n"
    tok = random_lm.tokenizer
    batch = make_batch(["1+1=?\n"], ["1+1=3\n#### 3"], references=["2"], tokenizer=tok)
    reward.bind(random_lm)
    context = batch.prompt_ids[0] + tok.encode("1+1=3\n#### ", add_special_tokens=False)
    target = tok.encode("2", add_special_tokens=False)
    with torch.no_grad():
        probs = random_lm.model(input_ids=torch.tensor([context + target])).logits[0, -2].softmax(-1)
    assert reward.compute(batch) == pytest.approx([float(probs[target[0]])], rel=1e-5)
    with pytest.raises(UserError, match="reference"):
        reward.compute(make_batch(["p"], ["c"], tokenizer=tok))


def test_orm_scores_with_and_without_chat_template(tmp_path):
    plain = save_tiny(tmp_path / "orm", "sequence", num_labels=1)
    orm = ORMReward(model=str(plain), device="cpu", batch_size=1)
    batch = make_batch(["1+1=?\n", "2+2=?\n"], ["#### 2", "2+2=4\n#### 4"])
    scores = orm.compute(batch)
    ids = orm.tokenizer("2+2=?\n2+2=4\n#### 4", return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        assert scores[1] == pytest.approx(float(orm.model(**ids).logits[0, 0]), rel=1e-5)
    assert len(set(scores)) == 2
    chat = save_tiny(tmp_path / "orm_chat", "sequence", num_labels=1,
                     chat_template="{% for m in messages %}#{{ m['content'] }}{% endfor %}")
    assert ORMReward(model=str(chat), device="cpu").text([{"role": "user", "content": "1+1=?"}], "2") == "#1+1=?#2"
    with pytest.raises(UserError, match="reward.model"):
        ORMReward()
