"""Load the policy (model + tokenizer) from a local directory or build the embedded tiny model."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.policy.tiny import TinyBuild, ensure_tiny



@schema("policy", "base")
@dataclass
class PolicyConfig:
    _target_: str = "rewardlab.policy.load_policy"
    name: str = "tiny"
    path: Optional[str] = None  # a local directory saved by save_pretrained; overrides `name`
    dtype: str = "float32"  # float32 | bfloat16 | float16
    tiny: TinyBuild = field(default_factory=TinyBuild)  # how the embedded model is built (name=tiny)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """The model being trained, its tokenizer, where it came from and the device it lives on."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    device: torch.device

    def load_fresh(self) -> torch.nn.Module:
        """A new copy of the starting weights (the frozen reference, or ReST-EM's restart point)."""
        return load_model(self.source, self.model.dtype).to(self.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name} but no CUDA device is available; use run.device=cpu")
    return torch.device(name)


def load_tokenizer(source: str):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(source: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(source, dtype=dtype)


def load_policy(name: str = "tiny", path: str | None = None, dtype: str = "float32",
                tiny: dict | None = None, device: str = "cpu", log=print) -> Policy:
    """Build the policy from `path` (any local causal LM) or, with no path, the embedded tiny model."""
    if dtype not in _DTYPES:
        raise UserError(f"policy.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
    if path is not None:
        source = Path(path).expanduser()
        if not (source / "config.json").exists():
            what = "does not exist" if not source.exists() else "has no config.json (not a saved model)"
            raise UserError(f"policy.path={path} {what}; point it at a directory saved by save_pretrained")
        source_str = str(source)
    elif name == "tiny":
        source_str = str(ensure_tiny(TinyBuild(**(tiny or {})), log=log))
    else:
        raise UserError(f"policy {name!r} needs policy.path=<local model directory>")
    torch_device = resolve_device(device) if isinstance(device, str) else device
    model = load_model(source_str, _DTYPES[dtype]).to(torch_device)
    model.eval()
    return Policy(model=model, tokenizer=load_tokenizer(source_str), source=source_str, device=torch_device)
