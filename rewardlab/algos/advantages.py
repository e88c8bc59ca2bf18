"""Advantage estimators, each one named function selected by `algo.advantage` (METHODS.md §1).

Outcome estimators take `rewards` (N,) and `groups` (N,) long tensor of group indices (rows of the
same prompt share an index) and return per-completion advantages (N,); the update broadcasts them
over the completion's tokens. A group of one sample has no baseline and gets advantage 0.

`process` (selected by `algo.credit=sum|min` rather than by name) turns per-step rewards into per-token advantages (N, C): step k's score sits on the step's
last token, an optional outcome reward on the completion's last token, and a token's advantage is
the sum over its own and all later positions. `credit=sum` normalizes the group's step rewards
(GRPO §4.1.3); `credit=min` is PURE: the softmax(-r/T) transform, then a token-level RLOO baseline.
"""

from __future__ import annotations

from typing import Callable

import torch

ESTIMATORS: dict[str, Callable[..., torch.Tensor]] = {}


def estimator(name: str):
    def register(fn):
        ESTIMATORS[name] = fn
        return fn
    return register


def group_stats(values: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row group mean, group (unbiased) std and group size, each (N,). Std is 0 for singletons."""
    n_groups = int(groups.max()) + 1 if groups.numel() else 0
    size = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, groups, torch.ones_like(values))
    total = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, groups, values)
    mean = total / size
    sq = torch.zeros(n_groups, dtype=values.dtype).index_add_(0, groups, (values - mean[groups]) ** 2)
    std = torch.where(size > 1, (sq / (size - 1).clamp(min=1)).sqrt(), torch.zeros_like(size))
    return mean[groups], std[groups], size[groups]


def leave_one_out_mean(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """(N,): mean of the other rows of each row's group; a singleton's own value (so r - baseline = 0)."""
    mean, _std, size = group_stats(values, groups)
    others = (mean * size - values) / (size - 1).clamp(min=1)
    return torch.where(size > 1, others, values)


@estimator("grpo")
def grpo(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """GRPO: (r_i - mean(r_group)) / (std(r_group) + eps). rewards, groups: (N,) -> (N,)."""
    mean, std, _size = group_stats(rewards, groups)
    return (rewards - mean) / (std + eps)


@estimator("dr_grpo")
def dr_grpo(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Dr. GRPO: r_i - mean(r_group), no std. rewards, groups: (N,) -> (N,)."""
    mean, _std, _size = group_stats(rewards, groups)
    return rewards - mean


@estimator("rloo")
def rloo(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """RLOO: r_i - mean_{j != i} r_j within the group. rewards, groups: (N,) -> (N,)."""
    return rewards - leave_one_out_mean(rewards, groups)


@estimator("reinforce_pp")
def reinforce_pp(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """REINFORCE++ (baseline form): r_i - mean(r_group), then whitened over the whole batch
    ((x - mean) / (std + eps), unbiased std over completions). rewards, groups: (N,) -> (N,)."""
    centred = dr_grpo(rewards, groups)
    if centred.numel() < 2:
        return torch.zeros_like(centred)
    return (centred - centred.mean()) / (centred.std() + eps)


def min_form(step_rewards: list[list[float]], temperature: float) -> list[list[float]]:
    """PURE's transform r*_k = softmax(-r / T)_k * r_k over each completion's steps (sum -> min as T -> 0)."""
    out = []
    for row in step_rewards:
        r = torch.tensor(row, dtype=torch.float64)
        out.append((torch.softmax(-r / temperature, dim=0) * r).tolist() if len(row) else [])
    return out


def place(values: list[list[float]], positions: list[list[int]], width: int) -> torch.Tensor:
    """(N, width) zeros with row i's values[i][k] added at token positions[i][k]."""
    out = torch.zeros(len(values), width, dtype=torch.float64)
    for i, (row, pos) in enumerate(zip(values, positions)):
        if row:
            out[i].index_add_(0, torch.tensor(pos, dtype=torch.long), torch.tensor(row, dtype=torch.float64))
    return out


def returns_to_go(token_rewards: torch.Tensor) -> torch.Tensor:
    """(N, C) -> (N, C): each token's sum of its own and all later token rewards."""
    return token_rewards.flip(-1).cumsum(-1).flip(-1)


def process(step_rewards: list[list[float]], step_ends: list[list[int]], lengths: torch.Tensor,
            groups: torch.Tensor, credit: str = "min", temperature: float = 0.1, outcome: torch.Tensor | None = None,
            outcome_weight: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """Per-token advantages (N, C) from per-step rewards, C = max(lengths).

    step_rewards[i][k] scores step k of completion i; step_ends[i][k] is that step's last token index;
    lengths (N,) completion lengths in tokens; groups (N,); outcome (N,) an optional outcome reward added
    at the last token (normalized like the step rewards' baseline: GRPO for sum, RLOO for min).
    sum: r~ = (r - mean(R_group)) / (std(R_group) + eps) over all steps of the group, A_t = sum of r~ at
    positions >= t. min: r* = softmax(-r/T) * r; the RLOO baseline per token b_i = sum_{j!=i} R*_j /
    sum_{j!=i} L_j (R*_j the completion's summed r*), charged as b_i * n_k at step k's last token (n_k its
    tokens; tokens after the last step are charged at the last token), then A_t = returns-to-go.
    Positions past a completion's length are 0.
    """
    n, width = len(step_rewards), int(lengths.max()) if len(lengths) else 0
    last = (lengths - 1).clamp(min=0).tolist()
    if credit == "sum":
        flat = torch.tensor([r for row in step_rewards for r in row], dtype=torch.float64)
        flat_groups = torch.tensor([int(g) for g, row in zip(groups, step_rewards) for _ in row], dtype=torch.long)
        if flat.numel():
            mean, std, _ = group_stats(flat, flat_groups)
            flat = (flat - mean) / (std + eps)
        values, start = [], 0
        for row in step_rewards:
            values.append(flat[start : start + len(row)].tolist())
            start += len(row)
        token_rewards = place(values, step_ends, width)
        extra = grpo(outcome.double(), groups, eps) if outcome is not None else None
    elif credit == "min":
        values = min_form(step_rewards, temperature)
        totals, span = torch.tensor([sum(row) for row in values], dtype=torch.float64), lengths.double()
        mean_total, _std, size = group_stats(totals, groups)
        mean_span = group_stats(span, groups)[0]
        per_token = torch.where(size > 1, (mean_total * size - totals) / (mean_span * size - span).clamp(min=1),
                                totals / span.clamp(min=1))
        charged, tails = [], []
        for i, (row, ends) in enumerate(zip(values, step_ends)):
            starts = [-1] + list(ends[:-1])
            charged.append([r - float(per_token[i]) * (e - s) for r, e, s in zip(row, ends, starts)])
            tails.append(float(per_token[i]) * (last[i] - (ends[-1] if ends else -1)))
        token_rewards = place(charged, step_ends, width)
        token_rewards[torch.arange(n), torch.tensor(last, dtype=torch.long)] -= torch.tensor(tails, dtype=torch.float64) * (lengths > 0)
        extra = rloo(outcome.double(), groups) if outcome is not None else None
    else:
        raise ValueError(f"credit={credit!r} is not one of sum, min")
    if extra is not None:
        token_rewards[torch.arange(n), torch.tensor(last, dtype=torch.long)] += outcome_weight * extra * (lengths > 0)
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return returns_to_go(token_rewards) * mask
