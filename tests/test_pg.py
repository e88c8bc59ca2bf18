"""GRPO advantages and the clipped loss against hand-computed values."""

import math

import torch

from rewardlab.algos.advantages import grpo, group_stats
from rewardlab.algos.pg import aggregate, clipped_loss


def test_grpo_advantage_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 5.0, 5.0], dtype=torch.float64)
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    adv = grpo(rewards, groups, eps=0.0)
    std = math.sqrt(((0.5**2) * 4) / 3)  # unbiased std of [1,0,0,1]
    expected = [0.5 / std, -0.5 / std, -0.5 / std, 0.5 / std]
    assert torch.allclose(adv[:4], torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(grpo(rewards, groups)[4:], torch.zeros(2, dtype=torch.float64))  # all equal: no signal


def test_group_stats_single_sample_group_has_zero_std():
    mean, std, size = group_stats(torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0, 1, 1]))
    assert mean.tolist() == [3.0, 1.5, 1.5] and std[0] == 0 and size.tolist() == [1, 2, 2]


def test_clipped_loss_and_aggregation_hand_computed():
    # two sequences, three token slots; the second has one padding token that must be masked
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.4, 0.9, 0.1]]))
    old = torch.log(torch.tensor([[0.5, 0.25, 0.5], [0.5, 0.5, 0.7]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    token_loss, stats = clipped_loss(logps, old, adv, mask, eps_low=0.2, eps_high=0.28)
    # ratios: [1, 2, 1] and [0.8, 1.8, (masked)]
    # seq 1 (A=+1): -min(r, clip(r))      -> [-1, -1.28, -1]
    # seq 2 (A=-2): -min(-2r, -2clip(r))  -> r=0.8: -min(-1.6,-1.6)=1.6 ; r=1.8: -min(-3.6,-2.56)=3.6
    expected = torch.tensor([[-1.0, -1.28, -1.0], [1.6, 3.6, 0.0]])
    assert torch.allclose(token_loss, expected, atol=1e-6)
    assert stats["clipped"].tolist()[0] == [0.0, 1.0, 0.0]
    seq_mean = aggregate(token_loss, mask, "sequence_mean", n_seqs=2, n_tokens=5.0, max_new_tokens=3)
    assert math.isclose(float(seq_mean), ((-3.28 / 3) + (5.2 / 2)) / 2, rel_tol=1e-6)
    tok_mean = aggregate(token_loss, mask, "token_mean", n_seqs=2, n_tokens=5.0, max_new_tokens=3)
    assert math.isclose(float(tok_mean), (-3.28 + 5.2) / 5, rel_tol=1e-6)
    const = aggregate(token_loss, mask, "constant", n_seqs=2, n_tokens=5.0, max_new_tokens=3)
    assert math.isclose(float(const), (-3.28 + 5.2) / 6, rel_tol=1e-6)


def test_k3_kl_term_hand_computed():
    logps = torch.log(torch.tensor([[0.5]]))
    ref = torch.log(torch.tensor([[0.25]]))
    token_loss, stats = clipped_loss(logps, logps.detach(), torch.tensor([0.0]), torch.ones(1, 1),
                                     0.2, 0.2, beta=0.1, ref_logps=ref)
    kl = 0.5 - math.log(0.5) - 1  # pi_ref/pi - log(pi_ref/pi) - 1
    assert math.isclose(float(stats["kl"]), kl, rel_tol=1e-6)
    assert math.isclose(float(token_loss), 0.1 * kl, rel_tol=1e-6)
