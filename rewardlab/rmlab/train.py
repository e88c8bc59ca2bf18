"""`rewardlab train-rm`: train a process (`rm=prm`) or outcome (`rm=orm`) reward model from a policy's
backbone and write `<run dir>/model/`, which `reward=prm reward.model=<dir>` / `reward=orm reward.model=<dir>`
load as is.

- PRM: TRL's stepwise-supervision rows (`prompt`, `completions` = the steps, `labels` = one bool per step;
  `rewardlab label` writes them to `<run dir>/labels.jsonl`), each step's label at its separator's last
  token and -100 elsewhere: TRL's PRM layout, built by the same function `reward=prm` scores with
  (rewards/prm.py `token_classification_ids`), so training and scoring read the same position. The default
  `rm.format=next_token` trains the policy's own causal LM to predict `+` / `-` as the next token there, over
  the text exactly as the policy writes it (question, steps, newlines), so both the backbone's features and
  its head are reused; `token_classification` puts a new 2-class head there instead; `math_shepherd` predicts
  `+` / `-` after a tag inserted after each step (Math-Shepherd's layout, rewards/prm.py `math_shepherd_ids`;
  the tag must be one of the tokenizer's own tokens). On the arith labels the inserted tags cost held-out
  and test F1 against next_token (README "The reward-model lab"): the character model reads its own layout
  best. TRL 1.16 has no PRMTrainer (it left the main package and is not in `trl.experimental` here), so
  transformers' `Trainer` runs it; the format and separator are saved in the model's config (`prm_format`,
  `step_separator`), where `reward=prm` reads them back.
- ORM: TRL's preference rows (`prompt`, `chosen`, `rejected`), or a `rewardlab train` run directory whose
  rollouts pair a correct with an incorrect completion of the same prompt (the `gold` column), through TRL's
  `RewardTrainer` on pre-tokenized pairs: each text is what `reward=orm` reads (rewards/orm.py `orm_text`,
  no EOS appended), so the score is trained where it is read (rewardlab/rmlab/orm_training.py).
A held-out split by prompt (`rm.eval_fraction`) is scored before training and after every epoch into
metrics.jsonl and W&B: PRM step accuracy, first-error and whole-solution accuracy and ProcessBench's F1;
ORM pair accuracy (a tie counts half). The model is built in a temporary directory and renamed into place.
PRM options (README "The reward-model lab", second pass): `rm.lm_weight` adds the policy's own next-token loss
on each row's steps before its first wrong one, so the backbone keeps learning arithmetic while its `+`/`-` is
trained (on arith, with 4096 labelled prompts, it took the held-out F1 from 0.45 to 0.85; `rm=prm_lm`);
`rm.keep_best` saves the epoch with the best held-out F1; `rm.lora_r` trains LoRA adapters, merged on save.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from rewardlab.config import command_schema, schema
from rewardlab.errors import UserError
from rewardlab.io import write_json_atomic, write_text_atomic
from rewardlab.rewards.prm import LM_FORMATS, math_shepherd_ids, token_classification_ids
from rewardlab.rmlab.bench_process import first_error, processbench_f1
from rewardlab.rmlab.rm_data import read_stepwise, split_by_prompt


@dataclass
class TrainRMRunConfig:
    """`rewardlab train-rm` settings (`run.*`)."""

    seed: int = 0
    device: str = "auto"
    threads: int = 0
    name: Optional[str] = None  # run name for W&B; defaults to the run directory's name
    verbose: bool = False


@dataclass
class TrainRMConfig:
    run: TrainRMRunConfig = field(default_factory=TrainRMRunConfig)
    policy: Any = None
    rm: Any = None
    logger: Any = None


command_schema("_train_rm_schema", TrainRMConfig)


PRM_FORMATS = {"next_token": "\n", "token_classification": "\n", "math_shepherd": ":"}  # and each default tag
LM_OFFSET = 2  # rm.lm_weight: a label >= this at a position is the policy's own next token there (+ LM_OFFSET)


@schema("rm", "prm")
@dataclass
class PRMTrainConfig:
    _target_: str = "rewardlab.rmlab.train.PRMTraining"
    data: Optional[str] = None  # a stepwise JSONL file, or a `rewardlab label` run directory (its labels.jsonl)
    eval_fraction: float = 0.1  # prompts held out for the per-epoch accuracy
    epochs: int = 6
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = 1024  # tokens per row; longer rows are cut (their last steps go unlabelled), as TRL does
    format: str = "next_token"  # next_token (the policy's LM head at each step's newline) | math_shepherd (the
    # LM head at an inserted tag) | token_classification (a new 2-class head); README "The reward-model lab"
    step_tag: Optional[str] = None  # after each step, saved in the model's config; none: \n, math_shepherd ":"
    good_token: str = "+"  # next_token / math_shepherd: the next token trained for a right step
    bad_token: str = "-"  # ... and for a wrong one
    threshold: float = 0.5  # held-out metrics: a step scored below it counts as wrong
    lm_weight: float = 0.0  # next_token: + this x the policy's own next-token loss on each row's steps up to its
    # first wrong one (keeps what the backbone knows of arithmetic while the +/- head is trained)
    keep_best: bool = False  # save the epoch with the best held-out F1 (ties: the later), not the last
    lora_r: int = 0  # > 0: train LoRA adapters of this rank (peft, all linear layers) and merge them on save
    lora_alpha: int = 32


def process_metrics(probabilities: list[list[float]], labels: list[list[bool]], threshold: float
                    ) -> dict[str, float]:
    """Held-out PRM accuracy: per step; per solution, whether the predicted first error (first step scored
    below `threshold`) is the labelled one, and whether "all steps right" is; and ProcessBench's
    acc_error, acc_correct and F1, computed by `bench=process`'s own function (one home for the metric)."""
    steps = [(p >= threshold) == bool(y) for ps, ys in zip(probabilities, labels) for p, y in zip(ps, ys)]
    predicted = [first_error(ps, threshold) for ps in probabilities]
    gold = [first_error([float(bool(y)) for y in ys], 0.5) for ys in labels]
    bench = processbench_f1(predicted, gold)
    return {"step_accuracy": sum(steps) / len(steps),
            "first_error_accuracy": sum(p == g for p, g in zip(predicted, gold)) / len(gold),
            "solution_accuracy": sum((p < 0) == (g < 0) for p, g in zip(predicted, gold)) / len(gold),
            "acc_error": bench["process/acc_error"], "acc_correct": bench["process/acc_correct"],
            "f1": bench["process/f1"]}


def padded(rows: list[list[int]], pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their attention mask."""
    width = max(1, max(len(r) for r in rows))
    ids = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


class PRMTraining:
    """Step-level binary classification at each separator (num_labels=2, score = P(class 1))."""

    def __init__(self, **settings: Any) -> None:
        self.cfg = PRMTrainConfig(**{k: v for k, v in settings.items() if k != "_target_"})
        if self.cfg.format not in PRM_FORMATS:
            raise UserError(f"rm.format={self.cfg.format!r} is not one of {', '.join(PRM_FORMATS)}")
        self.tag = self.cfg.step_tag if self.cfg.step_tag is not None else PRM_FORMATS[self.cfg.format]
        if self.cfg.lm_weight < 0 or (self.cfg.lm_weight > 0 and self.cfg.format != "next_token"):
            raise UserError(f"rm.lm_weight={self.cfg.lm_weight} needs rm.format=next_token and a weight >= 0")
        if self.cfg.lora_r < 0:
            raise UserError(f"rm.lora_r={self.cfg.lora_r} must be 0 (train every weight) or a LoRA rank")

    @staticmethod
    def key(row: dict) -> str:
        return row["prompt"]

    def candidates(self, tokenizer) -> list[int]:
        """The LM formats' (good, bad) token ids, as reward=prm picks them (each text's last token)."""
        return [tokenizer.encode(t, add_special_tokens=False)[-1] for t in (self.cfg.good_token, self.cfg.bad_token)]

    def ids(self, tokenizer, row: dict) -> tuple[list[int], list[int]]:
        """The ids `reward=prm` reads for this format and each step's scored position."""
        layout = math_shepherd_ids if self.cfg.format == "math_shepherd" else token_classification_ids  # next_token too
        return layout(tokenizer, row["prompt"], row["steps"], self.tag)

    def read(self, seed: int) -> list[dict]:
        return read_stepwise(self.cfg.data)

    def build(self, source: str, tokenizer):
        from transformers import AutoModelForCausalLM, AutoModelForTokenClassification

        if self.cfg.format in LM_FORMATS:
            model = AutoModelForCausalLM.from_pretrained(source)
            for token in (self.tag, self.cfg.good_token, self.cfg.bad_token):
                ids = tokenizer.encode(token, add_special_tokens=False)
                if not ids or ids[-1] == tokenizer.unk_token_id:
                    raise UserError(f"{token!r} (rm.step_tag / good_token / bad_token) is not a token of {source}'s "
                                    f"tokenizer; choose one of its own tokens")
        else:
            model = AutoModelForTokenClassification.from_pretrained(source, num_labels=2)
        model.config.step_separator = self.tag  # read back by reward=prm, with the format
        model.config.prm_format = self.cfg.format
        model.config.pad_token_id = pad_id(tokenizer)
        if self.cfg.lora_r > 0:  # merged into the weights by `save_model`: model/ loads as a plain model
            from rewardlab.policy.lora import LoraSettings, add_adapters

            model = add_adapters(model, LoraSettings(r=self.cfg.lora_r, alpha=self.cfg.lora_alpha))
            if self.cfg.format not in LM_FORMATS:  # the new 2-class head is trained in full
                for name, parameter in model.named_parameters():
                    parameter.requires_grad_(parameter.requires_grad or "score" in name or "classifier" in name)
        return model

    def encode(self, row: dict, tokenizer) -> dict[str, list[int]]:
        """TRL's PRM layout: each step's label (1 right, 0 wrong) at its scored position, -100 elsewhere. The
        LM formats read the label there too, unshifted, through `lm_loss`. With `lm_weight` > 0 (next_token),
        every other position from the question's last token through the last step before the first wrong one
        holds LM_OFFSET + the id of the token that follows it: the policy's own next-token target there."""
        ids, positions = self.ids(tokenizer, row)
        labels = [-100] * len(ids)
        if self.cfg.lm_weight > 0 and positions:
            right = next((k for k, y in enumerate(row["labels"]) if not y), len(row["labels"]))
            start = positions[0] - len(tokenizer.encode(row["steps"][0] + self.tag, add_special_tokens=False))
            end = positions[right - 1] if right else start  # through the last right step's separator
            for t in range(max(start, 0), end):
                labels[t] = LM_OFFSET + ids[t + 1]
        for position, label in zip(positions, row["labels"]):
            labels[position] = int(label)
        return {"input_ids": ids[: self.cfg.max_length], "labels": labels[: self.cfg.max_length]}

    def lm_loss(self, tokenizer):
        """The LM formats' loss: at each labelled position, cross-entropy of the next-token logits against the
        good or bad token (the label is read where `reward=prm` reads the score, no shift). Over the whole
        vocabulary, as Math-Shepherd trains (a two-candidate loss on the soft MC labels did worse on the arith
        labels: README "The reward-model lab"). With `lm_weight` > 0, plus that weight x the mean next-token
        cross-entropy at the positions `encode` marked with the policy's own next token."""
        candidates = torch.tensor(self.candidates(tokenizer))
        weight = self.cfg.lm_weight

        def loss(outputs, labels, num_items_in_batch=None):
            where = (labels == 0) | (labels == 1)
            target = candidates.to(labels.device)[1 - labels[where]]  # label 1: the good token (index 0)
            total = torch.nn.functional.cross_entropy(outputs.logits[where].float(), target)
            own = labels >= LM_OFFSET  # lm_weight: the policy's own next tokens on the right steps
            if weight > 0 and own.any():
                total = total + weight * torch.nn.functional.cross_entropy(outputs.logits[own].float(),
                                                                           labels[own] - LM_OFFSET)
            return total

        return loss

    def trainer(self, model, tokenizer, rows: list[dict], settings: dict):
        from datasets import Dataset
        from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

        encoded = [self.encode(r, tokenizer) for r in rows]
        data = Dataset.from_dict({k: [e[k] for e in encoded] for k in ("input_ids", "labels")})
        loss = self.lm_loss(tokenizer) if self.cfg.format in LM_FORMATS else None
        return Trainer(model=model, args=TrainingArguments(**settings), train_dataset=data,
                       data_collator=DataCollatorForTokenClassification(tokenizer), processing_class=tokenizer,
                       compute_loss_func=loss)

    def evaluate(self, model, tokenizer, rows: list[dict]) -> dict[str, float]:
        return process_metrics(self.probabilities(model, tokenizer, rows), [r["labels"] for r in rows],
                               self.cfg.threshold)

    @torch.inference_mode()
    def probabilities(self, model, tokenizer, rows: list[dict]) -> list[list[float]]:
        """Each row's step probabilities as training reads them (the same ids and positions `reward=prm`
        scores, a test checks the two agree)."""
        device = next(model.parameters()).device
        encoded = [self.ids(tokenizer, r) for r in rows]
        probabilities: list[list[float]] = []
        for start in range(0, len(encoded), self.cfg.batch_size):
            chunk = encoded[start : start + self.cfg.batch_size]
            ids, mask = padded([i for i, _ in chunk], pad_id(tokenizer), device)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            if self.cfg.format in LM_FORMATS:
                probs = logits[..., self.candidates(tokenizer)].softmax(-1)[..., 0]
            else:
                probs = logits.softmax(-1)[..., 1]
            probabilities.extend(probs[r, positions].tolist() for r, (_, positions) in enumerate(chunk))
        return probabilities


def save_model(model, tokenizer, run_dir: Path) -> Path:
    """`<run dir>/model/`, built in a temporary directory beside it and renamed into place; LoRA adapters
    (rm.lora_r) are merged first, so it loads as a plain model."""
    from rewardlab.policy.lora import has_adapters

    if has_adapters(model):
        model = model.merge_and_unload()
    target = run_dir / "model"
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=run_dir))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def train_rm(cfg: DictConfig, run_dir: Path) -> Path:
    """Read and check `rm.data` (nothing is written if it is refused), train, write `<run dir>/model/`.
    What libraries print goes to stderr: stdout is left to the results."""
    from rewardlab.run import Launch

    launch = Launch()
    with contextlib.redirect_stdout(sys.stderr):
        try:
            return _train_rm(cfg, run_dir, launch)
        except BaseException:
            launch.failed()
            raise


def _train_rm(cfg: DictConfig, run_dir: Path, launch) -> Path:
    from hydra.utils import instantiate
    from transformers import PrinterCallback, TrainerCallback

    from rewardlab import provenance
    from rewardlab.policy import load_tokenizer, resolve_device
    from rewardlab.run import setup_torch
    from rewardlab.scoring import _tokenizer_source
    from rewardlab.tracking import MetricsFile, console, quiet_libraries

    quiet_libraries(cfg.run.verbose)
    setup_torch(cfg.run)
    launch.accept(run_dir, True)
    rm = instantiate(cfg.rm)
    if rm.cfg.epochs < 1:
        raise UserError(f"rm.epochs={rm.cfg.epochs} must be at least 1")
    train_rows, held = split_by_prompt(rm.read(cfg.run.seed), rm.key, rm.cfg.eval_fraction, cfg.run.seed)
    if not train_rows:
        raise UserError(f"rm.eval_fraction={rm.cfg.eval_fraction} holds out every prompt; lower it")
    device = resolve_device(cfg.run.device)
    source = _tokenizer_source(cfg.policy)
    try:
        tokenizer = load_tokenizer(source)
        tokenizer.padding_side = "right"  # as the rewards pad: positions count from the first token
        model = rm.build(source, tokenizer).to(device)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot build a reward model from the policy {source}: {str(exc).splitlines()[0]}") from None

    run_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "config.yaml").exists():  # the Hydra record of a first start (as `train` writes it)
        provenance.record(run_dir, cfg, 0)
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    logger = instantiate(cfg.logger)
    logger.start(run_dir, OmegaConf.to_container(cfg, resolve=True), cfg.run.name or run_dir.name)
    launch.started = True
    metrics = MetricsFile(run_dir / "metrics.jsonl")
    console.print(f"train-rm: {len(train_rows)} rows to train on, {len(held)} held out, from {source}")
    began = time.perf_counter()

    keep_best = bool(getattr(rm.cfg, "keep_best", False)) and bool(held)
    best: dict[str, Any] = {"epoch": None, "f1": -1.0, "state": None}

    def record(epoch: int, logs: dict[str, float]) -> None:
        row: dict[str, float] = {"epoch": epoch, "time/train": time.perf_counter() - began}
        row.update({f"rm/train/{k}": float(v) for k, v in logs.items() if k in ("loss", "accuracy")})
        if held:
            model.eval()
            row.update({f"rm/eval/{k}": v for k, v in rm.evaluate(model, tokenizer, held).items()})
            model.train(epoch > 0)
        f1 = row.get("rm/eval/f1", float("nan"))
        if keep_best and epoch > 0 and f1 >= best["f1"]:  # NaN never compares: such an epoch is not kept
            best.update(epoch=epoch, f1=f1, state={k: v.detach().clone() for k, v in model.state_dict().items()})
        metrics.append(row)
        logger.log(row, step=epoch)
        shown = "  ".join(f"{k.split('/', 1)[1]}={v:.3f}" for k, v in row.items() if k.startswith("rm/"))
        console.print(f"epoch {epoch:>2}/{rm.cfg.epochs}  {shown}", markup=False, highlight=False)

    class EveryEpoch(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs) -> None:
            if logs and "loss" in logs:  # the epoch's training log (the run's last log has train_loss only)
                record(round(state.epoch), logs)

    record(0, {})
    with tempfile.TemporaryDirectory(prefix="rewardlab-rm-") as out:
        settings = dict(output_dir=out, learning_rate=rm.cfg.lr, num_train_epochs=rm.cfg.epochs,
                        per_device_train_batch_size=rm.cfg.batch_size, seed=cfg.run.seed,
                        save_strategy="no", eval_strategy="no",
                        logging_strategy="epoch", report_to="none", disable_tqdm=True, bf16=False,
                        use_cpu=device.type == "cpu", dataloader_num_workers=0)
        trainer = rm.trainer(model, tokenizer, train_rows, settings)
        trainer.remove_callback(PrinterCallback)  # it prints every log dict to stdout
        trainer.add_callback(EveryEpoch())
        trainer.train()
    model.eval()
    final = metrics.rows[-1]
    if keep_best and best["state"] is not None:
        model.load_state_dict(best["state"])
        final = next(r for r in metrics.rows if r["epoch"] == best["epoch"])
        console.print(f"keeping epoch {best['epoch']} (held-out F1 {best['f1']:.3f})", markup=False)
    model_dir = save_model(model, tokenizer, run_dir)
    write_json_atomic(run_dir / "summary.json", {"final": final, "model": str(model_dir), "epoch": final["epoch"],
                                                 "train_rows": len(train_rows), "eval_rows": len(held)})
    logger.finish()
    return model_dir
