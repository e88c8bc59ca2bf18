"""The policy-gradient update: token-level advantages in the loss, gradient accumulation that equals the
full-batch gradient for every aggregation, process credit end to end through `update`, settings checks."""

import copy
import dataclasses
import math

import pytest
import torch

from rewardlab.algos import AlgoContext
from rewardlab.algos.losses import aggregate, clipped_loss
from rewardlab.algos.pg import PolicyGradient
from rewardlab.errors import UserError
from rewardlab.policy import Policy
from rewardlab.rewards.arith_steps import ArithStepsReward
from rewardlab.rollout import Batch


@pytest.fixture(scope="module")
def small_policy():
    """A randomly initialised 1-layer model over the tiny character vocabulary (fast, no cache)."""
    from rewardlab.policy.tiny import TinyBuild, build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(TinyBuild(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64), tok)
    return Policy(model=model.eval(), tokenizer=tok, source="unused", device=torch.device("cpu"))


def make_batch(policy, prompts, completions, rewards=None, reference=None):
    tok = policy.tokenizer
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    n = len(completions)
    return Batch(prompt_id=[p for p in prompts], prompt=[f"{p}=?\n" for p in prompts], completion=completions,
                 prompt_ids=[tok(f"{p}=?\n", add_special_tokens=False)["input_ids"] for p in prompts],
                 completion_ids=ids, finish_reason=["stop"] * n, reference=[reference] * n, solution=[None] * n,
                 reward=rewards)


def test_token_level_advantages_in_the_loss_hand_computed():
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.5]]))  # ratios 2, 1, 1
    adv = torch.tensor([[1.0, -1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: its advantage must not count
    token_loss, stats = clipped_loss(logps, old, adv, mask, 0.2, 0.28)
    assert torch.allclose(token_loss, torch.tensor([[-1.28, 1.0, 0.0]]))
    assert stats["clipped"].tolist() == [[1.0, 0.0, 0.0]]
    assert math.isclose(float(aggregate(token_loss, mask, "token_mean", 1, 2.0, 8)), -0.14, rel_tol=1e-6)


def grads_after_update(policy, batch, **settings):
    """The gradients the optimizer stepped with (the update frees them afterwards, which is checked)."""
    algo = PolicyGradient(AlgoContext(temperature=1.0, max_new_tokens=12), lr=0.0, max_grad_norm=0.0, **settings)
    algo.setup(policy)
    seen, step = {}, algo.optimizer.step

    def snapshot(*args, **kwargs):
        seen.update({n: p.grad.clone() for n, p in policy.model.named_parameters()})
        return step(*args, **kwargs)

    algo.optimizer.step = snapshot
    out = algo.update(policy, batch)
    assert all(p.grad is None for p in policy.model.parameters())  # not kept through the next generation
    return seen, out


@pytest.mark.parametrize("loss_agg", ["sequence_mean", "token_mean", "constant"])
def test_gradient_accumulation_equals_the_full_batch(small_policy, loss_agg):
    batch = make_batch(small_policy, ["1+2", "1+2", "3+4", "3+4"], ["1+2=3\n#### 3", "1", "3+4=7", "#### 8 9 9"],
                       rewards=[1.0, 0.0, 1.0, 0.0])
    full, _ = grads_after_update(small_policy, batch, loss_agg=loss_agg, micro_batch_size=64)
    micro, _ = grads_after_update(small_policy, batch, loss_agg=loss_agg, micro_batch_size=1)
    for name in full:
        assert torch.allclose(full[name], micro[name], atol=1e-7, rtol=1e-5), name
    assert any(g.abs().sum() > 0 for g in full.values())


def test_process_credit_through_update(small_policy):
    batch = make_batch(small_policy, ["17+5"] * 3, ["17+5=22\n#### 22", "17+5=23\n#### 23", "17+5=22\n#### 21"],
                       reference="22")
    ArithStepsReward().score(batch)
    batch.rewards["verifiable"] = [1.0, 0.0, 0.0]
    algo = PolicyGradient(AlgoContext(max_new_tokens=16), advantage="grpo", credit="sum", outcome="verifiable")
    out = algo.update(small_policy, batch)
    assert [len(a) for a in batch.advantages] == [len(c) for c in batch.completion_ids]
    first, second, third = batch.advantages
    assert first[0] > 0 > second[0]  # all steps right vs all wrong
    assert third[0] > third[8]  # the wrong answer line lowers only the tokens up to it
    assert math.isfinite(out["loss"]) and out["grad_norm"] > 0


def test_several_passes_use_the_sampling_log_probs(small_policy):
    batch = make_batch(small_policy, ["1+2", "1+2"], ["1+2=3", "1+2=4"], rewards=[1.0, 0.0])
    algo = PolicyGradient(AlgoContext(max_new_tokens=8), lr=0.05, num_iterations=3, eps_low=0.01, eps_high=0.01)
    out = algo.update(small_policy, batch)
    assert out["update/steps"] == 3.0 and out["clip_fraction"] > 0  # later passes moved past the clip range


@pytest.mark.parametrize("settings,message", [
    ({"advantage": "dr_grpo", "credit": "sum"}, "baseline from algo.advantage"),
    ({"credit": "max"}, "not one of outcome, sum, min"),
    ({"outcome": "verifiable"}, "set algo.credit=sum or min"),
    ({"loss_agg": "mean"}, "algo.loss_agg"),
    ({"advantage": "ppo"}, "algo.advantage"),
    ({"lr_schedule": "step"}, "algo.lr_schedule"),
    ({"minibatch_order": "prompts"}, "algo.minibatch_order='prompts' is not one of groups, rows"),
])
def test_bad_settings_fail_with_the_fix(settings, message):
    with pytest.raises(UserError, match=message):
        PolicyGradient(AlgoContext(), **settings)


def test_minibatches_are_cut_from_whole_groups_or_from_shuffled_rows(small_policy):
    """`groups`: the groups in random order, each one's rows together (minibatches of whole groups where the
    size is a multiple of the group size); `rows`: a permutation of the rows. Both draw from the algorithm's own
    generator (checkpointed), so a resumed run cuts the same minibatches."""
    prompts = ["1+2"] * 4 + ["3+4"] * 4 + ["5+6"] * 4 + ["7+8"] * 4
    batch = make_batch(small_policy, prompts, ["1"] * 16, rewards=[float(i % 2) for i in range(16)])
    algo = PolicyGradient(AlgoContext(seed=3), minibatch_order="groups")
    orders = [algo._order(batch).tolist() for _ in range(6)]
    for order in orders:
        assert sorted(order) == list(range(16))
        blocks = [order[i : i + 4] for i in range(0, 16, 4)]
        assert all(len({prompts[r] for r in block}) == 1 for block in blocks)  # each minibatch of 4: one group
    assert len({tuple(o) for o in orders}) > 1  # the group order is shuffled
    rows = PolicyGradient(AlgoContext(seed=3), minibatch_order="rows")
    order = rows._order(batch).tolist()
    assert sorted(order) == list(range(16)) and order != list(range(16))
    again = PolicyGradient(AlgoContext(seed=3), minibatch_order="groups")
    assert [again._order(batch).tolist() for _ in range(6)] == orders


def test_process_credit_needs_a_process_reward(small_policy):
    batch = make_batch(small_policy, ["1+2"], ["1+2=3"], rewards=[1.0])
    with pytest.raises(UserError, match="needs a process reward"):
        PolicyGradient(AlgoContext(), advantage="rloo", credit="min").update(small_policy, batch)


def test_learning_rate_schedule():
    algo = PolicyGradient(AlgoContext(total_iterations=10), lr_schedule="linear", lr_warmup_iterations=2)
    factors = []
    for updates in (0, 1, 2, 6, 10):
        algo.updates = updates
        factors.append(algo.lr_factor())
    assert factors == pytest.approx([0.5, 1.0, 1.0, 0.5, 0.0])
    algo = PolicyGradient(AlgoContext(total_iterations=4), lr_schedule="cosine")
    algo.updates = 2
    assert algo.lr_factor() == pytest.approx(0.5)


def test_the_reference_policy_is_built_only_when_the_kl_term_is_on(small_policy, monkeypatch):
    """beta = 0: no reference model is loaded or run (a second full copy of the weights for nothing)."""
    batch = make_batch(small_policy, ["1+2", "1+2"], ["1+2=3", "4"], rewards=[1.0, 0.0])
    built = []
    monkeypatch.setattr(Policy, "load_fresh", lambda self: built.append(1) or copy.deepcopy(small_policy.model))
    out = grads_after_update(small_policy, batch, beta=0.0)[1]
    assert not built and small_policy._reference is None and "kl" not in out
    out = grads_after_update(small_policy, batch, beta=0.1)[1]
    assert built == [1] and out["kl"] == pytest.approx(0.0, abs=1e-6)  # lr 0: the reference equals the policy
    small_policy._reference = None


def trained_copy(policy, batch, lr=1e-2, **settings):
    """A copy of `policy` after one update with `settings` (lr 1e-2: AdamW's moments move the weights even on a
    step whose gradient is zero): its weights, the gradients of each optimizer step, the update's metrics."""
    policy = Policy(model=copy.deepcopy(policy.model), tokenizer=policy.tokenizer, source="unused",
                    device=policy.device)
    algo = PolicyGradient(AlgoContext(temperature=1.0, max_new_tokens=12, seed=3), lr=lr, **settings)
    algo.setup(policy)
    grads, step = [], algo.optimizer.step

    def snapshot(*args, **kwargs):
        grads.append({n: p.grad.clone() for n, p in policy.model.named_parameters()})
        return step(*args, **kwargs)

    algo.optimizer.step = snapshot
    out = algo.update(policy, batch)
    return {n: p.detach().clone() for n, p in policy.model.named_parameters()}, grads, out


@pytest.mark.parametrize("minibatch", [0, 1, 3])
@pytest.mark.parametrize("padding_free", [False, True])
def test_rows_with_zero_advantage_skip_the_backward_and_nothing_changes(small_policy, minibatch, padding_free):
    """Rows of a group whose rewards are all equal have advantage 0: left out of the backward, every optimizer
    step's gradients and the update's metrics (loss, entropy, clip fraction, gradient norm) equal the full
    pass's to rounding (fewer rows make smaller matrix products, whose sums may round differently: 7e-9 on
    gradients of scale 0.06 on an AMD EPYC, 0 on a Xeon); on padded rows the weights after an update at lr 1e-2
    equal the full pass's to 1e-6 (packed, other rows share the bins: rounding, which AdamW's normalization
    lifts on near-zero gradients, so the gradients are compared there, at lr 0). With one row per minibatch
    some minibatches have no row left: the optimizer still steps, on zero gradients."""
    batch = make_batch(small_policy, ["1+2", "1+2", "3+4", "3+4", "3+4", "5+6"],
                       ["1+2=3", "1+2=4", "3+4=7", "3+4=7\n#### 7", "7", "5+6=11"],
                       rewards=[1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    settings = dict(minibatch_size=minibatch, num_iterations=2, padding_free=padding_free,
                    lr=0.0 if padding_free else 1e-2)
    full, full_grads, full_out = trained_copy(small_policy, batch, skip_zero_advantage=False, **settings)
    skip, skip_grads, skip_out = trained_copy(small_policy, batch, **settings)
    assert skip_out["update/skipped_rows"] == pytest.approx(4 / 6) and full_out["update/skipped_rows"] == 0.0
    assert len(skip_grads) == len(full_grads) == {0: 2, 1: 12, 3: 4}[minibatch]
    for ours, theirs in zip(skip_grads, full_grads):
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], atol=1e-7, rtol=1e-5), name
    if minibatch == 1:
        assert any(all(g.abs().sum() == 0 for g in step.values()) for step in skip_grads)
    for name in full:  # a step on a wrong gradient, or a missing step, moves weights by ~lr = 1e-2
        assert torch.allclose(full[name], skip[name], atol=1e-6, rtol=0.0), name
    for key in ("loss", "entropy", "clip_fraction", "grad_norm", "update/steps"):
        assert skip_out[key] == pytest.approx(full_out[key], rel=1e-5, abs=1e-7), key
    if not padding_free:
        assert all((skip[n] - p).abs().max() > 0 for n, p in small_policy.model.named_parameters())


@pytest.mark.parametrize("skip", [True, False])
def test_entropy_recorded_while_decoding_replaces_the_update_s_entropy_passes(small_policy, monkeypatch, skip):
    """Where the generator recorded each token's sampling entropy, the `entropy` metric is its token mean over
    the batch and no pass of the update computes entropy (no forward without a graph for skipped rows, no
    entropy in the forward with one). At lr 0 in one step the policy of the update is the sampling policy, so
    the recorded figure equals the one the passes measure when nothing was recorded."""
    from rewardlab.algos import pg
    from rewardlab.data.base import Example
    from rewardlab.generation.hf import HFGenerator, Sampling

    torch.manual_seed(5)
    examples = [Example(id=p, prompt=f"{p}=?\n") for p in ("1+2", "3+4", "5+6")]
    batch = HFGenerator(small_policy, sampling=Sampling(temperature=1.0, max_new_tokens=12)).generate(examples, n=4)
    assert [len(e) for e in batch.sample_entropy] == [len(c) for c in batch.completion_ids]
    batch.reward = [1.0, 0.0, 1.0, 0.0] + [1.0] * 4 + [0.0] * 4  # two groups of equal rewards: skipped rows
    settings = dict(minibatch_size=0, lr=0.0, skip_zero_advantage=skip)
    measured = trained_copy(small_policy, dataclasses.replace(batch, sample_entropy=None), **settings)[2]
    asked = []
    real = pg.token_logprobs

    def counting(*args, **kwargs):
        asked.append(kwargs.get("with_entropy", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(pg, "token_logprobs", counting)
    monkeypatch.setattr(PolicyGradient, "_entropy_sum", lambda *a: pytest.fail("a pass measured the entropy"))
    recorded = trained_copy(small_policy, batch, **settings)[2]
    assert asked and not any(asked)
    tokens = sum(len(c) for c in batch.completion_ids)
    assert recorded["entropy"] == pytest.approx(sum(map(sum, batch.sample_entropy)) / tokens, rel=1e-6)
    assert recorded["entropy"] == pytest.approx(measured["entropy"], rel=1e-5)
    assert recorded["update/skipped_rows"] == pytest.approx(8 / 12 if skip else 0.0)
    for key in ("loss", "clip_fraction", "grad_norm"):
        assert recorded[key] == pytest.approx(measured[key], rel=1e-5, abs=1e-7), key


def test_rows_with_zero_advantage_go_through_the_backward_when_the_kl_term_is_on(small_policy, monkeypatch):
    """beta > 0: the KL term gives every row a gradient, so none is skipped."""
    batch = make_batch(small_policy, ["1+2", "1+2", "3+4", "3+4"], ["1+2=3", "4", "3+4=7", "7"],
                       rewards=[1.0, 0.0, 1.0, 1.0])
    monkeypatch.setattr(Policy, "load_fresh", lambda self: copy.deepcopy(small_policy.model))
    assert trained_copy(small_policy, batch, beta=0.1)[2]["update/skipped_rows"] == 0.0
    small_policy._reference = None


def repeated_batch(policy):
    """Two groups of four whose samples repeat one another, as a group's samples often do; in the second group
    the copies of "7" got different rewards (a sampled judge), so copies keep their own advantages."""
    return make_batch(policy, ["1+2"] * 4 + ["3+4"] * 4,
                      ["1+2=3", "1+2=3", "1+2=4", "1+2=3", "7", "3+4=7", "7", "7"],
                      rewards=[1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("minibatch", [0, 4])
@pytest.mark.parametrize("padding_free", [False, True])
@pytest.mark.parametrize("loss_agg", ["sequence_mean", "token_mean"])
def test_repeated_rollouts_go_through_the_model_once_and_nothing_changes(small_policy, monkeypatch, minibatch,
                                                                         padding_free, loss_agg):
    """Rows that are the same rollout take one row of the forward/backward (`algo.unique_rows`, default): the
    old log-probs' pass and every optimizer step's pass see each distinct rollout once, and every optimizer
    step's gradients (at lr 0, so each step sees the same weights), the update's metrics and the weights after
    an update at lr 1e-2 equal one pass per row to rounding."""
    from rewardlab.algos import losses

    batch = repeated_batch(small_policy)
    settings = dict(minibatch_size=minibatch, num_iterations=2, padding_free=padding_free, loss_agg=loss_agg)
    passes, real = [], losses.token_logprobs

    def counting(model, t, rows, *args, **kwargs):
        if not kwargs.get("unique", True):
            passes.append(len(torch.arange(t.input_ids.shape[0])[rows]))
        return real(model, t, rows, *args, **kwargs)

    monkeypatch.setattr(losses, "token_logprobs", counting)
    _, full_grads, full_out = trained_copy(small_policy, batch, unique_rows=False, lr=0.0, **settings)
    assert passes == []  # with unique_rows=false every pass takes every row (no call with unique=False)
    _, once_grads, once_out = trained_copy(small_policy, batch, lr=0.0, **settings)
    # the old log-probs' pass: the 4 distinct rollouts of 8; then 2 iterations of the whole batch (4 each) or
    # of 2 minibatches of one group each (2 of the group's 4)
    assert passes == {0: [4, 4, 4], 4: [4] + [2] * 4}[minibatch]
    assert len(once_grads) == len(full_grads) == {0: 2, 4: 4}[minibatch]
    for ours, theirs in zip(once_grads, full_grads):
        for name in ours:
            assert torch.allclose(ours[name], theirs[name], atol=1e-7, rtol=1e-5), name
    for key in ("loss", "entropy", "clip_fraction", "grad_norm", "update/steps", "advantage/abs_mean"):
        assert once_out[key] == pytest.approx(full_out[key], rel=1e-5, abs=1e-7), key
    # each optimizer step's pass: half its rows took a copy's log-probs (logged), none with the setting off
    assert once_out["update/repeated_rows"] == 0.5 and full_out["update/repeated_rows"] == 0.0
    full = trained_copy(small_policy, batch, unique_rows=False, lr=1e-2, **settings)[0]
    once = trained_copy(small_policy, batch, lr=1e-2, **settings)[0]
    for name in full:  # a wrong or missing step moves weights by ~lr = 1e-2; AdamW's first steps divide each
        # gradient by its own size, so rounding on gradients of ~1e-8 moves a few weights by up to ~7e-6
        assert torch.allclose(full[name], once[name], atol=3e-5, rtol=0.0), name
    assert all((once[n] - p).abs().max() > 1e-3 for n, p in small_policy.model.named_parameters())


def test_repeated_rows_share_one_pass_only_where_the_forward_is_deterministic(small_policy):
    """`token_logprobs` gives each copy of a row the log-probs, entropy and gradient of its own pass, and
    under active dropout (copies would draw different masks) runs every row."""
    from rewardlab.algos.losses import distinct_rows, to_tensors, token_logprobs

    batch = repeated_batch(small_policy)
    t = to_tensors(batch, small_policy.tokenizer.pad_token_id, torch.device("cpu"))
    first, copies = distinct_rows(t, slice(None))
    assert first.tolist() == [0, 2, 4, 5] and copies.tolist() == [0, 0, 1, 0, 2, 3, 2, 2]
    assert distinct_rows(t, torch.tensor([2, 5, 0])) is None
    model = copy.deepcopy(small_policy.model).train()
    weights = torch.rand(t.completion_mask.shape, generator=torch.Generator().manual_seed(1))
    results = []
    for unique in (True, False):
        model.zero_grad()
        logps, entropy = token_logprobs(model, t, slice(None), 1.0, with_entropy=True, unique=unique)
        (logps * weights * t.completion_mask).sum().backward()
        results.append((logps.detach(), entropy, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (a, ea, ga), (b, eb, gb) = results
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(ea, eb, atol=1e-6)
    for name in ga:  # to rounding: ~2e-7 of each gradient's largest entry on an AMD EPYC
        assert (ga[name] - gb[name]).abs().max() <= 1e-5 * gb[name].abs().max(), name
    seen = []
    handle = model.get_input_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    counts = []
    try:
        for dropout, training in ((0.0, True), (0.1, True), (0.1, False)):
            model.config.attention_dropout = dropout
            model.train(training)
            counts.append({})
            token_logprobs(model, t, slice(None), 1.0, counts=counts[-1])
    finally:
        handle.remove()
        model.config.attention_dropout = 0.0
    assert seen == [4, 8, 4]  # distinct rows once; every row under dropout; once again in eval mode
    assert counts == [{"repeated": 4}, {}, {"repeated": 4}]  # what the update logs as update/repeated_rows
