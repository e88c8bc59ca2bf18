"""PRIME's formulas (rewardlab/algos/prime_formulas.py): the implicit reward and its cross-entropy update, the
RLOO returns, the AUC, the accuracy filter, against hand-computed values and against PRIME's own code."""

from __future__ import annotations

import math

import pytest
import torch

from rewardlab.algos.prime_formulas import (accuracy_filter, batch_normalize, cross_entropy, group_auc,
                                            implicit_rewards, pairwise_accuracy, prime_advantages,
                                            process_rloo)

PRIME_COMMIT = "18ad596f08d487bb546d80d738d99ec697bd2e75"  # github.com/PRIME-RL/PRIME


def test_implicit_reward_and_cross_entropy_equal_a_hand_computed_example():
    logps = torch.log(torch.tensor([[0.5, 0.25, 0.9], [0.125, 0.5, 0.5]])).requires_grad_(True)
    ref = torch.log(torch.tensor([[0.25, 0.25, 0.1], [0.5, 0.5, 0.25]]))
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])  # row 0's third token is padding
    labels = torch.tensor([1.0, 0.0])
    rewards = implicit_rewards(logps, ref, mask, beta=0.5)
    half_ln2 = 0.5 * math.log(2)
    assert torch.allclose(rewards, torch.tensor([[half_ln2, 0, 0], [-2 * half_ln2, 0, half_ln2]]))
    # r_phi = +-ln2/2, sigmoid(ln2/2) = 2 - sqrt2: loss -ln(2 - sqrt2) for the right label on both rows
    loss = cross_entropy(logps, ref, mask, labels, beta=0.5)
    assert torch.allclose(loss, torch.tensor([-math.log(2 - math.sqrt(2))] * 2))
    # the update's gradient: d mean(loss) / d log pi_phi(y_t) = beta * (sigmoid(r_phi) - label) / N per real token
    loss.mean().backward()
    g = 0.5 * (2 - math.sqrt(2) - 1) / 2
    assert torch.allclose(logps.grad, torch.tensor([[g, g, 0.0], [-g, -g, -g]]))


def test_process_and_outcome_rloo_returns_hand_computed():
    rewards = torch.tensor([[1.0, 3.0], [4.0, 0.0], [5.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    groups = torch.tensor([0, 0, 1])  # the third completion is alone: no baseline, advantage 0
    # group 0: means 2 and 4, n = 2: r * 2 - (2 + 4) / 1
    assert torch.allclose(process_rloo(rewards, mask, groups), torch.tensor([[-4.0, 0.0], [2.0, 0.0], [0.0, 0.0]]))
    outcome = torch.tensor([1.0, 0.0, 1.0])
    returns = prime_advantages(rewards, outcome, mask, groups, whiten=False)
    # process returns-to-go [-4, 0] / [2]; outcome RLOO +1 / -1 at the last token, returned to every earlier one
    assert torch.allclose(returns, torch.tensor([[-3.0, 1.0], [1.0, 0.0], [0.0, 0.0]]))
    whitened = prime_advantages(rewards, outcome, mask, groups)
    values = torch.tensor([-3.0, 1.0, 1.0, 0.0, 0.0])  # the five real tokens
    expected = (values - values.mean()) / values.std()
    assert torch.allclose(whitened[mask.bool()], expected, atol=1e-6) and whitened[1, 1] == 0


def test_group_auc_hand_computed_and_blind_to_the_base_rate():
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    labels = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    scores = torch.tensor([2.0, 1.0, 0.0, 0.0, 5.0, 5.0, 3.0, 3.0])
    # group 0: right {2, 0} vs wrong {1, 0}: 1 + 1 + 0 + 1/2 of 4 pairs; group 1 has no wrong one (left out);
    # group 2: a tie, 1/2
    assert group_auc(scores, labels, groups) == pytest.approx((2.5 / 4 + 0.5) / 2)
    mostly_right = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    assert group_auc(torch.zeros(8), mostly_right, groups) == 0.5  # a constant scorer, 75% right: still 0.5
    assert group_auc(-scores, labels, groups) == pytest.approx(1 - (2.5 / 4 + 0.5) / 2)  # reversed order
    assert group_auc(scores, torch.ones(8), groups) is None  # nothing to rank


# ---- PRIME's code, transcribed from PRIME-RL/PRIME at PRIME_COMMIT --------------------------------------
def prime_ce_loss(token_level_scores, acc, eos_mask, beta):
    """training/verl/trainer/ppo/core_algos.py: compute_ce_dpo_loss_rm."""
    cur_scores = ((token_level_scores * eos_mask).sum(dim=1) * beta).sigmoid()
    return torch.nn.functional.binary_cross_entropy(cur_scores, acc)


def prime_batch_norm(token_level_scores):
    """training/verl/workers/actor/dp_prime.py: update_policy, prime_norm == 'batch_norm'."""
    reverse_cumsum = torch.cumsum(token_level_scores.flip(dims=[1]), dim=-1).flip(dims=[1])
    return token_level_scores / (reverse_cumsum.abs().max() + 1e-6)


def verl_masked_whiten(values, mask):
    """training/verl/utils/torch_functional.py: masked_mean, masked_var (unbiased), masked_whiten."""
    mean = (values * mask).sum() / mask.sum()
    var = (((values - mean) ** 2) * mask).sum() / mask.sum() * (mask.sum() / (mask.sum() - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def prime_rloo_returns(scores: dict, eos_mask, n_samples):
    """training/verl/trainer/ppo/core_algos.py: compute_rloo_returns with gamma 1 (run_prime_main.sh)."""
    discount_rewards = []
    for k, v in scores.items():
        if k == "rm_scores":
            reward_mask = eos_mask.bool()
        else:  # gt_scores
            valid_response_length = eos_mask.sum(-1).long()
            reward_mask = torch.zeros_like(v, dtype=torch.bool)
            reward_mask[torch.arange(0, valid_response_length.shape[0]), valid_response_length - 1] = True
        reward_tensor = v.clone()
        reward_tensor[~reward_mask] = 0
        for start_pos in range(0, reward_tensor.shape[0], n_samples):
            cur_rewards_mean = torch.cat([reward_tensor[pos:pos + 1][reward_mask[pos:pos + 1]].mean(dim=0, keepdim=True)
                                          for pos in range(start_pos, start_pos + n_samples)], dim=0)
            cur_reward_baseline = cur_rewards_mean.sum() / (n_samples - 1)
            rows = slice(start_pos, start_pos + n_samples)
            reward_tensor[rows][reward_mask[rows]] = (reward_tensor[rows][reward_mask[rows]] * (n_samples / (n_samples - 1))
                                                      - cur_reward_baseline)
        discount_reward = torch.zeros_like(reward_tensor)
        for step in reversed(range(reward_tensor.shape[1])):
            later = discount_reward[:, step + 1] if step < reward_tensor.shape[1] - 1 else 0
            discount_reward[:, step] = reward_tensor[:, step] + later
        discount_rewards.append(discount_reward)
    return verl_masked_whiten(sum(discount_rewards), eos_mask)


def prime_dpo_accuracy(token_level_scores, acc, eos_mask, n_samples):
    """training/verl/trainer/ppo/core_algos.py: compute_dpo_accuracy."""
    dpo_acc = []
    for start_id in range(0, token_level_scores.shape[0], n_samples):
        cur_scores = (token_level_scores[start_id:start_id + n_samples] * eos_mask[start_id:start_id + n_samples]).sum(dim=1)

        def get_upper_triangle(tensor_x):
            diff_matrix = tensor_x.unsqueeze(1) - tensor_x.unsqueeze(0)
            return diff_matrix[torch.triu(torch.ones_like(diff_matrix).bool(), diagonal=1)]

        cur_acc_diff = get_upper_triangle(acc[start_id:start_id + n_samples])
        cur_score_diff = get_upper_triangle(cur_scores)
        if cur_acc_diff.abs().sum() == 0:
            cur_acc = torch.zeros_like((cur_score_diff > 0).float()[0]) + 0.5
        else:
            cur_acc = (((cur_score_diff > 0) == (cur_acc_diff > 0)).float() * cur_acc_diff.abs()).sum() / cur_acc_diff.abs().sum()
        dpo_acc.append(cur_acc.unsqueeze(0))
    return torch.cat(dpo_acc, dim=0).mean()


def test_the_formulas_equal_prime_code_on_the_same_inputs():
    torch.manual_seed(3)
    n, groups_of, width, beta = 4, 3, 7, 0.05
    lengths = torch.randint(2, width + 1, (n * groups_of,))
    mask = (torch.arange(width)[None, :] < lengths[:, None]).float()
    logps, ref = -torch.rand(n * groups_of, width) * 3, -torch.rand(n * groups_of, width) * 3
    acc = torch.randint(0, 2, (n * groups_of,)).float()
    groups = torch.arange(groups_of).repeat_interleave(n)

    ours = cross_entropy(logps, ref, mask, acc, beta).mean()
    assert torch.allclose(ours, prime_ce_loss(logps - ref, acc, mask, beta))  # PRIME's q excludes beta

    q = (logps - ref) * mask  # PRIME's token-granularity scores: q on each response token
    gt = torch.zeros_like(q)
    gt[torch.arange(len(lengths)), lengths - 1] = acc
    theirs = prime_rloo_returns({"rm_scores": prime_batch_norm(q), "gt_scores": gt}, mask, n)
    token_rewards = batch_normalize(implicit_rewards(logps, ref, mask, beta))  # beta cancels in the norm
    ours = prime_advantages(token_rewards, acc, mask, groups)
    assert torch.allclose(ours, theirs * mask, atol=1e-4)

    sequence = implicit_rewards(logps, ref, mask, beta).sum(-1)
    same = torch.tensor([1.0, 1.0, 1.0, 1.0])  # a group whose labels are all equal counts 0.5, as in PRIME
    labels = torch.cat([acc[:8], same])
    assert pairwise_accuracy(sequence, labels, groups) == pytest.approx(float(prime_dpo_accuracy(q, labels, mask, n)))


def test_the_accuracy_filter_keeps_the_groups_within_the_bounds_inclusive():
    groups = torch.arange(5).repeat_interleave(5)
    labels = torch.tensor([1.0 if i < k else 0.0 for k in (0, 1, 3, 4, 5) for i in range(5)])  # shares 0 .2 .6 .8 1
    kept = accuracy_filter(labels, groups, (0.2, 0.8))
    assert kept.tolist() == [0.0] * 5 + [1.0] * 15 + [0.0] * 5
    assert accuracy_filter(labels, groups, (0.0, 1.0)).tolist() == [1.0] * 25
