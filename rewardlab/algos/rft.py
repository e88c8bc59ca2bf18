"""Expert iteration (ReST-EM / RFT / STaR): keep completions whose reward passes a threshold, dedupe,
cap per prompt, and fine-tune on them with TRL's SFTTrainer (loss on completion tokens only)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import Any

from rewardlab.algos import AlgoContext
from rewardlab.config import schema
from rewardlab.rollout import Batch


@schema("algo", "rft")
@dataclass
class RFTConfig:
    _target_: str = "rewardlab.algos.rft.ExpertIteration"
    samples_per_prompt: int = 8
    threshold: float = 1.0  # keep completions with reward >= threshold
    max_per_prompt: int = 4
    dedupe: bool = True
    restart_from_base: bool = False  # ReST-EM: fine-tune the base model on each iteration's data
    lr: float = 1e-4
    epochs: int = 1
    batch_size: int = 16
    max_length: int = 512


def select_kept(batch: Batch, threshold: float, max_per_prompt: int, dedupe: bool) -> list[int]:
    """Rows to train on: reward >= threshold, identical texts once, at most `max_per_prompt` per prompt."""
    kept: list[int] = []
    for rows in batch.groups().values():
        seen: set[str] = set()
        count = 0
        for i in rows:
            if batch.reward[i] < threshold or (dedupe and batch.completion[i] in seen):
                continue
            if count >= max_per_prompt:
                break
            seen.add(batch.completion[i])
            kept.append(i)
            count += 1
    return kept


class ExpertIteration:
    """Rejection-sampling fine-tuning; `restart_from_base` reloads the starting weights each iteration."""

    def __init__(self, context: AlgoContext | None = None, **settings: Any) -> None:
        self.cfg = RFTConfig(**{k: v for k, v in settings.items() if k != "_target_"})
        self.samples_per_prompt = self.cfg.samples_per_prompt
        self.seed = (context or AlgoContext()).seed

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any], policy) -> None:
        pass

    def update(self, policy, batch: Batch) -> dict[str, float]:
        from datasets import Dataset
        from trl import SFTConfig, SFTTrainer

        cfg = self.cfg
        kept = select_kept(batch, cfg.threshold, cfg.max_per_prompt, cfg.dedupe)
        metrics = {"rft/kept": float(len(kept)), "rft/kept_fraction": len(kept) / max(1, len(batch)),
                   "rft/prompts_with_kept": float(len({batch.prompt_id[i] for i in kept}))}
        if not kept:
            return metrics
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
            result = trainer.train()
        policy.model.eval()
        metrics["loss"] = float(result.training_loss)
        return metrics
