"""Data-parallel training across processes started by `torchrun` or `accelerate launch`.

accelerate's PartialState reads the launcher's environment, picks the backend (gloo on CPU, NCCL on
GPUs) and the process's device; torch's DistributedDataParallel averages the gradients (`data_parallel`).
What no library does for a loop that owns its own generation is here: sharding prompts by rank with every
group kept whole on one rank, reducing a metrics row over ranks, and gathering what rank 0 alone writes.
With one process every helper is a no-op, so run.py reads the same either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as torch_dist

from rewardlab.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Dist:
    """This process's place in the job: rank, world size and the device it trains on."""

    rank: int = 0
    world_size: int = 1
    device: str | None = None  # set under a multi-process launch: cpu or cuda:<local rank>

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def launched_world_size() -> int:
    """The number of processes the launcher started (WORLD_SIZE), 1 when run directly. A submitit job
    with several tasks (hydra.launcher.tasks_per_node=N) gets torch's env:// variables from submitit."""
    if "WORLD_SIZE" not in os.environ and os.environ.get("SUBMITIT_EXECUTOR"):
        import submitit

        if submitit.JobEnvironment().num_tasks > 1:
            # keep every GPU visible: accelerate places each rank on cuda:<local rank>
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup() -> Dist:
    """Join the process group the launcher describes (idempotent); a single process gets Dist()."""
    if launched_world_size() <= 1:
        return Dist()
    from accelerate import PartialState

    from rewardlab.sharding import launched_with_deepspeed

    if launched_with_deepspeed():
        # accelerate chooses DeepSpeed only with cpu=False; without CUDA it then picks no backend and
        # counts one process, unless told gloo (DeepSpeed runs ZeRO on CPU over gloo)
        state = PartialState(**({} if torch.cuda.is_available() else {"backend": "gloo"}))
    else:
        # Without cpu=True PartialState ignores WORLD_SIZE on a machine without CUDA and stays single-process.
        state = PartialState(cpu=not torch.cuda.is_available())
    return Dist(rank=state.process_index, world_size=state.num_processes, device=str(state.device))


def device_for(dist: Dist, requested: str) -> str:
    """The device a rank trains on: the launcher's (one GPU per rank) when distributed, else `requested`."""
    if not dist.active:
        return requested
    if requested not in ("auto", dist.device) and requested.split(":")[0] != dist.device.split(":")[0]:
        raise UserError(f"run.device={requested} but this {dist.world_size}-process launch trains on "
                        f"{dist.device}; leave run.device=auto (hide GPUs with CUDA_VISIBLE_DEVICES= for CPU)")
    return dist.device


def check_sizes(dist: Dist, prompts_per_iteration: int, eval_size: int) -> None:
    """Every rank must get the same number of prompts (so ranks take the same number of optimizer
    steps) and at least one evaluation example."""
    if prompts_per_iteration % dist.world_size:
        raise UserError(f"run.prompts_per_iteration={prompts_per_iteration} is not divisible by the "
                        f"{dist.world_size} processes; choose a multiple of {dist.world_size}")
    if eval_size < dist.world_size:
        raise UserError(f"run.eval_size={eval_size} leaves some of the {dist.world_size} processes nothing "
                        f"to evaluate; use at least {dist.world_size}")


def check_algorithm(dist: Dist, algo: Any) -> None:
    """Data parallelism is wired into the native policy-gradient update (its model trains under DDP);
    the TRL-backed algorithms shard and synchronise on their own terms, so they run in one process."""
    from rewardlab.algos.pg import PolicyGradient

    if dist.active and not isinstance(algo, PolicyGradient):
        raise UserError(f"{type(algo).__name__} does not support {dist.world_size}-process data-parallel "
                        f"training here; use a policy-gradient algo (algo=grpo) or run it in one process")


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """This rank's contiguous share of `items` (sizes differ by at most one). Sharding prompts before
    sampling `n` completions each keeps every group on one rank, so group advantages stay exact."""
    base, extra = divmod(len(items), world_size)
    start = rank * base + min(rank, extra)
    return list(items[start : start + base + (rank < extra)])


def combine(rows: Sequence[dict[str, Any]], weights: Sequence[float]) -> dict[str, Any]:
    """One metrics row from every rank's row: counts summed, `*/max`, `*/min` and stage times
    (`time/*`, the slowest rank) by max/min, everything else a weighted mean. Pure, for testing."""
    out: dict[str, Any] = {}
    for key in dict.fromkeys(k for row in rows for k in row):
        pairs = [(row[key], w) for row, w in zip(rows, weights) if key in row]
        values = [v for v, _ in pairs]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = values[0]
        elif key in ("iteration", "world_size"):
            out[key] = values[0]
        elif key == "rollouts":
            out[key] = float(sum(values))
        elif key.endswith("/max") or key.startswith("time/"):
            out[key] = max(values)
        elif key.endswith("/min"):
            out[key] = min(values)
        else:
            total = sum(w for _, w in pairs)
            out[key] = sum(v * w for v, w in pairs) / total if total else float("nan")
    return out


def reduce_metrics(dist: Dist, row: dict[str, Any], weight: float = 1.0) -> dict[str, Any]:
    """The row every rank logs: `combine` over all ranks' rows (identical on every rank)."""
    if not dist.active:
        return row
    gathered: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(gathered, (row, weight))
    return combine([r for r, _ in gathered], [w for _, w in gathered])


def should_update(dist: Dist, algo: Any, rows: int) -> bool:
    """Whether every rank has rollouts left to update on (all ranks skip together, or none does).
    Ranks whose filters kept different numbers of rows still take equal numbers of optimizer steps
    when each update is one step per pass (algo.minibatch_size=0); with minibatches they would not,
    and the gradient all-reduce would wait forever, so that is refused."""
    if not dist.active:
        return rows > 0
    counts: list[Any] = [None] * dist.world_size
    torch_dist.all_gather_object(counts, rows)
    if min(counts) == 0:
        return False
    if len(set(counts)) > 1 and getattr(getattr(algo, "cfg", None), "minibatch_size", 0) > 0:
        raise UserError(f"filters left different numbers of rollouts on the ranks ({counts}), and "
                        f"algo.minibatch_size>0 would give them different numbers of optimizer steps; "
                        f"use algo.minibatch_size=0 with several processes")
    return True


def any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank, the same answer on every rank (so all skip a step together)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return flag
    flags: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(flags, bool(flag))
    return any(flags)


def data_parallel(model: torch.nn.Module) -> torch.nn.Module:
    """`model` in torch's DistributedDataParallel when several processes each hold a whole replica (no
    FSDP or DeepSpeed): its backward averages gradients over ranks in buckets while later layers still
    run, so every rank applies the same update and clipping sees the global norm. Only parameters that
    require grad take part (LoRA: the adapters). Gradients live in the buckets (no second copy), and
    buffers are not broadcast on each forward, so ranks may run different numbers of micro-batches
    (each all-reduces once, on its last: see `no_sync`). One process: the model itself."""
    if not (torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1):
        return model
    from torch.nn.parallel import DistributedDataParallel

    device = next(model.parameters()).device
    # torch 2.13 renamed broadcast_buffers (older releases know only that name)
    renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    buffers = "forward_sync_buffers" if renamed else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   gradient_as_bucket_view=True, **{buffers: False})


def no_sync(model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """Around a micro-batch's forward and backward: DDP accumulates locally unless it is the optimizer
    step's `last` micro-batch, whose backward all-reduces the summed gradients once."""
    from torch.nn.parallel import DistributedDataParallel

    if last or not isinstance(model, DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


@torch.no_grad()
def broadcast_parameters(dist: Dist, model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters, as DistributedDataParallel does when it wraps a model: ranks
    seed their samplers differently, so anything initialised at random when the policy is built (LoRA
    adapters) would otherwise start different on each rank."""
    if not dist.active:
        return
    for p in model.parameters():
        torch_dist.broadcast(p.data, src=0)


def gather_to_main(dist: Dist, obj: T) -> list[T] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere); [obj] with one process."""
    if not dist.active:
        return [obj]
    out: list[Any] | None = [None] * dist.world_size if dist.is_main else None
    torch_dist.gather_object(obj, out, dst=0)
    return out


def param_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter's bytes in name order: equal digests mean equal weights. A sharded
    parameter (FSDP, or ZeRO-3 outside a gathered block) is gathered whole first, so every rank must call it."""
    digest = hashlib.sha256()
    named = sorted(model.named_parameters(), key=lambda item: item[0])
    partitioned = [p for _, p in named if getattr(getattr(p, "ds_status", None), "name", "") == "NOT_AVAILABLE"]
    with _gathered(partitioned):
        for name, p in named:
            whole = p.full_tensor() if hasattr(p, "full_tensor") else p
            digest.update(name.encode())
            # a copy: numpy() marks the storage it shares as not resizable, and FSDP frees gathered weights
            digest.update(whole.detach().to("cpu", copy=True).contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _gathered(params: list[torch.nn.Parameter]) -> contextlib.AbstractContextManager:
    """DeepSpeed ZeRO-3 parameters gathered whole for the block (read only); nothing for other parameters."""
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params)


def run_dir_overrides(args: list[str]) -> list[str]:
    """Under a multi-process launch, Hydra in every rank must use one run directory: unless the command
    line names it, rank 0's timestamp is broadcast and `hydra.run.dir` set from it (the same pattern as
    conf/train.yaml, runs/<date>/<time>)."""
    named = any(a.startswith(("hydra.run.dir=", "++hydra.run.dir=")) for a in args)
    if launched_world_size() <= 1 or named or "-m" in args or "--multirun" in args:
        return args
    setup()
    stamp = [time.time()]
    torch_dist.broadcast_object_list(stamp, src=0)
    when = time.localtime(math.floor(stamp[0]))
    return [*args, f"hydra.run.dir=runs/{time.strftime('%Y-%m-%d', when)}/{time.strftime('%H-%M-%S', when)}"]
