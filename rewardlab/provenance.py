"""A run's own record of how it was launched: `<run dir>/.hydra/{config,hydra,overrides}.yaml`.

Hydra writes these files before the task runs, so a rerun that rewardlab then refuses (the directory
holds a different run) would have rewritten the existing run's provenance. conf/train.yaml therefore sets
`hydra.output_subdir: null` and the run writes the same three files itself, once it has been accepted:
on its first start, and again (`run.iterations` only) when it is extended. The task function does it,
so it holds for every launcher (basic, joblib, submitit). The sweep summary and the W&B run name and
group read this record.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from rewardlab.io import write_text_atomic

RECORD = ".hydra"


def record(run_dir: Path, launched: DictConfig, iterations: int) -> None:
    """Called once the run is accepted, before it writes anything else: the first start writes the
    record, an extension (a larger `run.iterations` than config.yaml says) updates it, a resume or a
    requeue leaves it as it is."""
    saved = Path(run_dir) / "config.yaml"
    if saved.exists() and OmegaConf.load(saved).run.iterations < iterations:
        _record_extension(run_dir, iterations)
    elif not launched.get("resume"):
        _write_record(run_dir, launched)


def _write_record(run_dir: Path, task_cfg: DictConfig) -> None:
    """Write the Hydra record of a run starting for real, unless it already has one (a requeue)."""
    from hydra.core.hydra_config import HydraConfig

    record = Path(run_dir) / RECORD
    if not HydraConfig.initialized() or (record / "overrides.yaml").exists():
        return
    hydra_cfg = HydraConfig.get()
    write_text_atomic(record / "config.yaml", OmegaConf.to_yaml(task_cfg))
    write_text_atomic(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    write_text_atomic(record / "overrides.yaml", OmegaConf.to_yaml(hydra_cfg.overrides.task))


def _record_extension(run_dir: Path, iterations: int) -> None:
    """An extended run: its record says `run.iterations=<new total>` (replacing any earlier value)."""
    record = Path(run_dir) / RECORD
    if not (record / "overrides.yaml").exists():
        return
    overrides = [o for o in read_overrides(run_dir) if not o.lstrip("+~").startswith("run.iterations=")]
    write_text_atomic(record / "overrides.yaml", yaml.safe_dump([*overrides, f"run.iterations={iterations}"]))
    if (record / "config.yaml").exists():
        composed = OmegaConf.load(record / "config.yaml")
        OmegaConf.update(composed, "run.iterations", iterations)
        write_text_atomic(record / "config.yaml", OmegaConf.to_yaml(composed))


def read_overrides(run_dir: Path) -> list[str]:
    """The command-line overrides the run was started with ([] without a record)."""
    path = Path(run_dir) / RECORD / "overrides.yaml"
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])] if path.exists() else []


def sweep_identity(run_dir: Path) -> dict[str, Any]:
    """For a job of a multirun: `name` (its overrides) and `group` (its sweep directory); {} otherwise."""
    path = Path(run_dir) / RECORD / "hydra.yaml"
    if not path.exists():
        return {}
    hydra = (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    if hydra.get("mode") != "MULTIRUN":
        return {}
    sweep_dir = Path(hydra["runtime"]["output_dir"]).parent
    relative = os.path.relpath(sweep_dir)
    return {"name": " ".join(read_overrides(run_dir)) or Path(run_dir).name,
            "group": str(sweep_dir) if relative.startswith("..") else relative}
