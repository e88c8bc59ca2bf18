"""Every advantage estimator against hand-computed values: single-sample groups, all-equal rewards,
ragged step counts, outcome rewards on the last token, and padding that must stay zero."""

import math

import pytest
import torch

from rewardlab.algos.advantages import dr_grpo, grpo, min_form, process, reinforce_pp, rloo

D = torch.float64


def close(a, b, tol=1e-6):
    return torch.allclose(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol)


# group 0: rewards 1, 0, 0, 1 ; group 1: a single sample ; group 2: all equal
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 2.0, 2.0], dtype=D)
GROUPS = torch.tensor([0, 0, 0, 0, 1, 2, 2])


def test_grpo_divides_by_group_std():
    std = math.sqrt(4 * 0.25 / 3)  # unbiased std of [1, 0, 0, 1]
    expected = [0.5 / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0]
    assert close(grpo(REWARDS, GROUPS), expected)


def test_dr_grpo_only_subtracts_the_mean():
    assert close(dr_grpo(REWARDS, GROUPS), [0.5, -0.5, -0.5, 0.5, 0, 0, 0])


def test_rloo_leave_one_out():
    # row 0: 1 - mean(0, 0, 1) = 2/3 ; row 1: 0 - mean(1, 0, 1) = -2/3 ; singleton and equal rows: 0
    assert close(rloo(REWARDS, GROUPS), [2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0])


def test_reinforce_pp_whitens_the_centred_rewards_over_the_batch():
    centred = [0.5, -0.5, -0.5, 0.5, 0.0, 0.0, 0.0]  # mean 0
    std = math.sqrt(sum(c * c for c in centred) / 6)
    assert close(reinforce_pp(REWARDS, GROUPS), [c / (std + 1e-4) for c in centred])
    assert close(reinforce_pp(torch.tensor([2.0, 2.0], dtype=D), torch.tensor([0, 0])), [0, 0])


def test_min_form_transform_approaches_the_min():
    w = math.exp(-10) / (1 + math.exp(-10))  # softmax(-[1, 0] / 0.1)[0]
    out = min_form([[1.0, 0.0], [0.5, 0.5], []], temperature=0.1)
    assert close(out[0], [w, 0.0]) and close(out[1], [0.25, 0.25]) and out[2] == []
    assert abs(sum(min_form([[0.9, 0.2, 0.7]], 0.01)[0]) - 0.2) < 1e-6


# three completions, ragged steps; rows 0 and 1 share a prompt, row 2 is alone; width 5
STEPS = [[1.0, 0.0], [1.0], [0.5, 0.5]]
ENDS = [[1, 3], [2], [0, 2]]
LENGTHS = torch.tensor([5, 4, 3])
PGROUPS = torch.tensor([0, 0, 1])


def test_process_sum_grpo_is_group_normalized_returns_to_go():
    s = math.sqrt(1 / 3) + 1e-4  # std of the group's steps [1, 0, 1] (mean 2/3)
    a, b = (1 / 3) / s, -(2 / 3) / s
    adv = process(STEPS, ENDS, LENGTHS, PGROUPS, credit="sum", baseline="grpo")
    assert close(adv, [[a + b, a + b, b, b, 0.0], [a, a, a, 0.0, 0.0], [0.0] * 5], 1e-5)


def test_process_sum_grpo_with_outcome_on_the_last_token():
    outcome = torch.tensor([1.0, 0.0, 1.0], dtype=D)
    adv = process(STEPS, ENDS, LENGTHS, PGROUPS, credit="sum", baseline="grpo", outcome=outcome,
                  outcome_weight=0.5)
    plain = process(STEPS, ENDS, LENGTHS, PGROUPS, credit="sum", baseline="grpo")
    o = 0.5 / (math.sqrt(0.5) + 1e-4)  # GRPO advantage of outcome [1, 0]
    assert close(adv - plain, [[0.5 * o] * 5, [-0.5 * o] * 4 + [0.0], [0.0] * 5], 1e-5)


def test_process_min_rloo_is_pure():
    c = math.exp(-10) / (1 + math.exp(-10))  # row 0's summed r*; row 1's is 1, row 2's 0.5
    adv = process(STEPS, ENDS, LENGTHS, PGROUPS, credit="min", baseline="rloo", temperature=0.1)
    # row 0: per-token baseline = row 1's 1 / 4 tokens; charges 2, 2 tokens at the steps and 1 at the tail
    row0 = [c - 1.25, c - 1.25, -0.75, -0.75, -0.25]
    # row 1: baseline = c / 5; step of 3 tokens, tail of 1
    row1 = [1 - 4 * c / 5] * 3 + [-c / 5, 0.0]
    # row 2 (its own baseline 0.5 / 3): steps of 1 and 2 tokens
    row2 = [0.0, 0.25 - 1 / 3, 0.25 - 1 / 3, 0.0, 0.0]
    assert close(adv, [row0, row1, row2])


def test_process_min_with_verifiable_outcome_uses_rloo():
    outcome = torch.tensor([1.0, 0.0, 1.0], dtype=D)
    adv = process(STEPS, ENDS, LENGTHS, PGROUPS, credit="min", baseline="rloo", outcome=outcome, outcome_weight=0.1)
    plain = process(STEPS, ENDS, LENGTHS, PGROUPS, credit="min", baseline="rloo")
    assert close(adv - plain, [[0.1] * 5, [-0.1] * 4 + [0.0], [0.0] * 5])


def test_process_sum_rloo_pays_more_steps_and_min_does_not():
    # identical completions except that row 1 repeats a good step: sum-form credits it, min-form does not
    steps, ends, lengths, groups = [[1.0, 1.0], [1.0, 1.0, 1.0]], [[1, 3], [1, 3, 5]], torch.tensor([6, 6]), torch.tensor([0, 0])
    summed = process(steps, ends, lengths, groups, credit="sum", baseline="rloo")
    minned = process(steps, ends, lengths, groups, credit="min", baseline="rloo")
    assert summed[1, 0] > 0 > summed[0, 0]
    assert abs(float(minned[1, 0])) < 1e-9 and abs(float(minned[0, 0])) < 1e-9


def test_process_rows_without_steps_or_tokens():
    adv = process([[], []], [[], []], torch.tensor([3, 0]), torch.tensor([0, 0]), credit="sum", baseline="grpo",
                  outcome=torch.tensor([1.0, 0.0], dtype=D))
    assert adv.shape == (2, 3)
    assert close(adv[1], [0, 0, 0]) and float(adv[0, 0]) > 0  # padding stays zero; the outcome still counts


def test_process_rejects_unknown_forms():
    with pytest.raises(ValueError):
        process(STEPS, ENDS, LENGTHS, PGROUPS, credit="max")
