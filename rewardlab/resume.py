"""Which run to continue: `resume=<run dir>` (its own config.yaml, `run.iterations` may extend it), or a rerun
into a directory that holds a checkpoint (a SLURM requeue). Kept apart from checkpoint.py, which needs torch,
so the command line is checked before torch is imported."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from rewardlab.errors import UserError


def saved_config(run_dir: Path) -> DictConfig:
    """The config a run directory was started with (its config.yaml), with schema defaults filled in."""
    from rewardlab.config import TrainConfig

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise UserError(f"resume={run_dir}: no config.yaml there; point resume at a run directory "
                        f"(the `run dir:` line a run prints)")
    return OmegaConf.merge(OmegaConf.structured(TrainConfig), OmegaConf.load(path))


def _plain(cfg: DictConfig) -> dict[str, Any]:
    """The config as written to config.yaml (resolved; tuples as lists), without `resume`."""
    out = yaml.safe_load(OmegaConf.to_yaml(cfg, resolve=True))
    out.pop("resume", None)
    return out


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
    return [] if a == b else [prefix.rstrip(".")]


def _extend(saved: DictConfig, iterations: int, run_dir: Path) -> DictConfig:
    """The run's own config with `run.iterations` raised to `iterations` (never lowered)."""
    before = saved.run.iterations
    if iterations < before:
        raise UserError(f"run.iterations={iterations} is fewer than the {before} iterations {run_dir} was "
                        f"run for; a run can only be extended (give a larger run.iterations)")
    if iterations > before:
        saved.run.iterations = iterations
    return saved


def resume_target(cfg: DictConfig, run_dir: Path) -> tuple[DictConfig, Path]:
    """The config and directory to run: `resume=<dir>` continues that run with its own config; a rerun
    into a directory that has a checkpoint (a SLURM requeue) continues it if the config is the same.
    Either may raise `run.iterations` to extend the run; any other difference is refused."""
    if cfg.get("resume"):
        run_dir = Path(cfg.resume)
        return _extend(saved_config(run_dir), cfg.run.iterations, run_dir), run_dir
    from rewardlab.checkpoint import Checkpointer

    if Checkpointer(run_dir).latest() is not None:
        saved = saved_config(run_dir)
        changed = [k for k in _differences(_plain(saved), _plain(cfg)) if k != "run.iterations"]
        if changed:
            raise UserError(f"{run_dir} holds a run with a different config ({', '.join(changed[:5])}); "
                            f"continue it with `rewardlab train resume={run_dir}`, or choose a new hydra.run.dir")
        _extend(saved, cfg.run.iterations, run_dir)  # refuses a smaller run.iterations
    return cfg, run_dir


def resume_args(args: list[str]) -> list[str]:
    """Command-line arguments for `rewardlab train`: with `resume=<dir>`, Hydra runs in that directory
    and writes no new .hydra/ record there; `run.iterations=N` may extend the run (without it the run's
    own value is passed on), other config overrides are refused (the run's own config is used), Hydra's
    own (`hydra.*`, `hydra/launcher=...`) pass."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found = [a for a in args if a.startswith("resume=")]
    if not found:
        return args
    run_dir = str(OverridesParser.create().parse_overrides(found[-1:])[0].value())
    saved = saved_config(Path(run_dir))
    settings = [a for a in args if "=" in a and not a.startswith(("-", "resume=", "hydra.", "hydra/", "+hydra"))]
    others = [a for a in settings if not a.startswith("run.iterations=")]
    if others:
        raise UserError(f"resume={run_dir} continues the run with its own config.yaml (only run.iterations may "
                        f"change, to extend it); drop {' '.join(others)} or start a new run")
    if any(a.startswith("hydra.run.dir=") for a in args):
        raise UserError(f"resume={run_dir} already sets the run directory; drop hydra.run.dir")
    if len(settings) == len(others):  # no run.iterations given: the run's own horizon
        args = [*args, f"run.iterations={saved.run.iterations}"]
    quoted = run_dir.replace("\\", "\\\\").replace("'", "\\'")
    return [*args, f"hydra.run.dir='{quoted}'", "hydra.output_subdir=null"]
