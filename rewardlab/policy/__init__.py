"""Load the policy (model + tokenizer): a hub model, a local directory, or the embedded tiny model;
optionally with LoRA adapters (peft), gradient checkpointing and bf16."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.policy.lora import (LoraSettings, adapter_base, add_adapters, add_adapters_like, has_adapters,
                                   is_adapter_dir, load_adapters)
from rewardlab.policy.tiny import TinyBuild, ensure_tiny


@schema("policy", "base")
@dataclass
class PolicyConfig:
    _target_: str = "rewardlab.policy.load_policy"
    name: str = "tiny"
    hub_id: Optional[str] = None  # a hub model id (presets set it), loaded with from_pretrained
    path: Optional[str] = None  # a local directory saved by save_pretrained (a model or LoRA adapters); overrides the rest
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (bfloat16 on a CUDA device, else float32)
    lora: LoraSettings = field(default_factory=LoraSettings)  # policy.lora.r=8 trains adapters only
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more time
    tiny: TinyBuild = field(default_factory=TinyBuild)  # how the embedded model is built (name=tiny)


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Policy:
    """The model being trained, its tokenizer, where its starting weights came from and its device."""

    model: torch.nn.Module
    tokenizer: Any
    source: str
    device: torch.device
    _reference: torch.nn.Module | None = field(default=None, repr=False)
    sharding: Any = None  # rewardlab.sharding.FSDP / DeepSpeed once `shard` ran (a sharded launch), else None

    def load_fresh(self, shard: bool = True) -> torch.nn.Module:
        """A new copy of the starting weights (the frozen reference, or ReST-EM's restart point);
        with LoRA, the base with new adapters of the same shape, so its state dict fits this model.
        Sharded like the policy under FSDP (DeepSpeed leaves it whole), unless `shard` is False (a model
        trained beside the policy, which algos/auxiliary.py shards after loading its saved weights)."""
        model = load_model(self.source, self.model.dtype)
        if has_adapters(self.model):
            model = add_adapters_like(model, self.model)
        model = model.to(self.device)
        return self.sharding.shard(model) if self.sharding is not None and shard else model

    def shard(self, sharding) -> None:
        """Shard the model in place (rewardlab.sharding; DeepSpeed does it when the optimizer is built);
        models loaded later are sharded too."""
        sharding.shard(self.model)
        self.sharding = sharding

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module | None = None) -> Iterator[None]:
        """`model` (the policy's by default) with whole weights for no-grad passes: decoding, scoring,
        log-probs. Under FSDP and ZeRO-3 every rank gathers them together; otherwise nothing happens."""
        if self.sharding is None:
            yield
            return
        with self.sharding.full_weights(self.model if model is None else model):
            yield

    @contextlib.contextmanager
    def reference(self) -> Iterator[torch.nn.Module]:
        """The frozen starting policy for KL terms: with LoRA, this model with its adapters disabled
        (no second copy); otherwise a copy of the starting weights, loaded on first use and kept."""
        if has_adapters(self.model):
            with self.model.disable_adapter():
                yield self.model
            return
        if self._reference is None:
            self._reference = self.load_fresh().eval().requires_grad_(False)
        yield self._reference


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> tuple[int, ...]:
    """The tokenizer's EOS, then each EOS id of the model's generation_config.json, once each: chat models
    end a turn with several (Qwen2.5-Instruct: <|im_end|>, <|endoftext|>; Llama-3.1-Instruct: three)."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    listed = [] if listed is None else [listed] if isinstance(listed, int) else list(listed)
    return tuple(dict.fromkeys(int(i) for i in [tokenizer.eos_token_id, *listed] if i is not None))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"run.device={name} but no CUDA device is available; use run.device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bfloat16 on a CUDA device that supports it, float32 elsewhere (CPU bf16 is slow)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    if name not in _DTYPES:
        raise UserError(f"policy.dtype={name!r} is not one of {sorted(_DTYPES) + ['auto']}")
    return _DTYPES[name]


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


def _local_dir(path: str, key: str) -> Path:
    directory = Path(path).expanduser()
    if not (directory / "config.json").exists() and not is_adapter_dir(directory):
        what = "does not exist" if not directory.exists() else "has no config.json or adapter_config.json"
        raise UserError(f"{key}={path} {what}; point it at a directory saved by save_pretrained")
    return directory


def load_policy(name: str = "tiny", hub_id: str | None = None, path: str | None = None, dtype: str = "float32",
                lora: LoraSettings | dict | None = None, gradient_checkpointing: bool = False,
                tiny: dict | None = None, device: str = "cpu", log=print, key: str = "policy.path") -> Policy:
    """Build the policy from `path` (a local model or LoRA adapters), else `hub_id`, else the tiny model.
    `key` is the config key the user set `path` with (a judge model loads through here too), for errors."""
    lora = lora if isinstance(lora, LoraSettings) else LoraSettings(**(lora or {}))
    torch_device = resolve_device(device) if isinstance(device, str) else device
    torch_dtype = resolve_dtype(dtype, torch_device)
    adapters = None
    if path is not None:
        directory = _local_dir(path, key)
        adapters = directory if is_adapter_dir(directory) else None
        source = adapter_base(directory) if adapters else str(directory)
        tokenizer_source = str(directory)
    elif hub_id is not None:
        source = tokenizer_source = hub_id
    elif name == "tiny":
        source = tokenizer_source = str(ensure_tiny(TinyBuild(**(tiny or {})), log=log))
    else:
        raise UserError(f"policy {name!r} needs policy.hub_id=<hub model id> or policy.path=<local model directory>")
    try:
        model = load_model(source, torch_dtype)
        tokenizer = load_tokenizer(tokenizer_source)
    except OSError as exc:
        raise UserError(f"cannot load the policy from {source}: {str(exc).splitlines()[0]}; "
                        f"download it first or set policy.path=<local model directory>") from None
    if gradient_checkpointing:
        model.activation_checkpointing_enable()  # non-reentrant: works with frozen (LoRA) inputs
    if adapters is not None:
        model = load_adapters(model, adapters)
    elif lora.r > 0:
        model = add_adapters(model, lora)
    model = model.to(torch_device)
    model.eval()
    return Policy(model=model, tokenizer=tokenizer, source=source, device=torch_device)
