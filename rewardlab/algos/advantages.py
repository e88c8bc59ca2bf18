"""Advantage estimators, each one named function selected by `algo.advantage`.

Outcome estimators take `rewards` (N,) and `groups` (N,) long tensor of group indices (rows of the
same prompt share an index) and return per-completion advantages (N,); the update broadcasts them
over the completion's tokens.
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


@estimator("grpo")
def grpo(rewards: torch.Tensor, groups: torch.Tensor, eps: float = 1e-4, **_) -> torch.Tensor:
    """GRPO: (r_i - mean(r_group)) / (std(r_group) + eps). rewards, groups: (N,) -> (N,)."""
    mean, std, _size = group_stats(rewards, groups)
    return (rewards - mean) / (std + eps)
