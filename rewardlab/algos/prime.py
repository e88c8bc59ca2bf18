"""PRIME (Cui et al. 2025, "Process Reinforcement through Implicit Rewards"): the policy-gradient update of
pg.py with dense credit from an implicit PRM (Yuan et al. 2024, "Free Process Rewards without Process
Labels") that is trained online on the rollouts' outcome labels.

The implicit PRM pi_phi is a causal LM (a copy of the initial policy, or `algo.prime.model`) beside a
frozen reference pi_ref (the policy's own reference, or a frozen copy of `algo.prime.model`). Each
iteration, in the order of the paper's algorithm and its code (PRIME-RL/PRIME, `update=after`):
1. score: token reward r_t = beta * (log pi_phi(y_t) - log pi_ref(y_t)), sequence reward r_phi(y) = sum_t r_t;
   `prime/accuracy` compares sign(r_phi) with the gold label before the PRM has seen these rollouts, and
   `prime/pairwise_accuracy` (PRIME's own figure) how often r_phi orders a group's right and wrong ones;
2. update the PRM on the cross-entropy BCE(sigmoid(r_phi(y)), gold) over the rollouts of the groups whose share
   of right answers lies in `algo.prime.accuracy_bounds` (PRIME's filter_accuracy; default all): one optimizer
   step on this iteration's rollouts (its forward pass gives the scores of step 1, as in PRIME's single-forward
   mode), then, unlike PRIME, one step on each of the previous `algo.prime.buffer` - 1 iterations' rollouts,
   newest first (kept with their reference log-probs and labels, checkpointed); `algo.prime.steps` passes.
   `algo.prime.buffer=1 algo.prime.beta=0.05` is PRIME's own setting: on the tiny world its PRM's within-group
   AUC stays at or below chance over a run, while 8 iterations of rollouts and beta 0.5 make it rise (README);
3. advantages: token rewards divided by the batch's largest |return| (PRIME's `prime_norm=batch_norm`;
   this makes beta cancel out of the advantages), then RLOO returns computed separately on the process
   rewards (PRIME's baseline: the group's mean per-token reward, leave-one-out) and on the outcome reward
   (the run's reward at the last token, leave-one-out), with gamma = 1, summed, and whitened over the
   batch's tokens (verl's `masked_whiten`);
4. the clipped-ratio policy update of pg.py on those per-token advantages.
Written here because no maintained library has PRIME's online PRM (it lives in a verl recipe); the
formulas (prime_formulas.py) are checked against that code in tests/test_prime_formulas.py. Under several
processes the PRM trains and is checkpointed the way the policy is under the same launch (auxiliary.py: DDP under torchrun, sharded under
FSDP, its own engine under DeepSpeed), and the batch statistics (norm, whitening) are taken over all ranks.
"""

from __future__ import annotations

import collections
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as torch_dist

from rewardlab.algos import AlgoContext
from rewardlab.algos.auxiliary import Auxiliary
from rewardlab.algos.prime_formulas import (_all_reduce, accuracy_filter, batch_normalize, cross_entropy,  # noqa: F401
                                            group_auc, implicit_rewards, masked_whiten, pairwise_accuracy,
                                            prime_advantages, process_rloo)
from rewardlab.algos.losses import Tensors, to_tensors, token_logprobs
from rewardlab.algos.pg import PGConfig, PolicyGradient
from rewardlab.config import schema
from rewardlab.distributed import param_digest
from rewardlab.errors import UserError
from rewardlab.rollout import Batch

NORMS = ("batch_norm", "none")
NO_REFERENCES = ("algo=prime trains its implicit PRM on outcome labels (each rollout checked against its prompt's "
                 "reference answer), and this data set has prompts without one; give it an answer field "
                 "(dataset.answer_field) or use another algo")


@dataclass
class ImplicitPRMSettings:
    model: Optional[str] = None  # a local causal LM sharing the policy's tokenizer; default: the initial policy
    lr: float = 5e-4  # the tiny policy's PRM did not move at 5e-5 in 20 iterations
    beta: float = 0.5  # r_t = beta * log pi_phi / pi_ref (PRIME's beta_train is 0.05, for ~1000-token answers; README)
    weight_decay: float = 0.0
    max_grad_norm: float = 10.0  # PRIME's prime_model.optim.grad_clip
    norm: str = "batch_norm"  # batch_norm (PRIME's prime_norm) | none
    micro_batch_size: int = 64  # rollouts per forward/backward of the PRM
    accuracy_bounds: tuple = (0.0, 1.0)  # train on groups whose share of right rollouts is in [lo, hi] (PRIME: 0.2-0.8)
    steps: int = 1  # passes per iteration over the rollouts it trains on (this iteration's, then the buffer's)
    buffer: int = 8  # iterations of rollouts the PRM trains on each iteration, one step each, newest first; 1: PRIME's


@schema("algo", "prime")
@dataclass
class PrimeConfig(PGConfig):
    _target_: str = "rewardlab.algos.prime.Prime"
    advantage: str = "rloo"  # PRIME's estimator (fixed)
    prime: ImplicitPRMSettings = field(default_factory=ImplicitPRMSettings)


class Prime(PolicyGradient):
    """pg.py's update on PRIME's per-token advantages, with the implicit PRM trained online beside it."""

    config_class = PrimeConfig

    def __init__(self, context: AlgoContext | None = None, **settings: Any) -> None:
        super().__init__(context, **settings)
        prime = self.cfg.prime
        self.settings = prime if isinstance(prime, ImplicitPRMSettings) else ImplicitPRMSettings(**prime)
        if self.cfg.credit != "outcome" or self.cfg.advantage != "rloo":
            raise UserError("algo=prime makes its own process credit (implicit PRM + RLOO); leave algo.credit "
                            "and algo.advantage at outcome and rloo")
        if self.settings.norm not in NORMS:
            raise UserError(f"algo.prime.norm={self.settings.norm!r} is not one of {', '.join(NORMS)}")
        if self.settings.beta <= 0:
            raise UserError(f"algo.prime.beta={self.settings.beta} must be positive")
        bounds = tuple(self.settings.accuracy_bounds)
        if len(bounds) != 2 or not 0 <= bounds[0] <= bounds[1] <= 1:
            raise UserError(f"algo.prime.accuracy_bounds={list(bounds)} must be [lo, hi] with 0 <= lo <= hi <= 1")
        if self.settings.steps < 1:
            raise UserError(f"algo.prime.steps={self.settings.steps} must be at least 1")
        if self.settings.buffer < 1:
            raise UserError(f"algo.prime.buffer={self.settings.buffer} must be at least 1 (1: this iteration's "
                            f"rollouts only, as PRIME)")
        self.prm: torch.nn.Module | None = None
        self._prm: Auxiliary | None = None  # the PRM with its optimizer, trained under the launch
        self._prm_reference: torch.nn.Module | None = None  # only for algo.prime.model (else the policy's)
        self._saved_prm: dict[str, Any] | None = None
        self._token_advantages: torch.Tensor | None = None
        # the PRM's training rows of the previous buffer - 1 iterations on this rank, newest last
        self._history: collections.deque[dict[str, Any]] = collections.deque(maxlen=self.settings.buffer - 1)

    def check_data(self, examples) -> None:
        """Refuse a data set without reference answers before any work (run.py calls it): the PRM's labels
        are the verifiable check of each rollout against its prompt's answer."""
        if not any(e.answer is not None for e in examples):
            raise UserError(NO_REFERENCES)

    # ---- the implicit PRM and its state ------------------------------------------------------------
    def setup(self, policy) -> None:
        """The policy's optimizer (pg.py), then the PRM: built when the run starts under a sharded launch
        (run.py calls setup after sharding the policy), else at the first update."""
        super().setup(policy)
        self._build_prm(policy)

    def _build_prm(self, policy) -> None:
        if self.prm is not None:
            return
        saved, self._saved_prm = self._saved_prm, None
        with torch.random.fork_rng(devices=[]):  # off the run's RNG stream, wherever a resumed run builds it
            if self.settings.model is None:
                prm = policy.load_fresh(shard=False)  # auxiliary.py shards it after loading saved weights
            else:
                from rewardlab.policy import _local_dir, load_model

                source = str(_local_dir(self.settings.model, "algo.prime.model"))
                prm = load_model(source, policy.model.dtype).to(policy.device)
                reference = load_model(source, policy.model.dtype).to(policy.device).eval().requires_grad_(False)
                self._prm_reference = policy.sharding.shard(reference) if policy.sharding is not None else reference

            def adamw(params):
                return torch.optim.AdamW(params, lr=self.settings.lr, weight_decay=self.settings.weight_decay)

            self._prm = Auxiliary("prime", prm, adamw, policy.sharding, self.settings.micro_batch_size,
                                  self.settings.max_grad_norm, saved)
        self.prm = prm
        self.prm.eval()

    def trained_models(self) -> dict[str, torch.nn.Module]:
        """Models trained beside the policy (run.py compares their weights over ranks)."""
        return {"prm": self.prm} if self.prm is not None else {}

    def state_dict(self) -> dict[str, Any]:
        """pg.py's state plus the PRM's weights and optimizer state (or, sharded, the folder of its files);
        every rank calls it, and each rank's PRM digest is recorded under several processes so a checkpoint
        shows the ranks agree."""
        state = super().state_dict()
        several = torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1
        history: list[Any] = [list(self._history)]  # each rank's buffer (rank 0 writes state.pt)
        if several:
            history = [None] * torch_dist.get_world_size()
            torch_dist.all_gather_object(history, list(self._history))
        if self._prm is None:
            state["prime"] = None if self._saved_prm is None else {**self._saved_prm, "history": history}
            return state
        state["prime"] = {**self._prm.state_dict(), "history": history}
        if several:
            digests: list[Any] = [None] * torch_dist.get_world_size()
            torch_dist.all_gather_object(digests, param_digest(self.prm))
            state["prime"]["rank_sha256"] = digests
        return state

    def save_files(self, checkpoint) -> None:
        """The PRM's shards (FSDP) or DeepSpeed files beside state.pt (checkpoint.py calls it on every rank)."""
        if self._prm is not None:
            self._prm.save_files(checkpoint)

    def load_state_dict(self, state: dict[str, Any], policy) -> None:
        super().load_state_dict(state, policy)
        self._saved_prm = state.get("prime")
        self.prm = self._prm = None  # rebuilt with the saved state on next use
        self._history.clear()
        history = (self._saved_prm or {}).get("history") or []
        world = torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1
        rank = torch_dist.get_rank() if world > 1 else 0
        if len(history) == world:
            self._history.extend(history[rank][-self._history.maxlen:] if self._history.maxlen else [])
        elif any(history):
            warnings.warn(f"algo=prime: the checkpoint's PRM buffer was written by {len(history)} process(es) and "
                          f"this run has {world}; the buffer restarts empty and refills over the next "
                          f"{self.settings.buffer - 1} iterations")

    # ---- one iteration ------------------------------------------------------------------------------
    @torch.no_grad()
    def _reference_logprobs(self, policy, t: Tensors) -> torch.Tensor:
        size = self.settings.micro_batch_size

        def run(model):
            return torch.cat([token_logprobs(model, t, slice(s, s + size), 1.0)[0]
                              for s in range(0, t.input_ids.shape[0], size)])

        if self._prm_reference is not None:
            with policy.full_weights(self._prm_reference):
                return run(self._prm_reference)
        with policy.reference() as reference, policy.full_weights(reference):
            return run(reference)

    @torch.no_grad()
    def _prm_logprobs(self, t: Tensors) -> torch.Tensor:
        """The PRM's token log-probs of every rollout, without a gradient (when it takes no step)."""
        size = self.settings.micro_batch_size
        with self._prm.full_weights():
            return torch.cat([token_logprobs(self.prm, t, slice(s, s + size), 1.0)[0]
                              for s in range(0, t.input_ids.shape[0], size)])

    def _train_prm(self, batches: list[dict[str, Any]]) -> tuple[torch.Tensor, dict]:
        """`steps` passes over `batches` (this iteration's rollouts first, then the buffer's, newest first), one
        optimizer step per batch on the cross-entropy averaged over its kept rollouts (weight 1) of every rank.
        Returns the PRM's log-probs of this iteration's rollouts before any step (the first step's own forward
        pass), and the loss and gradient norm of that step. A batch no rank kept a rollout of is skipped."""
        world = torch_dist.get_world_size() if torch_dist.is_available() and torch_dist.is_initialized() else 1
        size = self.settings.micro_batch_size
        current = batches[0]
        kept = [float(_all_reduce(b["weights"].sum().reshape(1))[0]) for b in batches]
        logps: list[torch.Tensor] = [] if kept[0] else [self._prm_logprobs(self._tensors(current))]
        metrics: dict[str, float] = {}
        self._prm.trained.train()
        for _ in range(self.settings.steps):
            for index, (b, total) in enumerate(zip(batches, kept)):
                if total == 0:
                    continue
                t = self._tensors(b)
                starts = list(range(0, t.input_ids.shape[0], size))
                record = not metrics and index == 0  # the first step on this iteration's rollouts
                losses: list[float] = []

                def loss_of(i: int, real: bool) -> torch.Tensor:
                    rows = slice(starts[i], starts[i] + size)
                    lp = token_logprobs(self._prm.trained, t, rows, 1.0)[0]
                    per_row = cross_entropy(lp, b["ref"][rows], t.completion_mask[rows], b["labels"][rows],
                                            self.settings.beta)
                    loss = (per_row * b["weights"][rows]).sum() * world / total  # DDP averages the ranks' gradients
                    if real and record:
                        logps.append(lp.detach())
                        losses.append(float(loss.detach()))
                    return loss

                norm = self._prm.train_step(len(starts), loss_of)
                if record:
                    metrics = {"prime/loss": sum(losses), "prime/grad_norm": norm}
        self._prm.trained.eval()
        metrics["prime/buffer"] = float(len(batches))
        return torch.cat(logps), metrics

    def _tensors(self, b: dict[str, Any]) -> Tensors:
        return Tensors(b["input_ids"], b["attention_mask"], b["position_ids"], b["completion_mask"],
                       int(b["completion_width"]))

    def update(self, policy, batch: Batch) -> dict[str, float]:
        if batch.gold is None or any(g is None for g in batch.gold):
            raise UserError(NO_REFERENCES)
        self.setup(policy)
        t = to_tensors(batch, policy.tokenizer.pad_token_id, policy.device)
        mask = t.completion_mask
        labels = torch.tensor(batch.gold, dtype=torch.float32, device=policy.device)
        ref = self._reference_logprobs(policy, t)
        index = {pid: i for i, pid in enumerate(batch.groups())}
        groups = torch.tensor([index[p] for p in batch.prompt_id])
        weights = accuracy_filter(labels.cpu(), groups, tuple(self.settings.accuracy_bounds)).to(labels.device)
        current = {"input_ids": t.input_ids, "attention_mask": t.attention_mask, "position_ids": t.position_ids,
                   "completion_mask": mask, "completion_width": t.completion_width, "ref": ref, "labels": labels,
                   "weights": weights}
        device = policy.device
        older = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                 for b in reversed(self._history)]
        logps, metrics = self._train_prm([current] + older)
        if self._history.maxlen:
            self._history.append({k: v.detach().to("cpu") if isinstance(v, torch.Tensor) else v
                                  for k, v in current.items()})
        metrics["prime/kept"] = float(weights.mean())
        token_rewards = implicit_rewards(logps, ref, mask, self.settings.beta)  # before the PRM's step
        sequence = token_rewards.sum(-1)
        tokens = token_rewards[mask.bool()]
        metrics.update({"prime/accuracy": float(((sequence > 0) == (labels > 0.5)).float().mean()),
                        "prime/reward_mean": float(sequence.mean()),
                        "prime/token_reward/mean": float(tokens.mean()), "prime/token_reward/std":
                        float(tokens.std()) if tokens.numel() > 1 else 0.0,
                        "prime/token_reward/max": float(tokens.max()), "prime/token_reward/min": float(tokens.min())})
        metrics["prime/pairwise_accuracy"] = pairwise_accuracy(sequence.cpu(), labels.cpu(), groups)
        auc = group_auc(sequence.cpu(), labels.cpu(), groups)
        if auc is not None:  # no group holds both a right and a wrong rollout: nothing to rank
            metrics["prime/auc"] = auc
        if self.settings.norm == "batch_norm":
            token_rewards = batch_normalize(token_rewards)
        outcome = torch.tensor(batch.reward, dtype=torch.float32)
        self._token_advantages = prime_advantages(token_rewards.cpu(), outcome, mask.cpu(), groups)
        return {**super().update(policy, batch), **metrics}

    def advantages(self, batch: Batch, tokenizer=None) -> torch.Tensor:
        """(N, C) the per-token advantages `update` computed from the implicit PRM and the outcome."""
        return self._token_advantages
