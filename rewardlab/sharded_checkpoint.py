"""FSDP checkpoints written sharded with `torch.distributed.checkpoint` (DCP): every rank writes its own
shard of the weights and of the AdamW state, and nothing is gathered to one rank. Loading reshards: DCP
reads whichever pieces of the saved shards the live tensors need, so a checkpoint written by 2 FSDP
processes resumes under FSDP with any number of processes, under torchrun (whole replicas) or in one
process.

Layout of a checkpoint directory's `sharded/` folder (DCP's file-system format):
    .metadata          which piece of which tensor is where (written by rank 0)
    __<rank>_0.distcp  one file per rank: its shards of the weights (`model.*`) and of the AdamW moments
                       and step counts (`optim.*`, absent before the first optimizer step)
The optimizer's param_groups (learning rate, betas, ...) are plain data and go to `state.pt`, so DCP holds
tensors only. DCP unpickles `.metadata` with `pickle.load` and any non-tensor entry with
`torch.load(weights_only=False)`; `check_files` reads the metadata first with an allow-list of DCP's own
classes and refuses non-tensor entries, so resuming a run directory from elsewhere runs none of its code.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as torch_dist

from rewardlab.errors import UserError

FOLDER = "sharded"  # beside state.pt in a checkpoint directory
_METADATA = ".metadata"
_ALLOWED = {"pathlib.PosixPath", "pathlib.PurePosixPath", "pathlib.WindowsPath", "pathlib.PureWindowsPath",
            "torch.Size", "torch.serialization._get_layout", "torch.distributed.checkpoint.filesystem._StorageInfo"}


def _options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # frozen parameters (a LoRA model's base) are the policy's source weights: not saved, not loaded
    return StateDictOptions(ignore_frozen_params=True)


def _single() -> bool:
    """No process group: DCP reads and writes everything in this process (one rank)."""
    return not (torch_dist.is_available() and torch_dist.is_initialized())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """DCP warns on every single-process save or load that it assumes one process, which here is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def save(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Write `model`'s trainable weights and `optimizer`'s tensors to `folder`, each rank its own shards (a
    collective under a process group). An optimizer that never stepped has no state and is left out:
    torch would fill it by stepping with zero gradients, which counts a step."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state: dict[str, Any] = {"model": get_model_state_dict(model, options=_options())}
    if optimizer is not None and optimizer.state:
        state["optim"] = get_optimizer_state_dict(model, optimizer, options=_options())["state"]
    with _quiet():
        dcp.save(state, checkpoint_id=str(folder), no_dist=_single())


def load_weights(model: torch.nn.Module, folder: Path) -> None:
    """Read the saved weights into `model` (whole or sharded), whatever the sharding that wrote them."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model, options=_options())}
    _load(dcp, state, folder)
    set_model_state_dict(model, state["model"], options=_options())


def load_optimizer(model: torch.nn.Module, optimizer: torch.optim.Optimizer, folder: Path,
                   param_groups: list[dict[str, Any]]) -> None:
    """Read the saved AdamW state into `optimizer` over `model`'s parameters as they are now (shards of
    any layout, or whole), with the `param_groups` state.pt kept."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    optimizer.zero_grad(set_to_none=True)  # with gradients present torch skips building the state to fill
    # torch builds the state tensors (a step at learning rate 0) for DCP to read into
    state = {"optim": get_optimizer_state_dict(model, optimizer, options=_options())["state"]}
    _load(dcp, state, folder)
    set_optimizer_state_dict(model, optimizer, optim_state_dict={"state": state["optim"], "param_groups": param_groups},
                             options=_options())


def _load(dcp: Any, state: dict[str, Any], folder: Path) -> None:
    try:
        with _quiet():
            dcp.load(state, checkpoint_id=str(folder), no_dist=_single())
    except Exception as exc:  # DCP wraps a rank's failure (a missing key, a shape that does not fit) in its own
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load the sharded checkpoint {folder} into this model ({first}); resume with the "
                        f"run's own config (`rewardlab train resume=<run_dir>`)") from None


class _Metadata(pickle.Unpickler):
    """Unpickles DCP's `.metadata` constructing only DCP's own metadata classes, torch sizes, dtypes and
    layouts, and paths: anything else (code a hostile file would run) is refused before it is built."""

    def find_class(self, module: str, name: str) -> Any:
        found = f"{module}.{name}"
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or found in _ALLOWED or module == "torch.distributed.checkpoint.metadata":
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"GLOBAL {found}")


def check_files(folder: Path) -> None:
    """Refuse a sharded checkpoint whose metadata would construct anything but DCP's own data, or that
    holds non-tensor entries (which DCP unpickles with code allowed): checked before DCP reads it."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(folder) / _METADATA
    try:
        with open(path, "rb") as stream:
            metadata = _Metadata(stream).load()
    except FileNotFoundError:
        raise UserError(f"{path} is missing: the sharded checkpoint is incomplete") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        raise UserError(f"{path} is not DCP metadata or holds a pickled object that could run code ({exc}); "
                        f"rewardlab will not resume from it") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise UserError(f"{path} is not DCP metadata; rewardlab will not resume from it")
    other = sorted(k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata))
    if other:
        raise UserError(f"{path} lists non-tensor entries ({', '.join(other[:3])}), which DCP would unpickle "
                        f"running their code; rewardlab will not resume from it")
