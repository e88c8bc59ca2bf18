"""A model an algorithm trains beside the policy (PPO's critic, PRIME's implicit PRM), trained the way the
launch trains the policy: under torchrun (or any several processes without a sharding config) a whole
replica per rank under DDP; under an FSDP config sharded with the policy's own FSDP settings
(`sharding.FSDP.shard`); under a DeepSpeed config through a DeepSpeed engine of its own, with the policy's
ZeRO stage (`sharding.DeepSpeed.prepare`); in one process the model itself.

The owner builds the model whole (every rank the same weights) and its optimizer's constructor, and then:
no-grad passes run under `full_weights()` (gathered once, so ranks run different numbers of passes without
waiting on each other), and each optimizer step is `train_step`, which runs the same number of
forward/backward passes on every rank when sharded (each pass gathers and reduces), as the policy's update does.

Checkpoints follow the policy's under the same launch. Plain and DDP: the whole weights and the optimizer
state (keyed by parameter name) in state.pt. FSDP: `<checkpoint>/<name>_sharded/` written with
torch.distributed.checkpoint, each rank its shards, resharded on loading (so it resumes under FSDP with any
number of processes, under torchrun or in one process). DeepSpeed: the engine's own files in
`<checkpoint>/<name>_deepspeed/` (resumed with the same stage and number of processes). state.pt names the
folder; checkpoint.py makes it absolute and checks its files before any library unpickles them.
This is the policy's path in pg.py and checkpoint.py, factored for a second model; the sharding itself is
sharding.py's.
"""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from rewardlab import sharded_checkpoint
from rewardlab.distributed import data_parallel, no_sync
from rewardlab.errors import UserError
from rewardlab.heap import release_free_heap
from rewardlab.sharding import DeepSpeed, FSDP, load_optimizer_state, micro_steps, optimizer_state


class Auxiliary:
    """`model` and its optimizer, trained under the launch's data parallelism or sharding (module docstring).
    `saved` is what `state_dict` returned (folder paths made absolute by the checkpointer), or None."""

    def __init__(self, name: str, model: torch.nn.Module,
                 make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer], sharding: Any,
                 micro_batch_size: int, max_grad_norm: float, saved: dict[str, Any] | None = None,
                 units: tuple[torch.nn.Module, ...] = ()) -> None:
        self.name, self.model, self.max_grad_norm = name, model, max_grad_norm
        self.fsdp = sharding if isinstance(sharding, FSDP) else None
        # one engine per model: the policy's DeepSpeed object keeps the policy's engine
        self.deepspeed = dataclasses.replace(sharding, engine=None) if isinstance(sharding, DeepSpeed) else None
        saved = saved or None
        if saved is not None and ("deepspeed" in saved) != (self.deepspeed is not None):
            raise UserError(f"this checkpoint's {name} state was written "
                            f"{'by DeepSpeed (one file per rank)' if 'deepspeed' in saved else 'without DeepSpeed'}; "
                            f"resume it with the launch that wrote it")
        if saved is not None and saved.get("model") is not None:
            model.load_state_dict(saved["model"])  # whole weights: loaded before they are split
        if self.fsdp is not None:
            self.fsdp.shard(model, units)
        self.optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad])
        if self.deepspeed is not None:
            self.optimizer = self.deepspeed.prepare(model, self.optimizer, micro_batch_size, max_grad_norm)
            self.trained: torch.nn.Module = self.deepspeed.engine
        else:  # FSDP reduces in its own backward; whole replicas on several ranks train under DDP
            self.trained = model if self.fsdp is not None else data_parallel(model)
        if saved is not None:
            self._restore(saved)

    @property
    def sharded(self) -> bool:
        return self.fsdp is not None or self.deepspeed is not None

    @contextlib.contextmanager
    def full_weights(self) -> Iterator[None]:
        """The whole weights on every rank until the block ends (a collective under FSDP and ZeRO-3)."""
        sharding = self.fsdp or self.deepspeed
        with sharding.full_weights(self.model) if sharding is not None else contextlib.nullcontext():
            yield

    def train_step(self, count: int, loss_of: Callable[[int, bool], torch.Tensor]) -> float:
        """One optimizer step over `count` micro-batches: `loss_of(i, real)` runs micro-batch i forward through
        `trained` and returns its loss, already divided over the step. Sharded, a rank with fewer micro-batches
        than another repeats its first with `real` False and weight 0 (the owner records nothing for it).
        Returns the gradient norm before clipping (`max_grad_norm`, 0: none)."""
        self.optimizer.zero_grad(set_to_none=not isinstance(self.trained, DistributedDataParallel))
        padded = micro_steps(count, self.sharded)
        for index in range(padded):
            last, real = index == padded - 1, index < count
            with no_sync(self.trained, last):  # DDP all-reduces on the last micro-batch only
                loss = loss_of(index if real else 0, real) * (1.0 if real else 0.0)
                if self.deepspeed is not None:
                    self.deepspeed.backward(loss, last)
                else:
                    loss.backward()
        if self.deepspeed is not None:  # DeepSpeed reduces, clips and steps
            return self.deepspeed.step()
        limit = self.max_grad_norm if self.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        if not self.optimizer.state:  # the first step allocates AdamW's state: on a trimmed heap (rewardlab/heap.py)
            release_free_heap()
        self.optimizer.step()
        if not isinstance(self.trained, DistributedDataParallel):  # free them until the next step (DDP's: buckets)
            self.optimizer.zero_grad(set_to_none=True)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor

    # ---- checkpoints ------------------------------------------------------------------------------
    @property
    def folder(self) -> str:
        """Where this model's files go in a checkpoint directory, when its launch writes files."""
        return f"{self.name}_{'deepspeed' if self.deepspeed is not None else 'sharded'}"

    def state_dict(self) -> dict[str, Any]:
        """What state.pt keeps (tensors and plain data only); every rank calls it."""
        if self.deepspeed is not None:
            return {"deepspeed": self.folder}
        if self.fsdp is not None:
            return {"dcp": self.folder, "optimizer": optimizer_state(self.model, self.optimizer, self.folder)}
        return {"model": {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items()},
                "optimizer": optimizer_state(self.model, self.optimizer)}

    def save_files(self, checkpoint: Path) -> None:
        """Every rank writes its part of the weights and optimizer state under `checkpoint` (a collective);
        nothing when state.pt holds them."""
        if self.deepspeed is not None:
            self.deepspeed.save(Path(checkpoint) / self.folder)
        elif self.fsdp is not None:
            sharded_checkpoint.save(Path(checkpoint) / self.folder, self.model, self.optimizer)

    def _restore(self, saved: dict[str, Any]) -> None:
        if "deepspeed" in saved:
            self.deepspeed.load(saved["deepspeed"])
            return
        if saved.get("dcp") is not None:  # FSDP's shards, read into this model however it is split now
            sharded_checkpoint.load_weights(self.model, Path(saved["dcp"]))
        if saved.get("optimizer") is not None:
            load_optimizer_state(self.model, self.optimizer, saved["optimizer"])
