"""Iterative DPO on the tiny policy: TRL training and its metrics, references, CREAM's soft label, and the
state that must survive a checkpoint (anchored rejection's initial samples, CREAM's previous models)."""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from rewardlab.algos import AlgoContext
from rewardlab.algos.dpo import IterativeDPO, soft_label_loss
from rewardlab.algos.pairs import kendall_tau
from rewardlab.checkpoint import Checkpointer
from rewardlab.data.base import Example, PromptSampler
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


def test_previous_reference_is_the_model_that_sampled(policy, monkeypatch):
    algo = IterativeDPO(AlgoContext(), lr=1e-3, reference="previous")
    references, train = [], algo._train
    monkeypatch.setattr(algo, "_train", lambda policy, pairs, reference: references.append(params(reference))
                        or train(policy, pairs, reference))
    batch = scored(make_batch(policy.tokenizer, {"2+3": ["#### 5", "#### 6"]}))
    before = params(policy.model)
    algo.update(policy, batch)
    after_first = params(policy.model)
    algo.update(policy, batch)
    assert torch.equal(before, references[0]) and torch.equal(after_first, references[1])


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


def sequence_logps(model, policy, batch) -> torch.Tensor:
    """Summed completion log-probs, computed here independently of the algorithm."""
    from rewardlab.algos.losses import to_tensors, token_logprobs

    t = to_tensors(batch, policy.tokenizer.pad_token_id, policy.device)
    with torch.no_grad():
        return (token_logprobs(model.eval(), t, slice(None), 1.0)[0] * t.completion_mask).sum(-1)


def test_cream_ranks_with_the_previous_model_and_its_state_survives_a_checkpoint(policy, tmp_path):
    algo = IterativeDPO(AlgoContext(), pairs="cream", reference="previous", lr=1e-2, batch_size=2)
    batch = scored(make_batch(policy.tokenizer, {"2+3": ["2+3=5\n#### 5", "2+3=6\n#### 6", "#### 7"],
                                                 "1+4": ["1+4=5\n#### 5", "#### 8", "1+4=8\n#### 8"]}))
    models = [copy.deepcopy(policy.model)]  # M_0, then the model after each update
    first = algo.update(policy, batch)  # no implicit reward yet: the run's reward ranks, plain DPO labels
    assert first["pairs/label_mean"] == 1.0 and first["pairs/cream_undefined"] == 2
    models.append(copy.deepcopy(policy.model))
    lp = [sequence_logps(m, policy, batch) for m in models]
    lengths = torch.tensor([len(c) for c in batch.completion_ids], dtype=lp[0].dtype)
    current, previous = algo._implicit_rewards(policy, batch, before=True)
    assert current == pytest.approx((lp[1] - lp[0]).tolist(), abs=1e-4)  # M_1 against its reference M_0
    assert previous == pytest.approx((lp[0] / lengths).tolist(), abs=1e-4)  # M_0: mean token log-likelihood

    algo.update(policy, batch)
    models.append(copy.deepcopy(policy.model))
    lp.append(sequence_logps(models[2], policy, batch))
    current, previous = algo._implicit_rewards(policy, batch, before=True)
    assert current == pytest.approx((lp[2] - lp[1]).tolist(), abs=1e-4)  # M_2 against M_1
    assert previous == pytest.approx((lp[1] - lp[0]).tolist(), abs=1e-4)  # M_1 against M_0, not M_2's ranking
    assert current != pytest.approx(previous, abs=1e-4)

    sampler = PromptSampler([Example("x", "1=?\n")], seed=0)
    Checkpointer(tmp_path).save(2, policy, algo, sampler)
    policy = dataclasses.replace(policy, model=copy.deepcopy(models[0]))  # a new process: M_0 until restored
    resumed = IterativeDPO(AlgoContext(), pairs="cream", reference="previous", lr=1e-2, batch_size=2)
    assert Checkpointer(tmp_path).restore(policy, resumed, sampler) == 2
    assert resumed.updates == 2 and len(resumed.snapshots) == 2
    assert resumed._implicit_rewards(policy, batch, before=True) == (
        pytest.approx(current, abs=1e-5), pytest.approx(previous, abs=1e-5))
    pairs, _ = resumed.build_pairs(policy, batch)
    groups = batch.groups()
    for pair, rows in zip(pairs.pairs, groups.values()):
        tau = kendall_tau([current[i] for i in rows], [previous[i] for i in rows])
        assert pair.label == pytest.approx((tau + 1) / 2)
        assert pair.chosen == batch.completion[max(rows, key=lambda i: current[i])]
    third = resumed.update(policy, batch)
    assert third["pairs/built"] == 2 and third["pairs/cream_undefined"] == 0 and "dpo/margins" in third


def test_cream_keeps_only_the_lora_adapters(tiny_policy):  # tiny_policy: built and cached
    from rewardlab.policy import load_policy

    lora = load_policy(device="cpu", lora={"r": 4}, log=lambda *_: None)
    algo = IterativeDPO(AlgoContext(), pairs="cream", lr=1e-2, batch_size=2)
    algo._remember(lora)  # what an update keeps before it trains
    (weights,) = algo.snapshots
    assert weights and all("lora_" in name for name in weights)
    with torch.no_grad():
        for name, p in lora.model.named_parameters():
            if "lora_B" in name:
                p.fill_(0.01)  # the policy moves on; the snapshot still holds its fresh (zero) B
    restored = dict(algo._snapshot(lora, 1).named_parameters())
    assert all(torch.equal(restored[name], value) for name, value in weights.items())


def test_cream_self_labels_the_rewards_agreement_with_the_policys_own_implicit_reward(policy):
    algo = IterativeDPO(AlgoContext(), pairs="cream_self", reference="previous", lr=1e-2, batch_size=2)
    batch = scored(make_batch(policy.tokenizer, {"2+3": ["2+3=5\n#### 5", "2+3=6\n#### 6", "#### 7"],
                                                 "1+4": ["1+4=5\n#### 5", "#### 8", "1+4=8\n#### 8"]}))
    before = copy.deepcopy(policy.model)
    algo.update(policy, batch)
    assert len(algo.snapshots) == 1  # M_0: the reference of M_1's implicit reward
    implicit = (sequence_logps(policy.model, policy, batch) - sequence_logps(before, policy, batch)).tolist()
    pairs, _ = algo.build_pairs(policy, batch)
    for pair, rows in zip(pairs.pairs, batch.groups().values()):
        assert pair.chosen == batch.completion[rows[0]]  # the run's reward (correctness) ranks
        tau = kendall_tau([batch.reward[i] for i in rows], [implicit[i] for i in rows])
        assert pair.label == pytest.approx((tau + 1) / 2, abs=1e-4)


@pytest.mark.parametrize("reference", ["initial", "previous"])
def test_dpo_trains_a_lora_policy_against_a_plain_reference(tiny_policy, reference):
    """TRL runs the reference through a fused LM-head forward that a PEFT wrapper breaks
    ('CausalLMOutputWithPast' has no 'last_hidden_state'): the reference is the merged model."""
    from rewardlab.policy import load_policy

    lora = load_policy(device="cpu", lora={"r": 4}, log=lambda *_: None)
    algo = IterativeDPO(AlgoContext(seed=0), lr=1e-2, epochs=2, batch_size=2, reference=reference)
    batch = scored(make_batch(lora.tokenizer, {"2+3": ["2+3=5\n#### 5", "2+3=6\n#### 6"],
                                               "1+4": ["1+4=5\n#### 5", "1+4=9\n#### 9"]}))
    adapters = {n: p.detach().clone() for n, p in lora.model.named_parameters() if p.requires_grad}
    m = algo.update(lora, batch)
    assert m["pairs/built"] == 2 and "loss" in m and "update/skipped" not in m
    after = dict(lora.model.named_parameters())
    assert any(not torch.equal(adapters[n], after[n]) for n in adapters)  # the adapters trained
    if reference == "initial":  # the merged initial model is the base: adapters start at zero effect
        base = dict(tiny_policy.model.named_parameters())
        assert all(torch.equal(p, base[n]) for n, p in algo.initial.named_parameters())
