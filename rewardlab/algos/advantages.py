"""Advantage estimators, each one named function selected by `algo.advantage` (METHODS.md §1).

Outcome estimators take `rewards` (N,) and `groups` (N,) long tensor of group indices (rows of the
same prompt share an index) and return per-completion advantages (N,); the update broadcasts them
over the completion's tokens. In grpo, dr_grpo and rloo a group of one sample has no baseline and
gets advantage 0.

`process` (used when `algo.credit=sum|min`) turns per-step rewards into per-token advantages (N, C):
step k's value sits on the step's last token, an optional outcome reward on the completion's last
token, and a token's advantage is the sum over its own and all later positions. `credit=sum` uses the
step rewards as given, `credit=min` PURE's softmax(-r/T) transform; the baseline comes from the
outcome estimator's name: grpo normalizes the group's steps (GRPO §4.1.3), rloo is PURE's token-level
leave-one-out baseline.

For PPO (`algo=ppo`, ppo.py): `token_rewards` places outcome and step rewards on tokens, `gae` turns them
and a critic's values into advantages and returns (verl's `compute_gae_advantage_return`, with a per-row
lambda for VAPO's `adaptive_lambda`), and `whiten` normalizes advantages over the batch's tokens.
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


def normalize_steps(values: list[list[float]], groups: torch.Tensor, eps: float) -> list[list[float]]:
    """GRPO §4.1.3: (r - mean(R_group)) / (std(R_group) + eps) over all steps of each group's completions."""
    flat = torch.tensor([r for row in values for r in row], dtype=torch.float64)
    if not flat.numel():
        return [[] for _ in values]
    flat_groups = torch.tensor([int(g) for g, row in zip(groups, values) for _ in row], dtype=torch.long)
    mean, std, _size = group_stats(flat, flat_groups)
    flat = (flat - mean) / (std + eps)
    out, start = [], 0
    for row in values:
        out.append(flat[start : start + len(row)].tolist())
        start += len(row)
    return out


def charge_token_baseline(values: list[list[float]], step_ends: list[list[int]], lengths: torch.Tensor,
                          groups: torch.Tensor) -> tuple[list[list[float]], torch.Tensor]:
    """PURE's token-level RLOO baseline: b_i = sum_{j!=i} R_j / sum_{j!=i} L_j (R_j the completion's summed
    step values, L_j its tokens; a group of one is its own baseline), charged as b_i * n_k at step k's last
    token (n_k its tokens). Returns the charged step values and (N,) the charge of the tokens after the last
    step, which goes on the last token."""
    totals, span = torch.tensor([sum(row) for row in values], dtype=torch.float64), lengths.double()
    mean_total, _std, size = group_stats(totals, groups)
    mean_span = group_stats(span, groups)[0]
    per_token = torch.where(size > 1, (mean_total * size - totals) / (mean_span * size - span).clamp(min=1),
                            totals / span.clamp(min=1))
    charged, tails = [], []
    for i, (row, ends) in enumerate(zip(values, step_ends)):
        starts = [-1] + list(ends[:-1])
        charged.append([r - float(per_token[i]) * (e - s) for r, e, s in zip(row, ends, starts)])
        tails.append(float(per_token[i]) * (max(int(lengths[i]) - 1, 0) - (ends[-1] if ends else -1)))
    return charged, torch.tensor(tails, dtype=torch.float64)


def process(step_rewards: list[list[float]], step_ends: list[list[int]], lengths: torch.Tensor,
            groups: torch.Tensor, credit: str = "min", baseline: str = "rloo", temperature: float = 0.1,
            outcome: torch.Tensor | None = None, outcome_weight: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """Per-token advantages (N, C) from per-step rewards, C = max(lengths); positions past a length are 0.

    step_rewards[i][k] scores step k of completion i (ragged); step_ends[i][k] is that step's last token
    index; lengths (N,) completion lengths in tokens; groups (N,); outcome (N,) an optional outcome reward.
    credit: `sum` uses the step rewards as they are, `min` PURE's r*_k = softmax(-r/T)_k * r_k.
    baseline: `grpo` normalizes the group's step values together (GRPO §4.1.3; the outcome reward by
    GRPO's group normalization), `rloo` charges PURE's token-level leave-one-out baseline (the outcome
    reward minus the mean of the group's other outcome rewards). Each step value sits on its step's last
    token, the outcome term (times outcome_weight) on the last token, and a token's advantage is the sum
    at its own and all later positions. GRPO's process supervision is sum+grpo; PURE is min+rloo.
    """
    if credit not in ("sum", "min") or baseline not in ("grpo", "rloo"):
        raise ValueError(f"process credit needs credit in (sum, min) and baseline in (grpo, rloo), "
                         f"got {credit!r}, {baseline!r}")
    n, width = len(step_rewards), int(lengths.max()) if len(lengths) else 0
    last = torch.arange(n), (lengths - 1).clamp(min=0)
    real = (lengths > 0).double()
    values = step_rewards if credit == "sum" else min_form(step_rewards, temperature)
    if baseline == "grpo":
        token_rewards = place(normalize_steps(values, groups, eps), step_ends, width)
        extra = grpo(outcome.double(), groups, eps) if outcome is not None else None
    else:
        charged, tails = charge_token_baseline(values, step_ends, lengths, groups)
        token_rewards = place(charged, step_ends, width)
        token_rewards[last] -= tails * real
        extra = rloo(outcome.double(), groups) if outcome is not None else None
    if extra is not None:
        token_rewards[last] += outcome_weight * extra * real
    mask = torch.arange(width)[None, :] < lengths[:, None]
    return returns_to_go(token_rewards) * mask


# ---- PPO with a learned critic: token rewards, GAE, whitening (METHODS.md "PPO with a learned critic") ----

def token_rewards(lengths: torch.Tensor, outcome: torch.Tensor | None = None,
                  step_rewards: list[list[float]] | None = None, step_ends: list[list[int]] | None = None,
                  outcome_weight: float = 1.0) -> torch.Tensor:
    """Per-token rewards (N, C), C = max(lengths): `outcome` (N,) times outcome_weight at each completion's
    last token, and step_rewards[i][k] at token step_ends[i][k] (the step's last token). Empty rows stay 0."""
    n, width = len(lengths), int(lengths.max()) if len(lengths) else 0
    out = place(step_rewards, step_ends, width) if step_rewards is not None else torch.zeros(n, width, dtype=torch.float64)
    if outcome is not None and width:
        real = lengths > 0
        out[torch.arange(n)[real], lengths[real] - 1] += outcome_weight * outcome.double()[real]
    return out


def adaptive_lambda(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """VAPO's length-adaptive GAE lambda, (N,) -> (N,): 1 - 1 / (alpha * length), clamped to [0, 1]."""
    return (1.0 - 1.0 / (alpha * lengths.double().clamp(min=1))).clamp(0.0, 1.0)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation: advantages and returns, each (N, C).

    rewards, values, mask: (N, C), values[:, t] the critic's estimate before token t, mask 1 on completion
    tokens; lam a float or (N,) per-completion lambdas (VAPO). delta_t = r_t + gamma * V_{t+1} - V_t,
    A_t = delta_t + gamma * lam * A_{t+1}, R_t = A_t + V_t, with V and A zero past the last token; masked
    positions neither contribute nor reset the recursion (verl's `compute_gae_advantage_return`, without
    its whitening: `whiten` is separate). A reverse loop over time, vectorised over the batch.
    """
    lam = lam if isinstance(lam, torch.Tensor) else torch.full((rewards.shape[0],), float(lam))
    lam = lam.to(rewards.device, rewards.dtype)
    mask = mask.to(rewards.dtype)
    next_value = torch.zeros_like(rewards[:, 0]) if rewards.shape[1] else rewards.new_zeros(rewards.shape[0])
    running = torch.zeros_like(next_value)
    advantages = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        m = mask[:, t]
        running = m * (delta + gamma * lam * running) + (1 - m) * running
        next_value = m * values[:, t] + (1 - m) * next_value
        advantages[:, t] = running
    return advantages * mask, (advantages + values) * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(N, C) -> (N, C): (x - mean) / sqrt(var + eps) over the masked tokens of the whole batch (unbiased
    variance, as verl's masked_whiten); masked positions are 0. Fewer than two tokens: returned centred."""
    mask = mask.to(values.dtype)
    count = mask.sum()
    mean = (values * mask).sum() / count.clamp(min=1)
    if count < 2:
        return (values - mean) * mask
    var = (((values - mean) ** 2) * mask).sum() / (count - 1)
    return (values - mean) * torch.rsqrt(var + eps) * mask
