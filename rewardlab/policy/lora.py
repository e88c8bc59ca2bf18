"""LoRA through PEFT: wrap a model with trainable adapters, or load adapters saved by a run.

With adapters, the frozen reference for KL terms is the same model with its adapters disabled
(`Policy.reference`), so no second copy of the weights is held.
"""

from __future__ import annotations

import copy

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

ADAPTER_CONFIG = "adapter_config.json"


@dataclass
class LoraSettings:
    """`policy.lora.*`: rank 0 trains every weight; rank > 0 trains LoRA adapters only."""

    r: int = 0
    alpha: int = 32
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])  # or e.g. [q_proj,v_proj]


def is_adapter_dir(path: Path) -> bool:
    """True when `path` holds PEFT adapters (saved by `save_pretrained` of a LoRA policy)."""
    return (path / ADAPTER_CONFIG).exists()


def adapter_base(path: Path) -> str:
    """The base model (hub id or directory) the adapters in `path` were trained on."""
    from peft import PeftConfig

    return PeftConfig.from_pretrained(str(path)).base_model_name_or_path


def add_adapters(model: torch.nn.Module, settings: LoraSettings) -> torch.nn.Module:
    """`model` wrapped with fresh, trainable LoRA adapters on `settings.target_modules`."""
    from peft import LoraConfig, get_peft_model

    targets = settings.target_modules
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules="all-linear" if list(targets) == ["all-linear"] else list(targets),
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def add_adapters_like(model: torch.nn.Module, like: torch.nn.Module) -> torch.nn.Module:
    """`model` with new adapters configured as those of the PEFT model `like` (a restart from the base)."""
    from peft import get_peft_model

    return get_peft_model(model, copy.deepcopy(like.peft_config["default"]))


def load_adapters(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    """`model` with the trainable adapters saved in `path`."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(path), is_trainable=True)


def has_adapters(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)
