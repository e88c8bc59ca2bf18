"""Iterative preference optimization: each iteration's scored samples become pairs (algos/pairs.py)
and TRL's DPOTrainer trains on them. The reference is the initial model or the previous iteration's.

What survives across iterations lives in `state_dict()` so a resumed run continues exactly: the number
of updates, the initial model's samples per prompt (anchored rejection), and the trainable weights (for LoRA,
the adapters) of the models before the last updates (CREAM). SPIN needs nothing more: its opponent and
reference is the model that sampled, i.e. the restored policy.

CREAM (METHODS.md; Wang et al. 2025 and their released code): the samples of M_t (the policy now) are ranked
by M_t's DPO implicit reward log pi_t(y)/pi_ref(y), against M_t's own reference, and by M_{t-1}'s (the
model before the last update, against its reference); pairs come from M_t's ranking and lambda from the
Kendall tau of the two. M_0 has no reference and ranks by its mean token log-likelihood, as the released
code does; before the first update there is no implicit reward, so the run's reward ranks (CREAM's
M_0 -> M_1 step is supervised). `cream_self` is a variant: pairs from the run's reward, lambda from its
agreement with M_t's own implicit reward.
CREAM's soft label (lambda * DPO(y+, y-) + (1 - lambda) * DPO(y-, y+)) is the one loss TRL cannot
weight per pair; `SoftLabelDPOTrainer` derives it from TRL's own one-pair sigmoid loss.
"""

from __future__ import annotations

import copy
import tempfile
from dataclasses import dataclass, field, fields
from typing import Any, Dict, List

import torch

from rewardlab.algos import AlgoContext, skipped
from rewardlab.algos.pairs import PairSet, anchored_rejection, best_worst, cream, dno, spin
from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rollout import Batch

PAIR_BUILDERS = ("best_worst", "anchored_rejection", "spin", "cream", "cream_self", "dno")
SOFT = ("cream", "cream_self")  # builders whose pairs carry a soft label


@schema("algo", "dpo")
@dataclass
class DPOAlgoConfig:
    _target_: str = "rewardlab.algos.dpo.IterativeDPO"
    samples_per_prompt: int = 4
    pairs: str = "best_worst"  # best_worst | anchored_rejection | spin | cream | cream_self | dno
    min_margin: float = 0.0  # skip pairs whose reward gap is below this (ties are always skipped)
    reference: str = "previous"  # previous (the model that sampled this iteration) | initial
    beta: float = 0.1
    loss_type: List[str] = field(default_factory=lambda: ["sigmoid"])
    lr: float = 1e-5
    epochs: int = 1
    batch_size: int = 8
    max_length: int = 512
    trl: Dict[str, Any] = field(default_factory=dict)  # any other trl.DPOConfig field, passed through


def soft_label_loss(loss: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """lambda * A + (1 - lambda) * B for one pair, from A = -log sigmoid(beta*delta) (TRL's sigmoid loss):
    the flipped pair's loss B = -log sigmoid(-beta*delta) = -log(1 - e^-A)."""
    flipped = -torch.log(-torch.expm1(-loss.clamp(min=1e-6)))
    return label * loss + (1 - label) * flipped


def _dpo_trainer_class():
    from trl import DPOTrainer
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    class LabelCollator(DataCollatorForPreference):
        def torch_call(self, examples):
            out = super().torch_call(examples)
            out["cream_label"] = torch.tensor([e["cream_label"] for e in examples], dtype=torch.float32)
            return out

    class SoftLabelDPOTrainer(DPOTrainer):
        """DPO with one pair per device batch (gradient accumulation makes up the batch) and a label per pair."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            label = inputs.pop("cream_label")[0]
            return soft_label_loss(super().compute_loss(model, inputs, return_outputs, num_items_in_batch), label)

    return DPOTrainer, SoftLabelDPOTrainer, LabelCollator


class IterativeDPO:
    """Sample, score, build pairs, run DPO; pair builder, reference and TRL's DPO settings are settings."""

    def __init__(self, context: AlgoContext | None = None, **settings: Any) -> None:
        self.context = context or AlgoContext()
        self.cfg = DPOAlgoConfig(**{k: v for k, v in settings.items() if k != "_target_"})
        cfg = self.cfg
        if cfg.pairs not in PAIR_BUILDERS:
            raise UserError(f"algo.pairs={cfg.pairs!r} is not one of {', '.join(PAIR_BUILDERS)}")
        if cfg.reference not in ("previous", "initial"):
            raise UserError(f"algo.reference={cfg.reference!r} is not one of previous, initial")
        if cfg.pairs in SOFT and list(cfg.loss_type) != ["sigmoid"]:
            raise UserError(f"algo.pairs={cfg.pairs} softens the sigmoid DPO loss; set algo.loss_type=[sigmoid]")
        if cfg.pairs == "anchored_rejection" and self.context.reward is None:
            raise UserError("algo.pairs=anchored_rejection scores the initial model's samples and needs the run's reward")
        from trl import DPOConfig

        known = {f.name for f in fields(DPOConfig)}
        unknown = sorted(set(cfg.trl) - known)
        if unknown:
            raise UserError(f"algo.trl has keys that trl.DPOConfig does not know: {', '.join(unknown)}")
        self.samples_per_prompt = cfg.samples_per_prompt
        self.updates = 0
        self.anchors: dict[str, dict[str, Any]] = {}  # prompt_id -> the initial model's samples for it
        self.initial: torch.nn.Module | None = None  # frozen initial model (reloadable, never stored)
        # CREAM: trainable weights of the models before the last updates, newest last (M_{t-1}, then M_{t-2})
        self.snapshots: list[dict[str, torch.Tensor]] = []
        previous = cfg.reference == "previous"
        self.keep = {"cream": 2 if previous else 1, "cream_self": 1 if previous else 0}.get(cfg.pairs, 0)
        self._scratch: torch.nn.Module | None = None  # a copy of the policy that snapshots are loaded into

    # ---- state carried across iterations (checkpointed) -----------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"updates": self.updates, "anchors": copy.deepcopy(self.anchors)}
        if self.keep:
            state["snapshots"] = [dict(weights) for weights in self.snapshots]
        return state

    def load_state_dict(self, state: dict[str, Any], policy) -> None:
        self.updates = int(state["updates"])
        self.anchors = copy.deepcopy(state.get("anchors", {}))
        self.snapshots = [dict(weights) for weights in state.get("snapshots", [])]
        if self.keep and self.updates and not self.snapshots:
            raise UserError(f"this checkpoint has no previous model weights, which algo.pairs={self.cfg.pairs} "
                            f"ranks with (written by an older rewardlab); start a new run")

    # ---- references ------------------------------------------------------------------------------
    def _initial(self, policy) -> torch.nn.Module:
        if self.initial is None:
            self.initial = _merged(policy.load_fresh()).eval().requires_grad_(False)
        return self.initial

    def _reference(self, policy) -> torch.nn.Module:
        if self.cfg.reference == "initial":
            return self._initial(policy)
        return _merged(copy.deepcopy(policy.model)).eval().requires_grad_(False)

    # ---- CREAM's rankings ------------------------------------------------------------------------
    def _remember(self, policy) -> None:
        """Keep the policy's trainable weights (for LoRA, the adapters) before an update changes them."""
        weights = {name: p.detach().cpu().clone() for name, p in policy.model.named_parameters() if p.requires_grad}
        self.snapshots = [*self.snapshots, weights][-self.keep:]

    def _snapshot(self, policy, back: int) -> torch.nn.Module:
        """The model `back` updates ago (1: M_{t-1}), loaded into a scratch copy of the policy."""
        if self._scratch is None:
            self._scratch = policy.load_fresh().eval().requires_grad_(False)
        unexpected = self._scratch.load_state_dict(self.snapshots[-back], strict=False).unexpected_keys
        if unexpected:
            raise RuntimeError(f"CREAM snapshot does not fit the policy: {unexpected[:3]}")
        return self._scratch

    @staticmethod
    def _sequence_logps(model: torch.nn.Module, t) -> torch.Tensor:
        """The sum of completion-token log-probs per row under `model`."""
        from rewardlab.algos.pg import token_logprobs

        sums = []
        for start in range(0, len(t.completion_mask), 64):
            rows = slice(start, start + 64)
            sums.append((token_logprobs(model, t, rows, 1.0)[0] * t.completion_mask[rows]).sum(-1))
        return torch.cat(sums)

    @torch.no_grad()
    def _implicit_rewards(self, policy, batch: Batch, before: bool) -> tuple[list[float] | None, list[float] | None]:
        """(M_t's, M_{t-1}'s when `before`) DPO implicit rewards log pi(y)/pi_ref(y) of every row, each model
        against its own reference (see the module docstring); (None, None) before the first update."""
        from rewardlab.algos.pg import to_tensors

        if self.updates == 0:
            return None, None
        t = to_tensors(batch, policy.tokenizer.pad_token_id, policy.device)
        was_training = policy.model.training
        policy.model.eval()
        logp = lambda model: self._sequence_logps(model, t)  # noqa: E731
        initial = self.cfg.reference == "initial"
        now = logp(policy.model)
        last = logp(self._snapshot(policy, 1)) if (before or not initial) else None  # M_{t-1}
        current = now - (logp(self._initial(policy)) if initial else last)
        previous = None
        if before and self.updates == 1:  # M_{t-1} is M_0, which has no reference
            previous = last / t.completion_mask.sum(-1).clamp(min=1)
        elif before:
            previous = last - (logp(self._initial(policy)) if initial else logp(self._snapshot(policy, 2)))
        policy.model.train(was_training)
        return current.tolist(), None if previous is None else previous.tolist()

    # ---- anchored rejection ----------------------------------------------------------------------
    def _anchor_batch(self, policy, batch: Batch) -> tuple[Batch, dict[str, float]]:
        """The initial model's samples for this batch's prompts, scored now by the run's reward. Samples of
        the first iteration are the initial model's own; later prompts are sampled from a frozen copy."""
        from rewardlab.data.base import Example
        from rewardlab.generation.hf import HFGenerator, Sampling
        from rewardlab.policy import Policy

        groups = batch.groups()
        new = [pid for pid in groups if pid not in self.anchors]
        if new and self.updates == 0:
            for pid in new:
                self.anchors[pid] = {"prompt": batch.prompt[groups[pid][0]], "reference": batch.reference[groups[pid][0]],
                                     "solution": batch.solution[groups[pid][0]], **_raw_input(batch, groups[pid][0]),
                                     "completions": [batch.completion[i] for i in groups[pid]]}
        elif new:
            frozen = Policy(self._initial(policy), policy.tokenizer, policy.source, policy.device)
            generator = HFGenerator(frozen, sampling=Sampling(temperature=self.context.temperature,
                                                               max_new_tokens=self.context.max_new_tokens))
            examples = [Example(pid, batch.prompt[groups[pid][0]], batch.reference[groups[pid][0]],
                                batch.solution[groups[pid][0]], **_raw_input(batch, groups[pid][0])) for pid in new]
            sampled = generator.generate(examples, n=self.cfg.samples_per_prompt)
            for ex, rows in zip(examples, sampled.groups().values()):
                self.anchors[ex.id] = {"prompt": ex.prompt, "reference": ex.answer, "solution": ex.solution,
                                       "question": ex.question, "messages": ex.messages,
                                       "completions": [sampled.completion[i] for i in rows]}
        rows = [(pid, a, c) for pid in groups for a in [self.anchors[pid]] for c in a["completions"]]
        tok = policy.tokenizer
        anchors = Batch(prompt_id=[pid for pid, _, _ in rows], prompt=[a["prompt"] for _, a, _ in rows],
                        completion=[c for _, _, c in rows],
                        prompt_ids=[tok(a["prompt"], add_special_tokens=False)["input_ids"] for _, a, _ in rows],
                        completion_ids=[tok(c, add_special_tokens=False)["input_ids"] for _, _, c in rows],
                        finish_reason=["stop"] * len(rows), reference=[a["reference"] for _, a, _ in rows],
                        solution=[a["solution"] for _, a, _ in rows], question=[a.get("question") for _, a, _ in rows],
                        messages=[a.get("messages") for _, a, _ in rows], iteration=batch.iteration)
        self.context.reward.score(anchors)
        return anchors, {"anchors/prompts_sampled": float(len(new) if self.updates else 0),
                         "anchors/stored_prompts": float(len(self.anchors))}

    # ---- the update ------------------------------------------------------------------------------
    def build_pairs(self, policy, batch: Batch) -> tuple[PairSet, dict[str, float]]:
        cfg = self.cfg
        if cfg.pairs == "best_worst":
            return best_worst(batch, cfg.min_margin), {}
        if cfg.pairs == "spin":
            return spin(batch), {}
        if cfg.pairs == "dno":
            return dno(batch, cfg.min_margin), {}
        if cfg.pairs == "cream":
            return cream(batch, *self._implicit_rewards(policy, batch, before=True), cfg.min_margin), {}
        if cfg.pairs == "cream_self":
            return cream(batch, None, self._implicit_rewards(policy, batch, before=False)[0], cfg.min_margin), {}
        anchors, extra = self._anchor_batch(policy, batch)
        return anchored_rejection(batch, anchors, cfg.min_margin), extra

    def update(self, policy, batch: Batch) -> dict[str, float]:
        pairs, metrics = self.build_pairs(policy, batch)
        metrics.update(pairs.metrics())
        if not pairs.pairs:
            why = ", ".join(f"{n} {reason}" for reason, n in sorted(pairs.skipped.items())) or "none"
            return skipped(f"algo=dpo built no pair (algo.pairs={self.cfg.pairs}; groups skipped: {why})", **metrics)
        if self.keep:
            self._remember(policy)
        metrics.update(self._train(policy, pairs, self._reference(policy)))
        self.updates += 1
        return metrics

    def _train(self, policy, pairs: PairSet, reference: torch.nn.Module) -> dict[str, float]:
        from datasets import Dataset
        from transformers import PrinterCallback
        from trl import DPOConfig

        cfg = self.cfg
        soft = cfg.pairs in SOFT
        plain, soft_trainer, collator = _dpo_trainer_class()
        columns = {"prompt": [p.prompt for p in pairs.pairs], "chosen": [p.chosen for p in pairs.pairs],
                   "rejected": [p.rejected for p in pairs.pairs]}
        if soft:
            columns["cream_label"] = [p.label for p in pairs.pairs]
        with tempfile.TemporaryDirectory(prefix="rewardlab-dpo-") as out:
            settings = dict(
                output_dir=out, learning_rate=cfg.lr, num_train_epochs=cfg.epochs, beta=cfg.beta,
                loss_type=list(cfg.loss_type), max_length=cfg.max_length, seed=self.context.seed + self.updates,
                per_device_train_batch_size=1 if soft else cfg.batch_size,
                gradient_accumulation_steps=cfg.batch_size if soft else 1, remove_unused_columns=not soft,
                save_strategy="no", report_to="none", logging_strategy="epoch", disable_tqdm=True,
                use_cpu=policy.device.type == "cpu", bf16=False, dataloader_num_workers=0)
            settings.update(cfg.trl)
            args = DPOConfig(**settings)
            kwargs = {"data_collator": collator(pad_token_id=policy.tokenizer.pad_token_id)} if soft else {}
            trainer = (soft_trainer if soft else plain)(model=policy.model, ref_model=reference, args=args,
                                                        train_dataset=Dataset.from_dict(columns),
                                                        processing_class=policy.tokenizer, **kwargs)
            trainer.remove_callback(PrinterCallback)
            result = trainer.train()
        policy.model.eval()
        return {"loss": float(result.training_loss), **trl_metrics(trainer.state.log_history)}


def _merged(model: torch.nn.Module) -> torch.nn.Module:
    """A LoRA model as a plain one, its adapters merged in: TRL's DPOTrainer runs the reference through a fused
    LM-head forward that reads the backbone's hidden states, which a PEFT wrapper does not return."""
    from peft import PeftModel

    return model.merge_and_unload() if isinstance(model, PeftModel) else model


def trl_metrics(history: list[dict[str, float]]) -> dict[str, float]:
    """DPO reward margins, accuracies and chosen/rejected implicit rewards from TRL's logs, averaged."""
    keys = ("rewards/margins", "rewards/accuracies", "rewards/chosen", "rewards/rejected")
    out = {}
    for key in keys:
        values = [row[key] for row in history if key in row]
        if values:
            out[f"dpo/{key.split('/', 1)[1]}"] = sum(values) / len(values)
    return out


def _raw_input(batch: Batch, i: int) -> dict:
    """Row `i`'s question and conversation before the policy's template (rewards render their own)."""
    return {"question": None if batch.question is None else batch.question[i],
            "messages": None if batch.messages is None else batch.messages[i]}
