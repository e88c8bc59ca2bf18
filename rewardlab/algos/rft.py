"""Expert iteration (ReST-EM / RFT / STaR): keep the completions that pass, dedupe, cap per prompt, and
fine-tune on them with TRL's SFTTrainer (loss on completion tokens only).

What passes is `algo.keep`: `threshold` (reward >= `algo.threshold`; by default the reward's own pass score,
e.g. verifiable's `correct`), `best` (each prompt's highest-rewarded completions, for graded rewards such as
a PRM), or `quantile` (reward >= the iteration's `algo.quantile` quantile). A graded reward with no pass
score and no threshold set is refused at start: a threshold it never reaches would train on nothing.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any, Optional

from rewardlab.algos import AlgoContext, skipped
from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rollout import Batch

KEEP = ("threshold", "best", "quantile")


@schema("algo", "rft")
@dataclass
class RFTConfig:
    _target_: str = "rewardlab.algos.rft.ExpertIteration"
    samples_per_prompt: int = 8
    keep: str = "threshold"  # threshold | best (per prompt) | quantile (of the iteration's rewards)
    threshold: Optional[float] = None  # keep=threshold: reward >= this; null: the reward's pass score
    quantile: float = 0.75  # keep=quantile: reward >= this quantile of the iteration's rewards
    max_per_prompt: int = 4
    dedupe: bool = True
    restart_from_base: bool = False  # ReST-EM: fine-tune the base model on each iteration's data
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 512


def select_kept(batch: Batch, threshold: float | None, max_per_prompt: int, dedupe: bool) -> list[int]:
    """Rows to train on: reward >= threshold (None: the best first, whatever their reward), identical texts
    once, at most `max_per_prompt` per prompt."""
    kept: list[int] = []
    for rows in batch.groups().values():
        if threshold is None:
            rows = sorted(rows, key=lambda i: -batch.reward[i])
        seen: set[str] = set()
        count = 0
        for i in rows:
            if (threshold is not None and batch.reward[i] < threshold) or (dedupe and batch.completion[i] in seen):
                continue
            if count >= max_per_prompt:
                break
            seen.add(batch.completion[i])
            kept.append(i)
            count += 1
    return kept


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (linear interpolation, as numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class ExpertIteration:
    """Rejection-sampling fine-tuning; `restart_from_base` reloads the starting weights each iteration."""

    def __init__(self, context: AlgoContext | None = None, **settings: Any) -> None:
        context = context or AlgoContext()
        self.cfg = RFTConfig(**{k: v for k, v in settings.items() if k != "_target_"})
        self.samples_per_prompt = self.cfg.samples_per_prompt
        self.seed = context.seed
        cfg = self.cfg
        if cfg.keep not in KEEP:
            raise UserError(f"algo.keep={cfg.keep!r} is not one of {', '.join(KEEP)}")
        if not 0.0 <= cfg.quantile <= 1.0:
            raise UserError(f"algo.quantile={cfg.quantile} must be between 0 and 1")
        self.threshold = cfg.threshold
        if cfg.keep == "threshold" and cfg.threshold is None:
            passing = getattr(context.reward, "passing", None)
            if passing is None:
                name = getattr(context.reward, "name", "this reward")
                raise UserError(f"algo=rft keeps completions that pass, but reward '{name}' gives graded scores "
                                f"with no pass mark; set algo.keep=best (each prompt's best completions), "
                                f"algo.keep=quantile (algo.quantile=0.75) or algo.threshold=<a score it reaches>")
            self.threshold = float(passing)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], policy) -> None:
        pass

    def cutoff(self, batch: Batch) -> float | None:
        """This iteration's reward threshold (None for keep=best, which ranks within each prompt)."""
        if self.cfg.keep == "quantile":
            return quantile(batch.reward, self.cfg.quantile)
        return self.threshold if self.cfg.keep == "threshold" else None

    def update(self, policy, batch: Batch) -> dict[str, float]:
        cfg = self.cfg
        cutoff = self.cutoff(batch)
        kept = select_kept(batch, cutoff, cfg.max_per_prompt, cfg.dedupe)
        metrics = {"rft/kept": float(len(kept)), "rft/kept_fraction": len(kept) / max(1, len(batch)),
                   "rft/prompts_with_kept": float(len({batch.prompt_id[i] for i in kept}))}
        if cutoff is not None:
            metrics["rft/threshold"] = float(cutoff)
        if not kept:
            reached = "none reached" if cutoff is None else f"none reached the threshold {cutoff:.3g}"
            return skipped(f"algo=rft kept no completion: {reached} (best reward this iteration "
                           f"{max(batch.reward):.3g}); algo.keep=best or quantile keeps the best ones", **metrics)
        from datasets import Dataset
        from transformers import PrinterCallback
        from trl import SFTConfig, SFTTrainer

        if cfg.restart_from_base:
            policy.model.load_state_dict(policy.load_fresh().state_dict())
        data = Dataset.from_dict({"prompt": [batch.prompt[i] for i in kept],
                                  "completion": [batch.completion[i] for i in kept]})
        with tempfile.TemporaryDirectory(prefix="rewardlab-sft-") as out:
            args = SFTConfig(
                output_dir=out, learning_rate=cfg.lr, num_train_epochs=cfg.epochs,
                per_device_train_batch_size=cfg.batch_size, max_length=cfg.max_length, seed=self.seed,
                save_strategy="no", report_to="none", logging_strategy="no", disable_tqdm=True,
                use_cpu=policy.device.type == "cpu", bf16=False, dataloader_num_workers=0,
            )
            trainer = SFTTrainer(model=policy.model, args=args, train_dataset=data,
                                 processing_class=policy.tokenizer)
            trainer.remove_callback(PrinterCallback)  # it prints the final {'train_runtime': ...} to stdout
            result = trainer.train()
        policy.model.eval()
        metrics["loss"] = float(result.training_loss)
        return metrics
