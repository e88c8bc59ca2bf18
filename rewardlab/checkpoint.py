"""Checkpoints of the whole loop state at the end of an iteration (every `run.checkpoint_every` iterations,
every `run.checkpoint_minutes`, after the last one, and when a signal stops the run), and resuming from them.

Layout under the run directory:
    checkpoints/iter_0003/policy/   `save_pretrained` of the policy (only the LoRA adapters for a PEFT
                                    model) and its tokenizer, so `policy.path=` can load it too
    checkpoints/iter_0003/state.pt  iteration, the algorithm's `state_dict()` (optimizer, scheduler, its
                                    torch.Generator, what it carries across iterations), the prompt
                                    sampler's cursor, the python/numpy/torch(/cuda) RNG states of
                                    every rank (rank 0 writes; ranks hold the same weights)
    checkpoints/iter_0003/sharded/  under FSDP instead of the weights in policy/ (which keeps the
                                    tokenizer): each rank's shard of the weights and AdamW state,
                                    written by that rank with torch.distributed.checkpoint and
                                    resharded on loading (sharded_checkpoint.py); `final/` gets the
                                    whole weights, gathered once when the run ends
    checkpoints/iter_0003/critic_sharded/, prime_sharded/ (FSDP), critic_deepspeed/, prime_deepspeed/
                                    (DeepSpeed): a model trained beside the policy, written the
                                    way the policy is under that launch (algos/auxiliary.py)
    checkpoints/latest              a symlink to the newest complete checkpoint's `policy/` (so
                                    `from_pretrained("<run dir>/checkpoints/latest")` loads it, except
                                    under FSDP: `rewardlab export` reads sharded/ whole), written last
    final/                          after a run completes: a copy of the last checkpoint's `policy/`
                                    (under FSDP the whole weights, gathered once)
A checkpoint is built in a temporary directory, synced, renamed into place, and only then named by
`latest` (a new symlink renamed over the old one), so a crash or a full disk at any moment leaves the
previous checkpoint intact. The weights go through transformers/peft `save_pretrained`; the rest of the loop
state (sampler, algorithm carry-over, RNGs) is ours, so the container around it is written here. `state.pt`
holds only tensors and plain data (an algorithm's `state_dict()` too) and is read with `weights_only=True`, so
resuming a run directory from elsewhere runs none of its code (which run to continue: resume.py).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
import random
import re
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from rewardlab import distributed, sharded_checkpoint
from rewardlab.distributed import Dist
from rewardlab.errors import UserError
from rewardlab.sharding import full_model_state, is_sharded

FORMAT = 1
STATE = "state.pt"
_NAME = re.compile(r"^iter_(\d+)$")


def rng_state() -> dict[str, Any]:
    """Every global RNG the loop draws from (the algorithm's own generator is in its state_dict)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


#: What `state.pt` may hold besides tensors and plain containers: numpy arrays (numpy's RNG state). Loading
#: with `weights_only=True` and only these allowed means a run directory from elsewhere cannot run code.
SAFE_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load_state(path: Path) -> dict[str, Any]:
    """`state.pt` read as data only (tensors, numbers, strings, containers, numpy arrays): a pickled
    object that would run code on loading is refused with a UserError, and its code never runs."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = _GLOBAL.search(str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"{path} holds a pickled object that could run code{what}; rewardlab reads only tensors "
                        f"and plain data from a checkpoint, so it will not resume from this file") from None


#: The classes DeepSpeed pickles into its ZeRO optimizer files, which it loads itself with `weights_only=False`.
DEEPSPEED_GLOBALS = {"deepspeed.utils.tensor_fragment.fragment_address", "deepspeed.runtime.zero.config.ZeroStageEnum",
                     "deepspeed.runtime.fp16.loss_scaler.LossScaler"}


def check_deepspeed_files(folder: Path) -> None:
    """Refuse DeepSpeed's files if their pickles name anything but tensors and DeepSpeed's known classes: they
    are read (without running them) before DeepSpeed unpickles them, so a hostile file runs no code."""
    for path in sorted(Path(folder).rglob("*.pt")):
        unknown = set(torch.serialization.get_unsafe_globals_in_checkpoint(path)) - DEEPSPEED_GLOBALS
        if unknown:
            raise UserError(f"{path} holds pickled objects that could run code ({', '.join(sorted(unknown))}); "
                            f"rewardlab will not hand it to DeepSpeed")


def locate_files(state: Any, checkpoint: Path) -> None:
    """Make the folders an algorithm's state names beside state.pt absolute, in place: `dcp` (tensors written
    with torch.distributed.checkpoint: the policy's optimizer in sharded/, a critic's or PRM's shards) and
    `deepspeed` (DeepSpeed's files, checked before DeepSpeed unpickles them), at any depth of the state."""
    if isinstance(state, dict):
        for key in ("dcp", "deepspeed"):
            if isinstance(state.get(key), str):
                state[key] = str(Path(checkpoint) / state[key])
                if key == "deepspeed":
                    check_deepspeed_files(Path(state[key]))
                else:
                    sharded_checkpoint.check_files(Path(state[key]))
        for value in state.values():
            locate_files(value, checkpoint)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence transformers' per-save "Writing model shards" bar: a checkpoint every iteration is routine."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


def is_adapter_model(model: torch.nn.Module) -> bool:
    """True for a PEFT model (or a transformers model with adapters): save_pretrained writes only adapters."""
    return getattr(model, "peft_config", None) is not None


def load_weights(policy, path: Path) -> None:
    """Load saved weights (full model or LoRA adapters) into the live policy, in place."""
    adapters = (path / "adapter_config.json").exists()
    if adapters != is_adapter_model(policy.model):
        saved, live = ("LoRA adapters", "a full model") if adapters else ("full weights", "a LoRA model")
        raise UserError(f"checkpoint {path} holds {saved} but the policy is {live}; resume with the run's "
                        f"own config (`rewardlab train resume=<run_dir>`)")
    if adapters:
        from peft import load_peft_weights, set_peft_model_state_dict

        result = set_peft_model_state_dict(policy.model, load_peft_weights(str(path), device=str(policy.device)))
        if result.unexpected_keys:
            raise UserError(f"checkpoint {path}: adapter weights {result.unexpected_keys[:3]} do not fit the policy")
    else:
        from rewardlab.policy import load_model

        policy.model.load_state_dict(load_model(str(path), policy.model.dtype).state_dict())


def _fsync_tree(root: Path) -> None:
    """Flush every file under `root` and the directories themselves, so a rename publishes whole files."""
    for folder, _, files in os.walk(root):
        for name in [*files, "."]:
            fd = os.open(os.path.join(folder, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _disk_full(exc: BaseException, where: Path) -> bool:
    """Whether a failed write ran out of space; torch and safetensors do not always keep the errno."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left" in text or "os error 28" in text or "Disk quota" in text:
        return True
    return shutil.disk_usage(where).free < 1 << 20


def _point_latest(root: Path, name: str) -> None:
    """Make `root/latest` a relative symlink to `name/policy`, replacing the old one atomically."""
    tmp = root / ".latest.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    os.symlink(os.path.join(name, "policy"), tmp)
    os.replace(tmp, root / "latest")


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link a file (no second copy of the weights on disk), or copy it where links are not possible."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


class Cadence:
    """When an iteration is checkpointed: every `every` iterations (0: not by count), or once `minutes` have
    passed since the last checkpoint (0: not by time), and always the last iteration. A run resumes from its
    last checkpoint, so what it loses to a SIGKILL or a crash is the iterations since then (a SIGTERM or
    SIGINT checkpoints the iteration in progress instead)."""

    def __init__(self, every: int, minutes: float, last: int) -> None:
        if every < 0 or minutes < 0:
            raise UserError(f"run.checkpoint_every={every}, run.checkpoint_minutes={minutes}: give 0 (off) or a "
                            f"positive number")
        self.every, self.seconds, self.last = every, minutes * 60, last
        self.since = time.monotonic()

    def due(self, iteration: int) -> bool:
        if iteration == self.last or (self.every and iteration % self.every == 0):
            return True
        return self.seconds > 0 and time.monotonic() - self.since >= self.seconds

    def saved(self) -> None:
        self.since = time.monotonic()


def drop_rollouts_after(run_dir: Path, iteration: int) -> None:
    """Remove rollout files of iterations after the checkpoint a run resumes from: they are recomputed."""
    for path in (Path(run_dir) / "rollouts").glob("iter_*.parquet"):
        if (found := re.match(r"iter_(\d+)\.parquet$", path.name)) and int(found.group(1)) > iteration:
            path.unlink()


class Checkpointer:
    """Saves and restores the loop state under `<run_dir>/checkpoints`, keeping the newest `keep`."""

    def __init__(self, run_dir: Path, keep: int = 2, dist: Dist | None = None) -> None:
        if keep < 1:
            raise UserError(f"run.keep_checkpoints={keep}; keep at least 1 so the run can resume")
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / "checkpoints"
        self.keep = keep
        self.dist = dist or Dist()

    def _all(self) -> list[tuple[int, Path]]:
        """Renamed-into-place checkpoint directories, oldest first."""
        if not self.root.exists():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir() if (m := _NAME.match(p.name))]
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint (named by `latest`), or None before the first one."""
        marker = self.root / "latest"
        if marker.is_symlink():
            path = self.root / Path(os.readlink(marker)).parent
        elif marker.is_dir():  # a copy of the run that followed the link: the newest complete checkpoint
            complete = [p for _, p in self._all() if (p / STATE).exists()]
            path = complete[-1] if complete else marker
        elif marker.exists():  # written by an earlier rewardlab: the directory's name as text
            path = self.root / marker.read_text().strip()
        else:
            return None
        if not (path / STATE).exists():
            raise UserError(f"{marker} names {path}, which is missing or incomplete; point {marker} at an "
                            f"older checkpoint directory there, or start a new run")
        return path

    def save(self, iteration: int, policy, algo, sampler) -> Path:
        """Write the state after `iteration` atomically, mark it latest, and drop the oldest beyond `keep`.
        Every rank calls it (its RNG states are gathered; under FSDP and DeepSpeed each rank writes its
        shards); rank 0 writes the rest."""
        final = self.root / f"iter_{iteration:04d}"
        rngs = distributed.gather_to_main(self.dist, rng_state())
        sharded = getattr(policy, "sharding", None)
        fsdp = is_sharded(policy.model)  # each rank writes its shards: nothing is gathered
        # None when FSDP-sharded or plain (save_pretrained reads the model); ZeRO-3 gathers to rank 0
        whole = None if fsdp else full_model_state(policy.model, sharded)
        algo_state = algo.state_dict()
        tmp = self.root / f".tmp-{final.name}"
        deepspeed = getattr(sharded, "engine", None) is not None  # DeepSpeed: every rank writes its part
        if self.dist.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            for leftover in self.root.glob(".tmp-*"):  # a save interrupted by a kill
                shutil.rmtree(leftover, ignore_errors=True)
            tmp.mkdir()
        if fsdp or deepspeed:
            torch.distributed.barrier()
        if fsdp:
            sharded_checkpoint.save(tmp / sharded_checkpoint.FOLDER, policy.model, getattr(algo, "optimizer", None))
        elif deepspeed:
            sharded.save(tmp / "deepspeed")
        if hasattr(algo, "save_files"):  # models trained beside the policy (critic, PRM): their shards, if sharded
            algo.save_files(tmp)
        if not self.dist.is_main:
            return final
        try:
            if not fsdp:
                with _no_progress_bars():
                    policy.model.save_pretrained(tmp / "policy", state_dict=whole)
            policy.tokenizer.save_pretrained(tmp / "policy")
            torch.save({"format": FORMAT, "iteration": iteration, "algo": algo_state,
                        "sampler": sampler.state_dict(), "rng": rngs, "policy_source": policy.source},
                       tmp / STATE)
            _fsync_tree(tmp)
            if final.exists():  # written by an attempt that died before `latest` named it
                shutil.rmtree(final)
            os.rename(tmp, final)
            _point_latest(self.root, final.name)
        except Exception as exc:
            full = _disk_full(exc, self.root)
            shutil.rmtree(tmp, ignore_errors=True)
            if not full:
                raise
            previous = self.latest()
            kept = f"the previous checkpoint {previous} is intact" if previous else "no checkpoint was kept"
            raise UserError(f"no space left on the device writing checkpoint {final} ({kept}); free space, "
                            f"then resume with `rewardlab train resume={self.run_dir}`") from exc
        self._prune(iteration)
        return final

    def write_final(self, policy) -> Path | None:
        """`<run dir>/final/`: the newest checkpoint's model directory (weights or LoRA adapters, and the
        tokenizer), a plain `from_pretrained` directory that outlives checkpoint rotation. Every rank calls
        it; rank 0 writes. A sharded (FSDP) checkpoint has no whole weights: the live policy, which is the
        newest checkpoint's, is gathered to rank 0 once here, the only whole-state gather of an FSDP run.
        Whether to gather is decided by the live model, which every rank shares, not by the files, which
        rank 0 may still be writing while another rank gets here."""
        fsdp = is_sharded(policy.model)
        whole = full_model_state(policy.model, getattr(policy, "sharding", None)) if fsdp else None  # a collective
        latest = self.latest() if self.dist.is_main else None
        if latest is None:
            return None
        final, tmp = self.run_dir / "final", self.run_dir / ".tmp-final"
        shutil.rmtree(tmp, ignore_errors=True)
        if fsdp or (latest / sharded_checkpoint.FOLDER).is_dir():  # plain here: one process resumed a finished run
            with _no_progress_bars():
                policy.model.save_pretrained(tmp, state_dict=whole)
            policy.tokenizer.save_pretrained(tmp)
        else:
            shutil.copytree(latest / "policy", tmp, copy_function=_link_or_copy)
        _fsync_tree(tmp)
        if final.exists():  # an extended run replaces its earlier final model
            old = self.run_dir / ".old-final"
            shutil.rmtree(old, ignore_errors=True)
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        return final

    def _prune(self, latest: int) -> None:
        keep = [p for it, p in self._all() if it <= latest][-self.keep :]
        for _, path in self._all():
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)

    def restore(self, policy, algo, sampler) -> int | None:
        """Load the latest checkpoint into the live components; the iteration it completed, or None."""
        path = self.latest()
        if path is None:
            return None
        state = load_state(path / STATE)
        if state.get("format") != FORMAT:
            raise UserError(f"checkpoint {path} has format {state.get('format')}, this rewardlab reads {FORMAT}")
        shards = path / sharded_checkpoint.FOLDER
        if shards.is_dir():  # FSDP's: read (resharded) into the whole model, sharded after the restore
            sharded_checkpoint.check_files(shards)
            sharded_checkpoint.load_weights(policy.model, shards)
        else:
            with _no_progress_bars():
                load_weights(policy, path / "policy")
        algo_state = state["algo"]
        locate_files(algo_state, path)
        algo.load_state_dict(algo_state, policy)
        sampler.load_state_dict(state["sampler"])
        if len(state["rng"]) == self.dist.world_size:
            set_rng_state(state["rng"][self.dist.rank])
        else:
            warnings.warn(f"checkpoint {path} was written by {len(state['rng'])} processes, this run has "
                          f"{self.dist.world_size}: sampling restarts from the seed, so the metrics will not "
                          f"match an uninterrupted run exactly")
        if state["policy_source"] != policy.source:
            warnings.warn(f"the run started from {state['policy_source']} but the policy now loads from "
                          f"{policy.source}; a KL reference or restart uses the latter")
        return int(state["iteration"])
