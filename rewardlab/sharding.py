"""Sharded training under `accelerate launch`: FSDP2 (conf/accelerate/fsdp*.yaml) or DeepSpeed ZeRO-2/3
(conf/accelerate/deepspeed_zero*.yaml). With neither, data parallelism keeps a whole replica per rank
(distributed.py).

FSDP: accelerate's launcher exports the config's `fsdp_*` keys (ACCELERATE_USE_FSDP, FSDP_*) and its
FullyShardedDataParallelPlugin parses them; torch's `fully_shard` does the sharding. Each transformer block
(the auto-wrap policy: the model's `_no_split_modules`, or `fsdp_transformer_layer_cls_to_wrap`) becomes one
FSDP unit and the root holds the rest, so parameters, gradients and AdamW state live 1/world_size per rank.
`fsdp_reshard_after_forward: true` is FULL_SHARD (ZeRO-3), `false` is SHARD_GRAD_OP (ZeRO-2).

DeepSpeed: accelerate builds the engine (`Accelerator.prepare`) around the policy and its optimizer; see
the `DeepSpeed` class.

What a loop that owns its own generation needs beside that, for both:
- Decoding, scoring with the policy and the no-grad log-prob passes run under `full_weights`: the weights
  are gathered once and kept whole until the block ends (as TRL gathers ZeRO-3 weights for generation), so
  ranks decode different numbers of steps without waiting on each other's all-gathers.
- The training forward/backward passes are collectives, so every rank runs the same number of micro-batches
  per optimizer step (`micro_steps`; a rank with fewer repeats one with zero weight).
- Checkpoints under FSDP are written sharded with `torch.distributed.checkpoint` (sharded_checkpoint.py):
  each rank writes its shard of the weights and AdamW state, nothing is gathered, and loading reshards, so
  they resume under any number of processes, sharded or not. Only the exported model (`final/`) is gathered
  whole, once, when the run ends. DeepSpeed writes its own partitioned files (one per rank) and, under
  ZeRO-3, rank 0 gathers the weights for `policy/`; it resumes with the same stage and processes.
Generation needs the whole model on each rank for a moment; what sharding saves is the training state
(gradients, optimizer moments, and under FULL_SHARD / ZeRO-3 the parameters between uses).
A model trained beside the policy (PPO's critic, PRIME's implicit PRM) goes through the same functions:
`FSDP.shard` with the policy's settings, or a `DeepSpeed` object of its own (algos/auxiliary.py).
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist

from rewardlab.errors import UserError


def launched_with_fsdp() -> bool:
    """Whether `accelerate launch` was given an FSDP config (it exports ACCELERATE_USE_FSDP=true)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def _units(model: torch.nn.Module) -> list[Any]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return bool(_units(model))


@dataclass
class FSDP:
    """The FSDP settings of this launch (from accelerate's plugin) and what they do to a model."""

    reshard_after_forward: bool = True
    offload_policy: Any = None  # torch's OffloadPolicy (none) or CPUOffloadPolicy (fsdp_offload_params: true)
    plugin: Any = None  # accelerate's FullyShardedDataParallelPlugin: the auto-wrap policy

    @property
    def name(self) -> str:
        """How the launch shards, in FSDP1's words: full_shard (ZeRO-3) or shard_grad_op (ZeRO-2)."""
        return "fsdp_full_shard" if self.reshard_after_forward else "fsdp_shard_grad_op"

    @classmethod
    def from_launch(cls) -> "FSDP | None":
        """The launch's FSDP settings, or None when it is not an FSDP launch."""
        if not launched_with_fsdp():
            return None
        from accelerate.utils import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin()
        if plugin.fsdp_version != 2:
            raise UserError(f"the accelerate config sets fsdp_version: {plugin.fsdp_version}; rewardlab shards with "
                            f"FSDP2 (torch fully_shard): set fsdp_version: 2 (conf/accelerate/fsdp.yaml)")
        if plugin.cpu_ram_efficient_loading:
            raise UserError("the accelerate config sets fsdp_cpu_ram_efficient_loading: true, which loads the weights "
                            "on rank 0 only; rewardlab shards weights every rank has loaded: set it to false")
        reshard = plugin.reshard_after_forward
        if not isinstance(reshard, bool):  # an FSDP1 sharding strategy name
            reshard = str(reshard).upper().endswith("FULL_SHARD")
        return cls(reshard_after_forward=reshard, offload_policy=plugin.cpu_offload, plugin=plugin)

    def shard(self, model: torch.nn.Module, units: tuple[torch.nn.Module, ...] = ()) -> torch.nn.Module:
        """Shard `model` in place (every rank holds the same full weights before): one unit per
        transformer block, and per module in `units` (a float32 value head beside a bfloat16 backbone:
        FSDP needs one dtype per unit), the root last. The root keeps its parameters gathered after
        forward, as accelerate and torchtitan do: backward needs them first."""
        from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
        from torch.distributed.fsdp import OffloadPolicy, fully_shard

        offload = self.offload_policy or OffloadPolicy()
        wrap = fsdp2_prepare_auto_wrap_policy(self.plugin, model) if self.plugin is not None else None
        if wrap is None and self.plugin is None:
            names = set(getattr(model, "_no_split_modules", None) or [])
            wrap = lambda module: type(module).__name__ in names  # noqa: E731
        if wrap is not None:
            for module in [m for m in model.modules() if m is not model]:
                if wrap(module):
                    fully_shard(module, reshard_after_forward=self.reshard_after_forward, offload_policy=offload)
        for module in units:
            fully_shard(module, reshard_after_forward=self.reshard_after_forward, offload_policy=offload)
        fully_shard(model, reshard_after_forward=False, offload_policy=offload)
        return model

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        """Every FSDP unit of `model` gathered and kept whole until the block ends (a collective: every
        rank enters and leaves together); inside, forward passes need no communication."""
        units = _units(model)
        if not units:
            yield
            return
        for unit in units:
            unit.unshard()
        model.set_reshard_after_forward(False)
        try:
            yield
        finally:
            model.set_reshard_after_forward(self.reshard_after_forward)
            model.set_reshard_after_forward(False, recurse=False)
            for unit in units:
                unit.reshard()


def launched_with_deepspeed() -> bool:
    """Whether `accelerate launch` was given a DeepSpeed config (it exports ACCELERATE_USE_DEEPSPEED=true)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


@dataclass
class DeepSpeed:
    """DeepSpeed ZeRO stage 2 or 3 through accelerate (its DeepSpeedPlugin reads the launch's
    `deepspeed_config`). DeepSpeed owns the optimizer: the engine is built by `accelerator.prepare` when the
    policy-gradient algorithm builds its optimizer (as the run starts), and backward and step go through it.
    Stage 3 partitions the parameters: decoding and no-grad passes gather them (TRL's
    `unwrap_model_for_generation`, which also lifts ZeRO-3's hooks so ranks decode independently).
    The optimizer state stays partitioned in checkpoints (DeepSpeed's own files, one per rank), so a
    DeepSpeed run resumes with the number of processes that wrote it."""

    accelerator: Any
    stage: int
    engine: Any = None

    @property
    def name(self) -> str:
        return f"deepspeed_zero{self.stage}"

    @classmethod
    def from_launch(cls) -> "DeepSpeed | None":
        if not launched_with_deepspeed():
            return None
        from accelerate import Accelerator

        accelerator = Accelerator()
        plugin = accelerator.state.deepspeed_plugin
        stage = int(plugin.zero_stage)
        if stage not in (2, 3):
            raise UserError(f"the accelerate config sets zero_stage: {stage}; rewardlab trains with ZeRO stage 2 or 3 "
                            f"(conf/accelerate/deepspeed_zero2.yaml, deepspeed_zero3.yaml)")
        if plugin.zero3_init_flag:
            raise UserError("the accelerate config sets zero3_init_flag: true; rewardlab loads every model whole and "
                            "DeepSpeed partitions the policy at the first update: set zero3_init_flag: false")
        _models_load_whole()
        return cls(accelerator=accelerator, stage=stage)

    def shard(self, model: torch.nn.Module) -> torch.nn.Module:
        """Nothing here: DeepSpeed partitions the policy when its optimizer exists (`prepare`); other
        models (the KL reference) stay whole."""
        return model

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, micro_batch_size: int,
                max_grad_norm: float) -> Any:
        """The DeepSpeed engine around `model` and `optimizer`; returns the optimizer DeepSpeed wraps. One
        engine per object: a model trained beside the policy gets its own (algos/auxiliary.py).
        The update calls backward once per micro-batch and step once per optimizer step, so accumulation
        is ours (boundaries set by hand) and clipping is DeepSpeed's (`algo.max_grad_norm`)."""
        config = self.accelerator.state.deepspeed_plugin.deepspeed_config
        config["train_micro_batch_size_per_gpu"] = micro_batch_size
        config["gradient_accumulation_steps"] = 1
        # set, not left to accelerate: a second engine (a critic, PRIME's PRM) may take other micro-batches
        config["train_batch_size"] = micro_batch_size * self.accelerator.num_processes
        config["gradient_clipping"] = float(max_grad_norm)
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True
        self.engine, wrapped = self.accelerator.prepare(model, optimizer)
        _models_load_whole()
        return wrapped

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        self.engine.set_gradient_accumulation_boundary(last)
        self.engine.backward(loss, scale_wrt_gas=False)  # the loss is already divided over the micro-batches

    def step(self) -> float:
        """The optimizer step (after DeepSpeed clips); the gradient norm before clipping."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @contextlib.contextmanager
    def full_weights(self, model: torch.nn.Module) -> Iterator[None]:
        if self.stage != 3 or self.engine is None or model is not self.engine.module:
            yield
            return
        from trl.models.utils import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine, self.accelerator):
            yield

    def save(self, directory: Any) -> None:
        """DeepSpeed's checkpoint of the engine (every rank writes its optimizer partition; a collective)."""
        self.engine.save_checkpoint(str(directory), tag="zero", save_latest=False, exclude_frozen_parameters=True)

    def load(self, directory: str) -> None:
        try:
            self.engine.load_checkpoint(directory, tag="zero", load_module_strict=False, load_optimizer_states=True,
                                        load_lr_scheduler_states=False)
        except (AssertionError, RuntimeError, ValueError) as exc:
            raise UserError(f"DeepSpeed could not load its optimizer state from {directory} ({str(exc).splitlines()[0]}); "
                            f"resume with the number of processes and ZeRO stage that wrote it") from None


def _models_load_whole() -> None:
    """accelerate registers its DeepSpeed config with transformers, after which from_pretrained would load
    ZeRO-3-partitioned models that nothing gathers (the KL reference, reward models); drop it."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()


def from_launch() -> "FSDP | DeepSpeed | None":
    """How this launch shards the training state: FSDP, DeepSpeed ZeRO, or not at all."""
    return FSDP.from_launch() or DeepSpeed.from_launch()


def local_parameters(model: torch.nn.Module) -> int:
    """The parameter elements this rank holds: all of them, or its shards under FSDP or ZeRO-3."""
    total = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            total += p.ds_tensor.numel()
        else:
            total += (p.to_local() if hasattr(p, "to_local") else p).numel()
    return total


def check_generator(generator: Any) -> None:
    """Sharded runs decode with the transformers backend, whose model is the sharded policy itself."""
    from rewardlab.generation.hf import HFGenerator

    if not isinstance(generator, HFGenerator):
        raise UserError(f"{type(generator).__name__} does not take sharded weights; under an FSDP or DeepSpeed "
                        f"launch use generation=hf, or train without that config")


# ---- state dicts that work the same for sharded and plain models ---------------------------------


def _options(**kwargs: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(**kwargs)


def full_model_state(model: torch.nn.Module, sharding: Any = None) -> dict[str, torch.Tensor] | None:
    """The whole state dict of a sharded model on rank 0 (CPU), None on the other ranks (a collective);
    None for a plain model, whose own save_pretrained reads it."""
    if isinstance(sharding, DeepSpeed) and sharding.engine is not None and sharding.stage == 3:
        state = sharding.accelerator.get_state_dict(sharding.engine)  # gathered to rank 0
    elif is_sharded(model):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(model, options=_options(full_state_dict=True, cpu_offload=True))
    else:
        return None
    if torch_dist.get_rank() != 0:
        return None
    first: dict[int, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):  # tied weights (embeddings / lm_head)
        if id(p) in first and name in state and first[id(p)] in state:
            state[name] = state[first[id(p)]]  # one tensor again, so save_pretrained writes it once
        first.setdefault(id(p), name)
    return state


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: str | None = None
                    ) -> dict[str, Any] | None:
    """The optimizer's whole state keyed by parameter name, so a sharded or plain model can resume it;
    under FSDP only its param_groups and the `folder` of the checkpoint directory where its tensors are
    written, each rank its shards (sharded_checkpoint.py; the policy's: `sharded`). None before the first
    step: torch would fill an empty state by stepping with zero gradients, which counts a step."""
    if not optimizer.state:
        return None
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if is_sharded(model):
        from rewardlab import sharded_checkpoint

        groups = get_optimizer_state_dict(model, optimizer, options=_options())["param_groups"]
        return {"dcp": folder or sharded_checkpoint.FOLDER, "param_groups": groups}
    return get_optimizer_state_dict(model, optimizer, options=_options(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load what `optimizer_state` wrote (every rank passes the whole state, or under FSDP the path of the
    sharded tensors), or a plain `optimizer.state_dict()` from checkpoints before names were used."""
    if "dcp" in state:
        from rewardlab import sharded_checkpoint

        sharded_checkpoint.load_optimizer(model, optimizer, state["dcp"], state["param_groups"])
        return
    if all(isinstance(k, int) for k in state.get("state", {})) and all(
            isinstance(p, int) for g in state.get("param_groups", []) for p in g["params"]):
        if is_sharded(model):
            raise UserError("this checkpoint's optimizer state predates sharded training; continue it without "
                            "the FSDP config, or start a new run")
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    optimizer.zero_grad(set_to_none=True)  # with gradients present torch skips building the state it fills
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=_options(full_state_dict=True))


def micro_steps(count: int, sharded: bool) -> int:
    """Micro-batches this rank runs in an optimizer step: its own `count`, or under FSDP the largest
    count over the ranks (each forward/backward all-gathers and reduce-scatters with every rank)."""
    if not sharded or not torch_dist.is_initialized():
        return count
    counts: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(counts, count)  # pickled: works over gloo and NCCL alike
    return max(counts)
