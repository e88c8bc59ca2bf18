"""Native policy-gradient update (GRPO family, RLOO, REINFORCE++, process credit), written here because
TRL's GRPOTrainer owns its own generation loop and has no step-level credit.

The loss pieces live in losses.py, the advantage estimators in advantages.py. `credit` chooses how the
reward reaches the tokens: `outcome` (one advantage per completion from the `advantage` estimator), or
step-level credit over `batch.step_rewards`: `sum` (step rewards as given) or `min` (PURE's transform),
with the baseline named by `advantage` (grpo: GRPO's step normalization; rloo: PURE's token-level RLOO).
`algo=grpo algo.credit=sum` is the GRPO paper's process supervision, `algo=pure` is PURE. An optional
outcome column (`outcome`) is added at the last token for step-level credit.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from rewardlab.algos import AlgoContext, skipped
from rewardlab.algos.advantages import ESTIMATORS, process
from rewardlab.algos.losses import Tensors, aggregate, clipped_loss, to_tensors, token_logprobs
from rewardlab.algos.pg_settings import PGConfig, check_settings  # noqa: F401 (re-exported: ppo, prime)
from rewardlab.distributed import any_rank, data_parallel, no_sync
from rewardlab.errors import UserError
from rewardlab.heap import release_free_heap
from rewardlab.sharding import DeepSpeed, is_sharded, load_optimizer_state, micro_steps, optimizer_state
from rewardlab.rollout import Batch
from rewardlab.steps import step_char_ends, step_token_ends

def step_positions(batch: Batch, tokenizer) -> list[list[int]]:
    """Per row, the token index of each step's last token (batch.steps located in the completion text)."""
    return [step_token_ends(tokenizer, ids, step_char_ends(text, steps)) if steps else []
            for ids, text, steps in zip(batch.completion_ids, batch.completion, batch.steps)]


def _recorded(per_token: list[list[float]] | None, batch: Batch, t: Tensors) -> torch.Tensor | None:
    """(N, C) a per-token column the generator recorded (zero-padded to the completion width), or None where it
    recorded none or a row's record does not match its completion."""
    if per_token is None or any(len(r) != len(c) for r, c in zip(per_token, batch.completion_ids)):
        return None
    C = t.completion_width
    rows = np.array([r + [0.0] * (C - len(r)) for r in per_token], dtype=np.float32)  # torch.tensor(list): ~5x slower
    return torch.from_numpy(rows).to(t.input_ids.device)


class PolicyGradient:
    """Group policy gradient with a clipped ratio; estimator, clipping and aggregation are settings."""

    config_class = PGConfig  # subclasses (PPO) extend the schema and the checks
    check = staticmethod(check_settings)

    def __init__(self, context: AlgoContext | None = None, **settings: Any) -> None:
        context = context or AlgoContext()
        self.cfg = self.config_class(**{k: v for k, v in settings.items() if k != "_target_"})
        self.check(self.cfg)
        if self.cfg.credit != "outcome" and not getattr(context.reward, "process", True):
            raise UserError(f"algo.credit={self.cfg.credit} needs a process reward (one that writes step_rewards, "
                            f"e.g. reward=arith_steps), and reward '{context.reward.name}' gives one score per "
                            f"completion; use algo.credit=outcome for this reward")
        self.samples_per_prompt = self.cfg.samples_per_prompt
        self.temperature, self.max_new_tokens = context.temperature, context.max_new_tokens
        self.total_iterations = context.total_iterations
        self.updates = 0
        self.generator = torch.Generator().manual_seed(context.seed)
        self.optimizer: torch.optim.Optimizer | None = None
        self._model: torch.nn.Module | None = None
        self._trained: torch.nn.Module | None = None  # what the training passes run through (DDP, DeepSpeed)
        self._deepspeed: DeepSpeed | None = None  # set when a DeepSpeed launch owns the optimizer
        self._saved_optimizer: dict[str, Any] | None = None  # restored, applied when the optimizer is built

    # ---- state carried across iterations (checkpointed) -----------------------------------------
    def setup(self, policy) -> None:
        """Build the optimizer over the policy's parameters as they are now (sharded under FSDP, which
        happens after a checkpoint is restored), with the restored optimizer state if there is one."""
        if self.optimizer is None:
            self._model = policy.model
            self._deepspeed = policy.sharding if isinstance(policy.sharding, DeepSpeed) else None
            # torch's fused AdamW (as HF Trainer, hence TRL, uses) where the parameters are plain CPU/CUDA
            # tensors: one kernel per step instead of a loop of ops per parameter with full-size temporaries
            # (two 544 MB ones for a 151,936 x 896 embedding); FSDP's DTensors and DeepSpeed keep the default
            fused = (self._deepspeed is None and not is_sharded(policy.model)
                     and all(p.device.type in ("cpu", "cuda") for p in policy.model.parameters()))
            self.optimizer = torch.optim.AdamW(policy.model.parameters(), lr=self.cfg.lr,
                                               weight_decay=self.cfg.weight_decay, betas=tuple(self.cfg.betas),
                                               **({"fused": True} if fused else {}))
            saved, self._saved_optimizer = self._saved_optimizer, None
            deepspeed_files = isinstance(saved, dict) and "deepspeed" in saved
            if self._deepspeed is not None:  # DeepSpeed takes over the optimizer (and ZeRO-3 the weights)
                if saved is not None and not deepspeed_files:
                    raise UserError("this checkpoint's optimizer state was written without DeepSpeed; resume it "
                                    "with the launch that wrote it (FSDP, torchrun or one process)")
                self.optimizer = self._deepspeed.prepare(policy.model, self.optimizer, self.cfg.micro_batch_size,
                                                         self.cfg.max_grad_norm)
                if deepspeed_files:
                    self._deepspeed.load(saved["deepspeed"])
            elif deepspeed_files:
                raise UserError("this checkpoint's optimizer state is DeepSpeed's (one file per rank); resume it "
                                "under the DeepSpeed config and number of processes that wrote it")
            elif saved is not None:
                load_optimizer_state(policy.model, self.optimizer, saved)
            if self._deepspeed is not None:
                self._trained = self._deepspeed.engine
            elif self._trained is None:  # once (a resume rebuilds the optimizer over the same model)
                # FSDP reduces in its own backward; whole replicas on several ranks train under DDP
                self._trained = policy.model if is_sharded(policy.model) else data_parallel(policy.model)

    def state_dict(self) -> dict[str, Any]:
        """Every rank calls it (under FSDP and DeepSpeed the optimizer's tensors stay sharded, in files each
        rank writes beside state.pt: sharded/ (the checkpointer) and deepspeed/)."""
        optimizer = self._saved_optimizer
        if self._deepspeed is not None:
            optimizer = {"deepspeed": "deepspeed"}  # relative to the checkpoint directory
        elif self.optimizer is not None:
            optimizer = optimizer_state(self._model, self.optimizer)
        return {"optimizer": optimizer, "updates": self.updates, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], policy) -> None:
        self._saved_optimizer = state.get("optimizer") or None
        self.optimizer = None
        self.updates = state["updates"]
        self.generator.set_state(state["generator"])

    def lr_factor(self) -> float:
        warm = self.cfg.lr_warmup_iterations
        if warm and self.updates < warm:
            return (self.updates + 1) / warm
        progress = min(1.0, (self.updates - warm) / max(1, self.total_iterations - warm))
        if self.cfg.lr_schedule == "linear":
            return 1.0 - progress
        if self.cfg.lr_schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    # ---- the update ----------------------------------------------------------------------------
    @property
    def kl_loss_coef(self) -> float:
        """The k3 KL term's coefficient in the loss (PPO moves algo.beta into the reward instead)."""
        return self.cfg.beta

    def advantages(self, batch: Batch, tokenizer=None) -> torch.Tensor:
        """(N,) per-completion advantages for outcome credit, (N, C) per-token ones for process credit."""
        index = {pid: i for i, pid in enumerate(batch.groups())}
        groups = torch.tensor([index[p] for p in batch.prompt_id])
        if self.cfg.credit == "outcome":
            rewards = torch.tensor(batch.reward, dtype=torch.float64)
            return ESTIMATORS[self.cfg.advantage](rewards, groups).float()
        outcome = self.process_inputs(batch)
        lengths = torch.tensor([len(c) for c in batch.completion_ids])
        return process(batch.step_rewards, step_positions(batch, tokenizer), lengths, groups, self.cfg.credit,
                       self.cfg.advantage, self.cfg.step_temperature, outcome, self.cfg.outcome_weight).float()

    def process_inputs(self, batch: Batch) -> torch.Tensor | None:
        """Check what a process reward wrote for step-level credit; the `algo.outcome` column (N,) or None."""
        if batch.step_rewards is None or batch.steps is None:
            raise UserError(f"algo.credit={self.cfg.credit} needs a process reward (one that writes step_rewards, "
                            f"e.g. reward=arith_steps); use algo.credit=outcome for this reward")
        for steps, scores in zip(batch.steps, batch.step_rewards):
            if len(steps) != len(scores):
                raise UserError(f"the process reward gave {len(scores)} scores for {len(steps)} steps; "
                                f"it must score every step in batch.steps")
        if self.cfg.outcome is None:
            return None
        if self.cfg.outcome not in batch.rewards:
            raise UserError(f"algo.outcome={self.cfg.outcome!r} is not a reward column; "
                            f"columns: {', '.join(batch.rewards) or 'none'}")
        return torch.tensor(batch.rewards[self.cfg.outcome], dtype=torch.float64)

    def update(self, policy, batch: Batch) -> dict[str, float]:
        self.setup(policy)
        cfg, model, device = self.cfg, policy.model, policy.device
        adv = self.advantages(batch, policy.tokenizer)
        t = to_tensors(batch, policy.tokenizer.pad_token_id, device)
        mask = t.completion_mask
        if adv.dim() == 2:
            batch.advantages = [row[: len(c)] for row, c in zip(adv.tolist(), batch.completion_ids)]
            adv = torch.nn.functional.pad(adv, (0, t.completion_width - adv.shape[1])).to(device)
            token_adv = adv[mask.bool()]
        else:
            batch.advantages = adv.tolist()
            adv = adv.to(device)
            token_adv = adv
        if self.kl_loss_coef == 0 and not any_rank(bool(token_adv.any())):  # a zero loss with a zero gradient
            return skipped("every advantage is 0 (each group's rewards are all equal) and algo.beta=0: no gradient",
                           **{"advantage/abs_mean": 0.0})
        n = len(batch)
        release_free_heap()  # what decoding freed, before the update's passes allocate (rewardlab/heap.py)
        if cfg.num_iterations > 1 or 0 < cfg.minibatch_size < n:
            with policy.full_weights():
                old = self._old_logprobs(batch, model, t)
        else:
            old = None  # one optimizer step on the sampling policy: rho = 1 exactly
        ref = self._ref_logprobs(policy, t) if self.kl_loss_coef > 0 else None
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * self.lr_factor()
        trained = self._trained  # forward through the engine (DDP, DeepSpeed); decoding uses policy.model
        trained.train()
        live = self._live_rows(adv, mask, model)
        recorded = self._sampled_entropy(batch, t)
        sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0, "grad_norm": 0.0}
        passes: dict[str, int] = {"rows": 0, "repeated": 0}  # rows through the backward passes; those run by a copy
        steps = 0
        size = cfg.minibatch_size if cfg.minibatch_size > 0 else n
        for _ in range(cfg.num_iterations):
            order = self._order(batch).to(device)
            for start in range(0, n, size):
                rows = order[start : start + size]
                stats = self._step(trained, t, rows, adv, old, ref, mask, live, measure_entropy=recorded is None,
                                   passes=passes)
                for k, v in stats.items():
                    sums[k] += v
                steps += 1
        trained.eval()
        if not isinstance(trained, DistributedDataParallel) and self._deepspeed is None:
            # free the gradients until the next update (HF Trainer does too): a model-sized tensor per
            # parameter otherwise stays through generation and checkpoint writes; DDP's live in its buckets
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        lengths = mask.sum(-1)
        out = {k: v / steps for k, v in sums.items()}
        if recorded is not None:  # the sampling policy's, over every completion token of the batch
            out["entropy"] = float((recorded * mask).sum() / mask.sum().clamp(min=1))
        out.update({"lr": self.optimizer.param_groups[0]["lr"], "advantage/mean": float(token_adv.mean()),
                    "advantage/abs_mean": float(token_adv.abs().mean()), "update/steps": float(steps),
                    "update/tokens": float(lengths.sum()),
                    "update/skipped_rows": 0.0 if live is None else float((~live).float().mean()),
                    "update/repeated_rows": passes["repeated"] / max(passes["rows"], 1)})
        if ref is None:
            out.pop("kl")
        return out

    def _order(self, batch: Batch) -> torch.Tensor:
        """The rows in the order the minibatches are cut from. `groups` (default): the batch's groups (rows of
        one prompt) in random order, each group's rows together, so a minibatch holds whole groups where
        `minibatch_size` is a multiple of the group size, as in verl (its minibatches count prompts x rollout.n,
        split in order); then the packed pass computes each prompt once for all its rows (algos/packing.py).
        `rows`: the rows shuffled one by one (TRL's GRPOTrainer shuffles its generation batch so)."""
        if self.cfg.minibatch_order == "rows":
            return torch.randperm(len(batch), generator=self.generator)
        groups = list(batch.groups().values())
        return torch.tensor([row for g in torch.randperm(len(groups), generator=self.generator).tolist()
                             for row in groups[g]])

    @staticmethod
    def _sampled_entropy(batch: Batch, t: Tensors) -> torch.Tensor | None:
        """(N, C) per-token entropy of the policy that sampled `batch`, as the generator recorded it while
        decoding (the same temperature-scaled distribution the update's forward pass computes), or None where
        the engine did not record it (vLLM) or a row's record does not match its completion. When recorded, the
        `entropy` metric is taken from it and the update's passes compute none: no forward without a graph for
        the rows that skip the backward, no entropy in the forward with one (verl reports its `actor/entropy`
        from the policy before the update likewise). Otherwise the passes measure it at each step's policy;
        the two differ by the few optimizer steps of one update."""
        return _recorded(batch.sample_entropy, batch, t)

    def _live_rows(self, adv: torch.Tensor, mask: torch.Tensor, model) -> torch.Tensor | None:
        """(N,) bool: the rows with a nonzero advantage at some completion token, or None where every row goes
        through the backward. A row whose advantage is 0 everywhere adds exactly 0 to the clipped loss and its
        gradient when the loss has no KL term (beta = 0), so its backward is compute spent on zeros (groups whose
        rewards are all equal: GRPO's zero-variance groups, a fifth to a half of a run's rows); it is left out of
        the forward/backward, and the minibatch's normalizers (rows, tokens) still count it, so the gradient and
        the optimizer step equal the full pass's to rounding. Not under FSDP or DeepSpeed, where every rank
        must run the same passes."""
        if not self.cfg.skip_zero_advantage or self.kl_loss_coef != 0 or self._deepspeed is not None \
                or is_sharded(model):
            return None
        return (adv != 0) if adv.dim() == 1 else ((adv != 0) & mask.bool()).any(-1)

    def _step(self, model, t: Tensors, rows: torch.Tensor, adv, old, ref, mask,
              live: torch.Tensor | None = None, measure_entropy: bool = True,
              passes: dict[str, int] | None = None) -> dict[str, float]:
        cfg = self.cfg
        # under DDP the gradients are views into its all-reduce buckets: zeroed in place they stay there, and
        # micro-batches accumulate into them (one copy of the gradients); elsewhere they are freed
        self.optimizer.zero_grad(set_to_none=not isinstance(model, DistributedDataParallel))
        n_seqs, n_tokens = len(rows), float(mask[rows].sum())
        totals = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        micro_rows = self._micro_rows(t)
        if live is not None:  # rows with no gradient: only their entropy is measured (if asked), without a backward
            idle, rows = rows[~live[rows]], rows[live[rows]]
            if measure_entropy:
                totals["entropy"] = self._entropy_sum(t, idle, mask) / max(n_tokens, 1.0)
        starts = list(range(0, len(rows), micro_rows))
        padded = micro_steps(len(starts), is_sharded(model) or self._deepspeed is not None)
        # a minibatch with no row left still runs one pass with zero weight: the optimizer steps on zero
        # gradients as the full pass would (AdamW's moments move), and under DDP the rank joins the all-reduce
        padded = max(padded, 1)
        for index in range(padded):
            # sharded (FSDP, DeepSpeed) a rank with fewer micro-batches repeats its first with zero weight:
            # every rank must run the same number of forward/backward passes (each gathers and reduces)
            start, weight = (starts[index], 1.0) if index < len(starts) else (0, 0.0)
            micro = rows[start : start + micro_rows] if len(rows) else idle[:1]
            m = mask[micro]
            with no_sync(model, last=index == padded - 1):  # DDP all-reduces on the last micro-batch only
                logps, entropy = token_logprobs(model, t, micro, self.temperature, with_entropy=measure_entropy,
                                                 packed=cfg.padding_free, unique=cfg.unique_rows,
                                                 counts=passes if weight else None)
                if passes is not None and weight:
                    passes["rows"] += len(micro)
                old_logps = logps.detach() if old is None else old[micro]
                token_loss, stats = clipped_loss(logps, old_logps, adv[micro], m, cfg.eps_low, cfg.eps_high,
                                                 self.kl_loss_coef, None if ref is None else ref[micro])
                loss = aggregate(token_loss, m, cfg.loss_agg, n_seqs, n_tokens, self.max_new_tokens)
                if self._deepspeed is not None:
                    self._deepspeed.backward(loss * weight, last=index == padded - 1)
                else:
                    (loss * weight).backward()
            if weight == 0.0:
                continue
            totals["loss"] += float(loss.detach())
            if entropy is not None:
                totals["entropy"] += float((entropy * m).sum()) / max(n_tokens, 1.0)
            totals["clip_fraction"] += float((stats["clipped"] * m).sum()) / max(n_tokens, 1.0)
            if "kl" in stats:
                totals["kl"] += float((stats["kl"] * m).sum()) / max(n_tokens, 1.0)
        if self._deepspeed is not None:  # DeepSpeed reduces, clips and steps
            totals["grad_norm"] = self._deepspeed.step()
            return totals
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        if not self.optimizer.state:  # the first step allocates AdamW's state: on a trimmed heap (rewardlab/heap.py)
            release_free_heap()
        self.optimizer.step()
        totals["grad_norm"] = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
        return totals

    @torch.no_grad()
    def _entropy_sum(self, t: Tensors, rows: torch.Tensor, mask: torch.Tensor) -> float:
        """The summed per-token entropy of `rows` under the policy as it is now (no graph, no backward)."""
        size, total = self._micro_rows(t), 0.0
        for start in range(0, len(rows), size):
            part = rows[start : start + size]
            _, entropy = token_logprobs(self._model, t, part, self.temperature, with_entropy=True,
                                        packed=self.cfg.padding_free, unique=self.cfg.unique_rows)
            total += float((entropy * mask[part]).sum())
        return total

    @torch.no_grad()
    def _old_logprobs(self, batch: Batch, model, t: Tensors) -> torch.Tensor:
        """The sampling policy's log-probs: from the generator when it recorded them, else recomputed."""
        recorded = _recorded(batch.sample_logprobs, batch, t)
        return self._forward_logprobs(model, t) if recorded is None else recorded

    @torch.no_grad()
    def _ref_logprobs(self, policy, t: Tensors) -> torch.Tensor:
        """The reference's log-probs, through the pass the policy's forward takes (padded where FSDP shards the
        policy, as its sharded head cannot be packed): where the two models are equal, as at the first step, the
        KL term and its gradient are then exactly 0, not rounding that AdamW would turn into a full-size step."""
        with policy.reference() as reference, policy.full_weights(reference):
            return self._forward_logprobs(reference, t, packed=self.cfg.padding_free and not is_sharded(policy.model))

    def _micro_rows(self, t: Tensors) -> int:
        """Rows per forward pass: `micro_batch_size`, fewer when `micro_batch_tokens` caps padded tokens."""
        if self.cfg.micro_batch_tokens > 0:
            return max(1, min(self.cfg.micro_batch_size, self.cfg.micro_batch_tokens // t.input_ids.shape[1]))
        return self.cfg.micro_batch_size

    def _forward_logprobs(self, model, t: Tensors, packed: bool | None = None) -> torch.Tensor:
        was_training = model.training
        model.eval()
        size = self._micro_rows(t)
        packed = self.cfg.padding_free if packed is None else packed
        chunks = [token_logprobs(model, t, slice(s, s + size), self.temperature, packed=packed,
                                 unique=self.cfg.unique_rows)[0]
                  for s in range(0, t.input_ids.shape[0], size)]
        model.train(was_training)
        return torch.cat(chunks)
