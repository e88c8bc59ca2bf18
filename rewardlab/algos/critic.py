"""The value model for PPO (`algo=ppo`): a transformer backbone with a scalar head, its optimizer, its
clipped value loss and its state in the algorithm's checkpoint.

`critic.model` null copies the policy's starting backbone (AutoModel over the policy's source, so a resume
rebuilds the same one before loading the saved weights); a local directory loads that model's backbone. The
head is a linear layer on the last hidden state, initialised from its own seeded generator, and the whole build
runs in a fork of the global RNG: a resumed run builds its critic at a later iteration than the uninterrupted
run did, so any draw from the global generator would shift its sampling.
Written here rather than taken from TRL: TRL's PPOTrainer owns its own generation loop and its value head
lives inside it; verl's critic is a Ray worker. The formulas match verl's `compute_value_loss` and its
explained-variance metric (tests/test_ppo.py checks both against them). Under several processes the critic
trains and is checkpointed the way the policy is under the same launch (auxiliary.py): DDP, FSDP or DeepSpeed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from rewardlab.algos.auxiliary import Auxiliary
from rewardlab.algos.losses import Tensors
from rewardlab.errors import UserError


@dataclass
class CriticConfig:
    """`algo.critic.*`."""

    model: Optional[str] = None  # a local model directory (its backbone gets the head); null: the policy's backbone
    lr: float = 1e-4
    weight_decay: float = 0.0
    cliprange_value: float = 0.5  # value clipping around the rollout's values (0: no clipping)
    warmup: int = 0  # the first iterations train only the critic (VAPO's value pre-training)
    minibatch_size: Optional[int] = None  # completions per critic step; null: algo.minibatch_size
    max_grad_norm: float = 1.0
    init_std: float = 0.02  # the head's initial weight scale (bias 0)


def value_loss(values: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor,
               cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token clipped value loss 0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2) times mask, and
    per-token 1.0 where the clipped branch is larger (verl counts these as its clip fraction). All (n, C)."""
    clipped = old_values + (values - old_values).clamp(-cliprange, cliprange)
    plain, bounded = (values - returns) ** 2, (clipped - returns) ** 2
    return 0.5 * torch.max(plain, bounded) * mask, (bounded > plain).float() * mask


def explained_variance(returns: torch.Tensor, values: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / (Var(R) + 1e-5) over the masked tokens (unbiased variances, as verl's metric):
    1 for a perfect critic, 0 for one that predicts the mean, negative for worse."""
    valid = mask.bool()
    r, v = returns[valid].double(), values[valid].double()
    if r.numel() < 2:
        return float("nan")
    return float(1.0 - (r - v).var() / (r.var() + 1e-5))


class ValueModel(torch.nn.Module):
    """backbone(ids) -> last hidden state -> linear -> one value per position."""

    def __init__(self, backbone: torch.nn.Module, hidden: int, init_std: float, seed: int) -> None:
        super().__init__()
        self.backbone = backbone
        # read by the FSDP wrap policy (one unit per block), accelerate's DeepSpeed set-up and TRL's ZeRO-3 gather
        self._no_split_modules = getattr(backbone, "_no_split_modules", None)
        self.config = backbone.config
        self.head = torch.nn.Linear(hidden, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.head.weight.copy_(torch.randn(self.head.weight.shape, generator=generator) * init_std)
            self.head.bias.zero_()
        self.head.to(next(backbone.parameters()).device, torch.float32)

    @property
    def is_gradient_checkpointing(self) -> bool:
        return bool(getattr(self.backbone, "is_gradient_checkpointing", False))

    def forward(self, input_ids, attention_mask, position_ids, width: int) -> torch.Tensor:
        """(n, width) values: V_t is read at the position before completion token t (the state it is drawn
        from), as verl reads its critic at [-width - 1 : -1]."""
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).last_hidden_state
        # a copy, not a view of the head's output: FSDP's hooks on the returned tensor must not see a view
        return self.head(hidden[:, -width - 1 : -1].float()).squeeze(-1).clone()


def hidden_size(config: Any, where: str) -> int:
    """The width of the backbone's hidden state, from its config (text config for multimodal ones)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in ("hidden_size", "d_model", "n_embd"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    raise UserError(f"{where} has no hidden size in its config (hidden_size, d_model or n_embd), so a value "
                    f"head cannot be put on it; use a transformer language model directory")


def load_value_model(cfg: CriticConfig, policy, seed: int) -> ValueModel:
    """The critic for `policy`: critic.model's backbone (or the policy's starting one) with a fresh head,
    on the policy's device and dtype. Its vocabulary must cover the policy's token ids."""
    from transformers import AutoConfig, AutoModel

    where = "the policy's backbone" if cfg.model is None else f"critic.model={cfg.model}"
    source = policy.source
    if cfg.model is not None:
        directory = Path(cfg.model).expanduser()
        if not (directory / "config.json").exists():
            raise UserError(f"critic.model={cfg.model} has no config.json; point it at a directory saved by "
                            f"save_pretrained, or leave it null to copy the policy's backbone")
        source = str(directory)
    config = AutoConfig.from_pretrained(source)
    hidden = hidden_size(config, where)
    vocab = getattr(config.get_text_config() if hasattr(config, "get_text_config") else config, "vocab_size", None)
    if vocab is not None and vocab < len(policy.tokenizer):
        raise UserError(f"{where} has a vocabulary of {vocab} tokens but the policy's tokenizer has "
                        f"{len(policy.tokenizer)}: the critic reads the policy's token ids, so it needs the same tokenizer")
    # off the run's RNG stream: from_pretrained and nn.Linear draw from the global generator, and a resumed run
    # builds its critic later than the uninterrupted one did, so any draw here would shift its sampling
    with torch.random.fork_rng(devices=[]):
        backbone = AutoModel.from_pretrained(source, dtype=policy.model.dtype).to(policy.device)
        return ValueModel(backbone, hidden, cfg.init_std, seed)


class Critic:
    """The value model with its AdamW, trained like the policy under this launch (auxiliary.py: a DDP
    replica under torchrun, sharded under FSDP, its own DeepSpeed engine under DeepSpeed)."""

    def __init__(self, cfg: CriticConfig, seed: int) -> None:
        self.cfg, self.seed = cfg, seed
        self.model: ValueModel | None = None
        self.aux: Auxiliary | None = None
        self._saved: dict[str, Any] | None = None

    @property
    def trained(self) -> torch.nn.Module:
        """What the training passes run through: DDP, the DeepSpeed engine, or the (sharded) model."""
        return self.aux.trained

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """Its AdamW (under DeepSpeed, the wrapper DeepSpeed steps)."""
        return self.aux.optimizer

    def setup(self, policy, micro_batch_size: int) -> None:
        """Build the model and optimizer once, with restored state if a checkpoint gave one, under the
        policy's launch; off the global RNG stream (a resumed run builds it at another point)."""
        if self.model is not None:
            return
        saved, self._saved = self._saved, None
        with torch.random.fork_rng(devices=[]):
            model = load_value_model(self.cfg, policy, self.seed)
            if saved is not None and saved.get("model") is not None:
                _check_head(saved["model"], model.head.in_features)

            def adamw(params):
                return torch.optim.AdamW(params, lr=self.cfg.lr, weight_decay=self.cfg.weight_decay)

            self.aux = Auxiliary("critic", model, adamw, policy.sharding, micro_batch_size, self.cfg.max_grad_norm,
                                 saved, units=(model.head,))
        self.model = model
        self.model.eval()

    @torch.no_grad()
    def values(self, t: Tensors, micro_rows: int) -> torch.Tensor:
        """(N, C) values of every completion token under the current critic (no gradient)."""
        n, C = t.input_ids.shape[0], t.completion_width
        with self.aux.full_weights():
            return torch.cat([self.model(t.input_ids[s : s + micro_rows], t.attention_mask[s : s + micro_rows],
                                         t.position_ids[s : s + micro_rows], C) for s in range(0, n, micro_rows)])

    def step(self, t: Tensors, rows: torch.Tensor, returns: torch.Tensor, old_values: torch.Tensor,
             mask: torch.Tensor, micro_rows: int) -> dict[str, float]:
        """One optimizer step on `rows`: the clipped value loss, token-mean over the minibatch's tokens."""
        C = t.completion_width
        n_tokens = float(mask[rows].sum())
        cliprange = self.cfg.cliprange_value if self.cfg.cliprange_value > 0 else float("inf")
        totals = {"critic/value_loss": 0.0, "critic/clip_fraction": 0.0}
        starts = list(range(0, len(rows), micro_rows))

        def loss_of(index: int, real: bool) -> torch.Tensor:
            micro = rows[starts[index] : starts[index] + micro_rows]
            predicted = self.trained(t.input_ids[micro], t.attention_mask[micro], t.position_ids[micro], C)
            loss, clipped = value_loss(predicted, returns[micro], old_values[micro], mask[micro], cliprange)
            loss = loss.sum() / max(n_tokens, 1.0)
            if real:
                totals["critic/value_loss"] += float(loss.detach())
                totals["critic/clip_fraction"] += float(clipped.sum()) / max(n_tokens, 1.0)
            return loss

        totals["critic/grad_norm"] = self.aux.train_step(len(starts), loss_of)
        return totals

    # ---- checkpointed state: tensors and plain data only (state.pt is read with weights_only=True) ----
    def state_dict(self) -> dict[str, Any] | None:
        return self._saved if self.aux is None else self.aux.state_dict()

    def save_files(self, checkpoint: Path) -> None:
        """Under FSDP / DeepSpeed every rank writes its part of the critic beside state.pt."""
        if self.aux is not None:
            self.aux.save_files(checkpoint)

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Kept until the critic is (re)built by `setup`, which needs the policy."""
        if state is not None and "weights" in state:  # written before auxiliary.py named it "model"
            state = {"model": state["weights"], "optimizer": state.get("optimizer")}
        self._saved = state
        self.model = self.aux = None


def _check_head(weights: dict[str, torch.Tensor], width: int) -> None:
    head = weights.get("head.weight")
    if head is None or head.shape[-1] != width:
        got = "no value head" if head is None else f"a value head over {head.shape[-1]} features"
        raise UserError(f"the checkpoint's critic has {got}, but the critic model here gives "
                        f"{width}-wide hidden states; resume with the critic.model that wrote it")
