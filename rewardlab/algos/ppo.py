"""PPO with a learned critic and GAE (`algo=ppo`), with VAPO's decoupled and length-adaptive lambdas.

Each update: the critic (critic.py) values every completion token; rewards enter as token rewards (the
outcome `batch.reward` at the last token for `credit=outcome`; for `credit=sum|min` each step's reward at the
step's last token, PURE's min-form first for `min`, plus the optional `algo.outcome` column at the last
token); with `algo.kl_in_reward` the per-token KL to the reference, log pi_old - log pi_ref, times algo.beta
is subtracted from every token's reward (PPO-RLHF) instead of the k3 term entering the loss. GAE
(advantages.py) gives the policy's advantages with `algo.lam` (or VAPO's 1 - 1/(lam_alpha * length)) and the
critic's returns with `algo.lam_critic`; advantages are whitened over the batch's tokens (`algo.whiten`). The
critic takes its clipped value-loss steps, then, after `critic.warmup` critic-only iterations, the policy
takes PolicyGradient's clipped-ratio steps on the per-token advantages (the same loss, minibatches and
old log-probs as the GRPO family: this class only supplies the advantages and the critic).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from rewardlab.algos import AlgoContext, skipped
from rewardlab.algos.advantages import adaptive_lambda, gae, min_form, token_rewards, whiten
from rewardlab.algos.critic import Critic, CriticConfig, explained_variance
from rewardlab.algos.losses import Tensors, to_tensors
from rewardlab.algos.pg import PGConfig, PolicyGradient, check_settings, step_positions
from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rollout import Batch


@schema("algo", "ppo")
@dataclass
class PPOConfig(PGConfig):
    _target_: str = "rewardlab.algos.ppo.PPO"
    advantage: str = "gae"  # the critic's GAE takes the place of a group estimator
    gamma: float = 1.0
    lam: float = 0.95  # the policy's GAE lambda
    lam_critic: Optional[float] = None  # the critic's returns' lambda (VAPO: 1.0); null: the policy's
    lam_alpha: Optional[float] = None  # VAPO's length-adaptive policy lambda 1 - 1/(alpha * length); null: off
    whiten: bool = True  # advantages (x - mean) / std over the batch's completion tokens
    kl_in_reward: bool = False  # algo.beta * (log pi_old - log pi_ref) off each token's reward, not k3 in the loss
    critic: CriticConfig = field(default_factory=CriticConfig)

    def __post_init__(self) -> None:
        if not isinstance(self.critic, CriticConfig):  # a mapping from Hydra
            self.critic = CriticConfig(**self.critic)


def check_ppo(cfg: PPOConfig) -> None:
    """The PG family's checks (GAE stands in for the estimator and the process baseline), and PPO's own."""
    if cfg.advantage != "gae":
        raise UserError(f"algo=ppo computes its advantages with GAE; algo.advantage={cfg.advantage!r} is for the "
                        f"group algorithms (algo=grpo, rloo, reinforce_pp)")
    check_settings(dataclasses.replace(cfg, advantage="grpo"))
    for key in ("gamma", "lam", "lam_critic"):
        value = getattr(cfg, key)
        if value is not None and not 0.0 <= value <= 1.0:
            raise UserError(f"algo.{key}={value} is outside [0, 1]")
    if cfg.lam_alpha is not None and cfg.lam_alpha <= 0:
        raise UserError(f"algo.lam_alpha={cfg.lam_alpha} must be positive (VAPO uses 0.05), or null to turn "
                        f"length-adaptive lambda off")
    critic = cfg.critic
    if critic.lr <= 0 or critic.cliprange_value < 0 or critic.warmup < 0 or (critic.minibatch_size or 0) < 0:
        raise UserError(f"algo.critic needs lr > 0, cliprange_value >= 0, warmup >= 0 and minibatch_size >= 0 "
                        f"(null: algo.minibatch_size); got lr={critic.lr}, cliprange_value={critic.cliprange_value}, "
                        f"warmup={critic.warmup}, minibatch_size={critic.minibatch_size}")


class PPO(PolicyGradient):
    """PolicyGradient's clipped-ratio update on GAE advantages from a learned critic."""

    config_class = PPOConfig
    check = staticmethod(check_ppo)

    def __init__(self, context: AlgoContext | None = None, **settings: Any) -> None:
        context = context or AlgoContext()
        super().__init__(context, **settings)
        self.critic = Critic(self.cfg.critic, seed=context.seed)
        self.critic_updates = 0
        self._token_advantages: torch.Tensor | None = None

    @property
    def kl_loss_coef(self) -> float:
        return 0.0 if self.cfg.kl_in_reward else self.cfg.beta

    def setup(self, policy) -> None:
        super().setup(policy)
        self.critic.setup(policy, self.cfg.micro_batch_size)

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """Models trained beside the policy (run.py compares their weights over ranks)."""
        return {"critic": self.critic.model} if self.critic.model is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "critic": self.critic.state_dict(), "critic_updates": self.critic_updates}

    def save_files(self, checkpoint) -> None:
        """The critic's shards (FSDP) or DeepSpeed files beside state.pt (checkpoint.py calls it on every rank)."""
        self.critic.save_files(checkpoint)

    def load_state_dict(self, state: dict[str, Any], policy) -> None:
        super().load_state_dict(state, policy)
        self.critic.load_state_dict(state.get("critic"))
        self.critic_updates = state.get("critic_updates", 0)

    # ---- the update ----------------------------------------------------------------------------
    def rewards_per_token(self, batch: Batch, tokenizer, width: int) -> torch.Tensor:
        """(N, width) float64 token rewards before any KL penalty (module docstring)."""
        lengths = torch.tensor([len(c) for c in batch.completion_ids])
        if self.cfg.credit == "outcome":
            out = token_rewards(lengths, outcome=torch.tensor(batch.reward, dtype=torch.float64))
        else:
            outcome = self.process_inputs(batch)
            steps = batch.step_rewards if self.cfg.credit == "sum" else min_form(batch.step_rewards,
                                                                                  self.cfg.step_temperature)
            out = token_rewards(lengths, outcome, steps, step_positions(batch, tokenizer), self.cfg.outcome_weight)
        return torch.nn.functional.pad(out, (0, width - out.shape[1]))

    def advantages(self, batch: Batch, tokenizer=None) -> torch.Tensor:
        """(N, C) per-token GAE advantages, computed by `update` before PolicyGradient's update reads them."""
        if self._token_advantages is None:
            raise RuntimeError("PPO's advantages come from its critic: call update(policy, batch)")
        return self._token_advantages

    def update(self, policy, batch: Batch) -> dict[str, float]:
        self.setup(policy)
        cfg = self.cfg
        t = to_tensors(batch, policy.tokenizer.pad_token_id, policy.device)
        mask = t.completion_mask
        old_values = self.critic.values(t, self._micro_rows(t))
        rewards = self.rewards_per_token(batch, policy.tokenizer, t.completion_width).to(policy.device, torch.float32)
        metrics: dict[str, Any] = {}
        if cfg.kl_in_reward and cfg.beta > 0:
            with policy.full_weights():
                old = self._old_logprobs(batch, policy.model, t)
            kl = (old - self._ref_logprobs(policy, t)) * mask
            rewards = rewards - cfg.beta * kl
            metrics["reward/kl_penalty"] = float(kl.sum() / mask.sum().clamp(min=1))
        lengths = mask.sum(-1)
        lam = adaptive_lambda(lengths, cfg.lam_alpha) if cfg.lam_alpha is not None else cfg.lam
        adv, returns = gae(rewards, old_values, mask, cfg.gamma, lam)
        if cfg.lam_critic is not None:
            returns = gae(rewards, old_values, mask, cfg.gamma, cfg.lam_critic)[1]
        valid = mask.sum().clamp(min=1)
        metrics.update({"critic/explained_variance": explained_variance(returns, old_values, mask),
                        "critic/values_mean": float((old_values * mask).sum() / valid),
                        "critic/returns_mean": float((returns * mask).sum() / valid),
                        "critic/lr": cfg.critic.lr})
        if cfg.lam_alpha is not None:
            metrics["critic/policy_lambda_mean"] = float(lam.mean())
        metrics.update(self._train_critic(t, returns, old_values, mask))
        self.critic_updates += 1
        if self.critic_updates <= cfg.critic.warmup:
            return skipped(f"critic warm-up ({self.critic_updates} of {cfg.critic.warmup}): only the critic trained",
                           **metrics)
        self._token_advantages = (whiten(adv, mask) if cfg.whiten else adv)[:, : t.completion_width]
        try:
            out = super().update(policy, batch)
        finally:
            self._token_advantages = None
        return {**out, **metrics}

    def _train_critic(self, t: Tensors, returns: torch.Tensor, old_values: torch.Tensor,
                      mask: torch.Tensor) -> dict[str, float]:
        """algo.num_iterations passes over the batch in critic minibatches; the per-step means."""
        n = t.input_ids.shape[0]
        size = self.cfg.minibatch_size if self.cfg.critic.minibatch_size is None else self.cfg.critic.minibatch_size
        size = size if size > 0 else n
        if self.cfg.critic.minibatch_size and torch.distributed.is_initialized():
            counts: list[Any] = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(counts, n)
            if len(set(counts)) > 1:  # unequal critic steps across ranks would leave an all-reduce waiting
                raise UserError(f"filters left different numbers of rollouts on the ranks ({counts}), and "
                                f"algo.critic.minibatch_size>0 would give their critics different numbers of "
                                f"steps; leave algo.critic.minibatch_size null with algo.minibatch_size=0")
        micro = self._micro_rows(t)
        sums: dict[str, float] = {}
        steps = 0
        self.critic.trained.train()
        for _ in range(self.cfg.num_iterations):
            order = torch.randperm(n, generator=self.generator).to(t.input_ids.device)
            for start in range(0, n, size):
                stats = self.critic.step(t, order[start : start + size], returns, old_values, mask, micro)
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + v
                steps += 1
        self.critic.trained.eval()
        return {k: v / max(steps, 1) for k, v in sums.items()}
