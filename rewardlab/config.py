"""Structured-config schemas: defaults live here (or beside their component), so a misspelt key or a
wrong type fails at composition, before any work.

Component schemas are declared next to their implementation with `@schema(group, name)` and stored
under `schema/<group>/<name>`; each YAML choice extends one with `defaults: [/schema/<group>/<name>@_here_]`.
`register_schemas()` imports every rewardlab module so those declarations run: adding a component is
one module and one YAML file, with no central list to edit.

That import takes seconds (the modules import torch). So that a mistyped override is reported at once,
`register_schemas()` also writes a description of every schema to a cache keyed by the source files, and
`register_cached_schemas()` stores classes rebuilt from it without importing anything (schema_cache.py);
the CLI validates overrides against those and imports the real modules only when the overrides are good.
There is no rule to follow for it: a schema is a dataclass whose fields have the types OmegaConf
accepts, as before (an Enum field would only make every command take the slow path; test_startup.py
checks that every schema survives the cache unchanged).
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field, is_dataclass
from typing import Any, Callable, Dict, List, Optional

from hydra.core.config_store import ConfigStore

_SKIP = ("rewardlab.cli", "rewardlab.conf", "rewardlab.__main__")
_registered = False


_declared: dict[tuple[str | None, str], type] = {}  # every real schema, re-stored by register_schemas()


def _declare(group: str | None, name: str, node: type) -> None:
    _declared[(group, name)] = node
    ConfigStore.instance().store(group=group, name=name, node=node)


def command_schema(name: str, node: type) -> None:
    """Store a command's top-level schema (`_<command>_schema`), declared in the command's own module."""
    _declare(None, name, node)


def schema(group: str, name: str) -> Callable[[type], type]:
    """Class decorator: make `cls` a dataclass and store it as the schema `schema/<group>/<name>`."""

    def decorate(cls: type) -> type:
        cls = cls if is_dataclass(cls) else dataclass(cls)
        _declare(f"schema/{group}", name, cls)
        return cls

    return decorate


@dataclass
class RunConfig:
    """Run-level settings (`run.*`)."""

    iterations: int = 120
    prompts_per_iteration: int = 16
    eval_every: int = 20  # also at iteration 0 and the last; 0: only those two
    eval_size: int = 500
    eval_pass_k: List[int] = field(default_factory=list)  # e.g. [1,4]: pass@k and maj@k from sampled completions
    eval_samples: int = 0  # completions per prompt for pass@k; 0 means max(eval_pass_k)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch CPU threads; 0 keeps torch's default
    save_rollouts: bool = True
    log_samples: int = 8  # rollouts shown in the W&B table each iteration
    name: Optional[str] = None  # run name for W&B; defaults to the run directory's name
    checkpoint_every: int = 1  # checkpoint every N iterations (0: not by count); the last one always
    checkpoint_minutes: float = 0.0  # also once this many minutes passed since the last checkpoint (0: off)
    keep_checkpoints: int = 2  # newest checkpoints kept under <run_dir>/checkpoints
    verbose: bool = False  # libraries' progress bars, info logs and deprecation warnings in the log


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    policy: Any = None
    dataset: Any = None
    reward: Any = None
    algo: Any = None
    generation: Any = None
    logger: Any = None
    filters: Dict[str, Any] = field(default_factory=dict)
    resume: Optional[str] = None  # a run directory: continue that run with its own config.yaml


@dataclass
class EvalRunConfig:
    """`rewardlab eval` settings (`run.*`)."""

    eval_size: int = 500
    eval_pass_k: List[int] = field(default_factory=list)
    eval_samples: int = 0
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    verbose: bool = False


@dataclass
class EvalConfig:
    run: EvalRunConfig = field(default_factory=EvalRunConfig)
    policy: Any = None
    dataset: Any = None
    generation: Any = None
    search: Any = None  # test-time search (rewardlab/search.py); greedy: none
    reward: Any = None  # what a search scores completions with; greedy needs none


def _stored_class(group: str | None, name: str) -> type | None:
    """The class of the schema the ConfigStore holds as `group/name` (None if none)."""
    from omegaconf import OmegaConf

    entries = ConfigStore.instance().repo
    for part in group.split("/") if group else []:
        entries = entries.get(part, {})
    item = entries.get(f"{name}.yaml")
    return None if item is None else OmegaConf.get_type(item.node)


def register_schemas() -> None:
    """Store the top-level schemas and import every rewardlab module so `@schema` classes register."""
    global _registered
    if _registered:
        return
    store = ConfigStore.instance()
    store.store(name="_train_schema", node=TrainConfig)
    store.store(name="_eval_schema", node=EvalConfig)
    import rewardlab

    for module in pkgutil.walk_packages(rewardlab.__path__, prefix="rewardlab."):
        if not module.name.startswith(_SKIP):
            importlib.import_module(module.name)
    for (group, name), node in _declared.items():  # modules imported earlier in this process declared theirs
        if _stored_class(group, name) is not node:  # before any cached stand-ins replaced them
            store.store(group=group, name=name, node=node)
    _registered = True
    from rewardlab import schema_cache

    schema_cache.write()


def register_cached_schemas() -> bool:
    """Store the schemas as the last `register_schemas()` described them, importing none of their modules
    (no torch): enough to check overrides. False (nothing stored) when the sources changed since."""
    if _registered:
        return True
    from rewardlab import schema_cache

    store = ConfigStore.instance()
    store.store(name="_train_schema", node=TrainConfig)
    store.store(name="_eval_schema", node=EvalConfig)
    return schema_cache.load()
