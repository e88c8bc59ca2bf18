"""PRIME's formulas (Cui et al. 2025; its code PRIME-RL/PRIME and verl's `masked_whiten`): the implicit reward,
its cross-entropy, the PRM's accuracy figures, the accuracy filter, and the advantages from process and outcome
rewards. Pure tensor functions (batch statistics over every rank); prime.py trains with them, and
tests/test_prime_formulas.py checks them against hand-computed examples and PRIME's code.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist
import torch.nn.functional as F

from rewardlab.algos.advantages import returns_to_go, rloo


def _all_reduce(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """`x` summed (or its maximum, op="max") over ranks; itself in one process."""
    if torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        x = x.clone()
        torch_dist.all_reduce(x, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return x


def implicit_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float) -> torch.Tensor:
    """(N, C) token rewards beta * (log pi_phi(y_t) - log pi_ref(y_t)), 0 past each completion."""
    return beta * (logps - ref_logps) * mask


def cross_entropy(logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                  beta: float) -> torch.Tensor:
    """(N,) the implicit PRM's outcome loss per rollout: BCE(sigmoid(r_phi(y)), label), r_phi the summed
    token rewards (with logits: the same value without sigmoid's underflow)."""
    r = implicit_rewards(logps, ref_logps, mask, beta).sum(-1)
    return F.binary_cross_entropy_with_logits(r, labels.to(r.dtype), reduction="none")


def pairwise_accuracy(sequence: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float:
    """PRIME's `compute_dpo_accuracy` (its logged PRM accuracy, free of the label base rate): per group,
    over pairs with different labels, the share where r_phi orders them like the labels (weighted by the
    label gap); 0.5 for a group whose labels are all equal; the mean over groups."""
    scores = []
    for g in range(int(groups.max()) + 1):
        rows = (groups == g).nonzero().squeeze(-1)
        upper = torch.triu(torch.ones(len(rows), len(rows), dtype=torch.bool), diagonal=1)
        gap = (labels[rows][:, None] - labels[rows][None, :])[upper]
        order = (sequence[rows][:, None] - sequence[rows][None, :])[upper]
        weight = gap.abs().sum()
        scores.append(0.5 if weight == 0 else float((((order > 0) == (gap > 0)).float() * gap.abs()).sum() / weight))
    return sum(scores) / len(scores)


def group_auc(sequence: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor) -> float | None:
    """The within-group AUC: over the groups holding both a right and a wrong rollout, the share of (right,
    wrong) pairs that r_phi orders right (a tie counts 1/2), averaged over those groups; None when no group
    is mixed. A constant or random scorer gets 0.5 whatever the share of right answers, unlike the sign
    accuracy (which a PRM calling everything right passes at the base rate) and PRIME's pairwise figure
    (which counts ties as wrong in one order and right in the other, and all-equal groups as 0.5)."""
    scores = []
    for g in range(int(groups.max()) + 1):
        rows = (groups == g).nonzero().squeeze(-1)
        right, wrong = sequence[rows][labels[rows] > 0.5], sequence[rows][labels[rows] <= 0.5]
        if len(right) and len(wrong):
            gap = right[:, None] - wrong[None, :]
            scores.append(float((gap > 0).float().mean() + 0.5 * (gap == 0).float().mean()))
    return sum(scores) / len(scores) if scores else None


def accuracy_filter(labels: torch.Tensor, groups: torch.Tensor, bounds: tuple) -> torch.Tensor:
    """(N,) 1.0 for the rollouts whose group's share of right answers lies in [lo, hi] (bounds included), else
    0.0: PRIME's `data.filter_accuracy` (its run script keeps 0.2-0.8), which trains the PRM on the groups that
    hold both right and wrong answers, so the loss contrasts answers to one prompt rather than easy prompts
    with hard ones."""
    size = int(groups.max()) + 1
    right = torch.zeros(size, dtype=labels.dtype).index_add_(0, groups, labels)
    count = torch.zeros(size, dtype=labels.dtype).index_add_(0, groups, torch.ones_like(labels))
    share = (right / count)[groups]
    lo, hi = bounds
    return ((share >= lo - 1e-9) & (share <= hi + 1e-9)).to(labels.dtype)


def batch_normalize(token_rewards: torch.Tensor) -> torch.Tensor:
    """PRIME's `batch_norm`: token rewards over (the largest |return-to-go| in the batch + 1e-6), so no
    process return exceeds 1 in size; the statistic is over every rank's rows."""
    largest = _all_reduce(returns_to_go(token_rewards).abs().max().reshape(1), "max")
    return token_rewards / (largest + 1e-6)


def process_rloo(token_rewards: torch.Tensor, mask: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """PRIME's RLOO on process rewards (`compute_rloo_returns`, key rm_scores): in a group of n, with m_j
    completion j's mean token reward, token t of completion i gets r_it * n/(n-1) - sum_j m_j / (n-1)
    (= r_it - the others' mean of means, taken with r_it standing in for m_i); a group of one gets 0."""
    lengths = mask.sum(-1).clamp(min=1)
    means = (token_rewards * mask).sum(-1) / lengths
    n = torch.zeros(int(groups.max()) + 1, dtype=means.dtype).index_add_(0, groups, torch.ones_like(means))[groups]
    total = torch.zeros(int(groups.max()) + 1, dtype=means.dtype).index_add_(0, groups, means)[groups]
    scale = (n / (n - 1).clamp(min=1))[:, None]
    out = (token_rewards * scale - (total / (n - 1).clamp(min=1))[:, None]) * mask
    return torch.where((n > 1)[:, None], out, torch.zeros_like(out))


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's `masked_whiten`: (x - mean) / sqrt(var + 1e-8) over the masked tokens of every rank,
    var with Bessel's correction; 0 on padding."""
    stats = _all_reduce(torch.stack([(values * mask).sum(), mask.sum()]))
    mean = stats[0] / stats[1]
    spread = _all_reduce(((values - mean) ** 2 * mask).sum().reshape(1))[0]
    var = spread / stats[1] * (stats[1] / (stats[1] - 1).clamp(min=1))
    return (values - mean) * torch.rsqrt(var + 1e-8) * mask


def prime_advantages(token_rewards: torch.Tensor, outcome: torch.Tensor, mask: torch.Tensor,
                     groups: torch.Tensor, whiten: bool = True) -> torch.Tensor:
    """(N, C) PRIME's advantages: RLOO returns (gamma = 1) of the process rewards and of the outcome
    reward (at each completion's last token), computed separately and added, then whitened."""
    process = returns_to_go(process_rloo(token_rewards, mask, groups))
    lengths = mask.sum(-1).long()
    final = torch.zeros_like(token_rewards)
    rows = torch.arange(len(lengths))[lengths > 0]
    final[rows, lengths[rows] - 1] = rloo(outcome.to(token_rewards.dtype), groups)[rows]
    returns = (process + returns_to_go(final)) * mask
    return masked_whiten(returns, mask) if whiten else returns
