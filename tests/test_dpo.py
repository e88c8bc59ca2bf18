"""Iterative DPO on the tiny policy: TRL training and its metrics, references, CREAM's soft label, and the
state that must survive a checkpoint (anchored rejection's initial samples, CREAM's previous reference)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rewardlab.algos import AlgoContext
from rewardlab.algos.dpo import IterativeDPO, soft_label_loss
from rewardlab.errors import UserError
from rewardlab.rewards.verifiable import VerifiableReward
from rewardlab.rollout import Batch


@pytest.fixture
def policy(tiny_policy):
    """A private copy of the tiny policy, so training here never changes the shared fixture."""
    return dataclasses.replace(tiny_policy, model=copy.deepcopy(tiny_policy.model))


def make_batch(tokenizer, groups: dict[str, list[str]], iteration: int = 1) -> Batch:
    """Rows for arith-like prompts `<pid>=?`; the reference answer of each prompt is 5."""
    rows = [(pid, c) for pid, completions in groups.items() for c in completions]
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    return Batch(prompt_id=[p for p, _ in rows], prompt=[f"{p}=?\n" for p, _ in rows],
                 completion=[c for _, c in rows], prompt_ids=[enc(f"{p}=?\n") for p, _ in rows],
                 completion_ids=[enc(c) for _, c in rows], finish_reason=["stop"] * len(rows),
                 reference=["5"] * len(rows), solution=[f"{p}=5\n#### 5" for p, _ in rows], iteration=iteration)


def scored(batch: Batch) -> Batch:
    VerifiableReward().score(batch)
    return batch


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_dpo_update_trains_on_pairs_and_reports_trl_metrics(policy):
    algo = IterativeDPO(AlgoContext(seed=0), lr=1e-3, epochs=3, batch_size=2, reference="initial")
    batch = scored(make_batch(policy.tokenizer, {"2+3": ["2+3=5\n#### 5", "2+3=6\n#### 6"],
                                                 "1+4": ["1+4=5\n#### 5", "1+4=9\n#### 9"],
                                                 "0+5": ["#### 5", "#### 5"]}))
    before = params(policy.model)
    m = algo.update(policy, batch)
    assert m["pairs/built"] == 2 and m["pairs/skipped/tie"] == 1
    assert m["pairs/chosen_reward"] == 1.0 and m["pairs/rejected_reward"] == 0.0
    assert {"loss", "dpo/margins", "dpo/accuracies", "dpo/chosen", "dpo/rejected"} <= set(m)
    assert m["dpo/margins"] > 0 and 0 < m["dpo/accuracies"] <= 1  # later epochs see the learned preference
    assert not torch.equal(before, params(policy.model)) and algo.updates == 1
    assert torch.equal(before, params(algo.initial))  # reference=initial stays the starting weights
    assert not policy.model.training


def test_no_pairs_skips_the_update(policy):
    algo = IterativeDPO(AlgoContext())
    before = params(policy.model)
    m = algo.update(policy, scored(make_batch(policy.tokenizer, {"2+3": ["#### 5", "#### 5"]})))
    assert m["pairs/built"] == 0 and m["update/skipped"] == 1.0 and "tie" in m["update/skip_reason"] and algo.updates == 0
    assert torch.equal(before, params(policy.model))


def test_previous_reference_is_the_model_that_sampled(policy):
    algo = IterativeDPO(AlgoContext(), lr=1e-3, reference="previous")
    batch = scored(make_batch(policy.tokenizer, {"2+3": ["#### 5", "#### 6"]}))
    before = params(policy.model)
    algo.update(policy, batch)
    assert torch.equal(before, params(algo.last_reference))
    after_first = params(policy.model)
    algo.update(policy, batch)
    assert torch.equal(after_first, params(algo.last_reference))


def test_soft_label_loss_is_lambda_mix_of_both_orientations():
    delta = torch.tensor([-3.0, -0.2, 0.0, 0.7, 4.0])
    loss = -F.logsigmoid(delta)
    for lam in (1.0, 0.8, 0.5, 0.0):
        expected = lam * -F.logsigmoid(delta) + (1 - lam) * -F.logsigmoid(-delta)
        assert torch.allclose(soft_label_loss(loss, torch.tensor(lam)), expected, atol=1e-5)


def test_settings_are_checked():
    with pytest.raises(UserError, match="algo.pairs"):
        IterativeDPO(AlgoContext(), pairs="worst_best")
    with pytest.raises(UserError, match="algo.reference"):
        IterativeDPO(AlgoContext(), reference="base")
    with pytest.raises(UserError, match="loss_type"):
        IterativeDPO(AlgoContext(), pairs="cream", loss_type=["ipo"])
    with pytest.raises(UserError, match="not_a_field"):
        IterativeDPO(AlgoContext(), trl={"not_a_field": 1})
    with pytest.raises(UserError, match="needs the run's reward"):
        IterativeDPO(AlgoContext(), pairs="anchored_rejection")
    IterativeDPO(AlgoContext(), trl={"label_smoothing": 0.1, "precompute_ref_log_probs": True})


def test_anchored_rejection_state_survives_a_checkpoint(policy, tmp_path):
    context = AlgoContext(reward=VerifiableReward(), max_new_tokens=8, temperature=1.0)
    algo = IterativeDPO(context, pairs="anchored_rejection", samples_per_prompt=2, lr=1e-3)
    first = scored(make_batch(policy.tokenizer, {"2+3": ["2+3=5\n#### 5", "2+3=7\n#### 7"]}))
    m = algo.update(policy, first)  # iteration 1: the policy is the initial model, its samples are the anchors
    assert m["pairs/built"] == 1 and m["anchors/stored_prompts"] == 1 and m["anchors/prompts_sampled"] == 0
    torch.save(algo.state_dict(), tmp_path / "algo.pt")

    resumed = IterativeDPO(context, pairs="anchored_rejection", samples_per_prompt=2, lr=1e-3)
    resumed.load_state_dict(torch.load(tmp_path / "algo.pt", weights_only=True), policy)
    assert resumed.updates == 1 and resumed.anchors == algo.anchors
    later = scored(make_batch(policy.tokenizer, {"2+3": ["2+3=5\n#### 5", "#### 5"]}, iteration=2))
    pairs, extra = resumed.build_pairs(policy, later)
    assert extra["anchors/prompts_sampled"] == 0  # known prompt: no new sampling, the stored samples are used
    assert [(p.chosen, p.rejected, p.rejected_reward) for p in pairs.pairs] == [("2+3=5\n#### 5", "2+3=7\n#### 7", 0.0)]


def test_anchors_for_new_prompts_come_from_the_initial_model(policy):
    context = AlgoContext(reward=VerifiableReward(), max_new_tokens=6, temperature=1.0)
    algo = IterativeDPO(context, pairs="anchored_rejection", samples_per_prompt=2)
    algo.updates = 1  # a later iteration: the policy is no longer the initial model
    algo.initial = copy.deepcopy(policy.model)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.zero_()  # the current policy would only write the first token; the anchors must not come from it
    pairs, extra = algo.build_pairs(policy, scored(make_batch(policy.tokenizer, {"1+4": ["#### 5", "#### 5"]})))
    assert extra["anchors/prompts_sampled"] == 1 and len(algo.anchors["1+4"]["completions"]) == 2
    assert any(len(set(c)) > 1 for c in algo.anchors["1+4"]["completions"])


def test_cream_previous_reference_survives_a_checkpoint(policy, tmp_path):
    algo = IterativeDPO(AlgoContext(), pairs="cream", reference="previous", lr=1e-3, batch_size=2)
    batch = scored(make_batch(policy.tokenizer, {"2+3": ["2+3=5\n#### 5", "2+3=6\n#### 6", "#### 7"],
                                                 "1+4": ["1+4=5\n#### 5", "#### 8", "1+4=8\n#### 8"]}))
    first = algo.update(policy, batch)  # no previous ranking yet: plain DPO labels
    assert first["pairs/label_mean"] == 1.0 and first["pairs/cream_undefined"] == 2
    implicit = algo._implicit_rewards(policy, batch)
    torch.save(algo.state_dict(), tmp_path / "algo.pt")
    resumed = IterativeDPO(AlgoContext(), pairs="cream", reference="previous", lr=1e-3, batch_size=2)
    resumed.load_state_dict(torch.load(tmp_path / "algo.pt", weights_only=True), policy)
    assert resumed._implicit_rewards(policy, batch) == pytest.approx(implicit, abs=1e-5)
    second = resumed.update(policy, batch)
    assert second["pairs/built"] == 2 and second["pairs/cream_undefined"] == 0
    assert 0.0 <= second["pairs/label_mean"] <= 1.0 and "dpo/margins" in second
