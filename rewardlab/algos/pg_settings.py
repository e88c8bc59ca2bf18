"""The policy-gradient family's settings: the `algo` schema every GRPO-family preset fills (defaults here, so a
wrong key or type fails at composition) and the checks that reject unknown names and undefined combinations
before a run starts. The update that reads them is in pg.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rewardlab.algos.advantages import ESTIMATORS
from rewardlab.config import schema
from rewardlab.errors import UserError

PROCESS_BASELINES = ("grpo", "rloo")  # the estimators step-level credit has a baseline form for
LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
LR_SCHEDULES = ("constant", "linear", "cosine")
MINIBATCH_ORDERS = ("groups", "rows")


@schema("algo", "pg")
@dataclass
class PGConfig:
    _target_: str = "rewardlab.algos.pg.PolicyGradient"
    samples_per_prompt: int = 8
    advantage: str = "grpo"  # grpo | dr_grpo | rloo | reinforce_pp
    credit: str = "outcome"  # outcome | sum | min (step-level: needs a process reward; baseline from `advantage`)
    step_temperature: float = 0.1  # PURE's softmax temperature T for credit=min
    prm_scale: str = "prob"  # the default reward.scale of a PRM under this algorithm (pure: signed, 2p - 1)
    outcome: Optional[str] = None  # process credit: a batch.rewards column added at the last token
    outcome_weight: float = 1.0
    lr: float = 5e-5
    weight_decay: float = 0.0
    betas: tuple = (0.9, 0.999)
    beta: float = 0.0  # KL coefficient to the frozen initial policy (k3 estimator)
    eps_low: float = 0.2
    eps_high: float = 0.2
    num_iterations: int = 1  # passes over each batch
    minibatch_size: int = 32  # completions per optimizer step (several steps per batch); 0 = the whole batch
    minibatch_order: str = "groups"  # groups: each prompt's samples stay together, groups shuffled (verl) | rows
    micro_batch_size: int = 64  # completions per forward/backward (gradient accumulation)
    micro_batch_tokens: int = 0  # cap on padded tokens per forward/backward (fewer rows for long ones); 0: none
    padding_free: bool = True  # pack each micro-batch's rows without padding where the model allows (algos/packing.py)
    skip_zero_advantage: bool = True  # rows whose advantage is 0 at every token skip the backward when beta=0 (exact)
    unique_rows: bool = True  # rollouts repeated in a pass (same prompt and completion) go through the model once (exact)
    loss_agg: str = "sequence_mean"  # sequence_mean | token_mean | constant
    max_grad_norm: float = 1.0
    lr_schedule: str = "constant"  # constant | linear | cosine (over run.iterations)
    lr_warmup_iterations: int = 0


def check_settings(cfg: PGConfig) -> None:
    """Reject unknown names and undefined combinations up front, with the fix."""
    if cfg.advantage not in ESTIMATORS:
        raise UserError(f"algo.advantage={cfg.advantage!r} is not one of {sorted(ESTIMATORS)}")
    if cfg.credit != "outcome":
        if cfg.credit not in ("sum", "min"):
            raise UserError(f"algo.credit={cfg.credit!r} is not one of outcome, sum, min")
        if cfg.advantage not in PROCESS_BASELINES:
            raise UserError(f"algo.credit={cfg.credit} takes its baseline from algo.advantage, which must be grpo "
                            f"(GRPO's step normalization) or rloo (PURE's token-level RLOO), not {cfg.advantage}")
    elif cfg.outcome is not None:
        raise UserError("algo.outcome adds an outcome reward to process credit; set algo.credit=sum or min")
    if cfg.prm_scale not in ("prob", "signed"):
        raise UserError(f"algo.prm_scale={cfg.prm_scale!r} is not one of prob, signed")
    if cfg.loss_agg not in LOSS_AGGREGATIONS:
        raise UserError(f"algo.loss_agg={cfg.loss_agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}")
    if cfg.minibatch_order not in MINIBATCH_ORDERS:
        raise UserError(f"algo.minibatch_order={cfg.minibatch_order!r} is not one of {', '.join(MINIBATCH_ORDERS)}")
    if cfg.lr_schedule not in LR_SCHEDULES:
        raise UserError(f"algo.lr_schedule={cfg.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
