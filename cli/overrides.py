"""Check Hydra overrides before any work, turning composition errors into one clear line.

Every combination of a sweep is composed, so `-m algo=grpo,grpoo` fails up front rather than in job 2.
"""

from __future__ import annotations

import re
from typing import Sequence

from rewardlab.errors import UserError

_FLAGS_WITH_VALUE = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                     "--experimental-rerun", "-i", "--info", "-c", "--cfg", "-p", "--package"}
_SKIP_VALIDATION = {"-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
                    "--experimental-rerun"}


def split_args(args: Sequence[str]) -> tuple[list[str], bool, bool]:
    """(overrides, is_multirun, can_validate) from a Hydra command line."""
    overrides: list[str] = []
    multirun, can_validate = False, True
    skip_next = False
    for i, arg in enumerate(args):
        if skip_next:
            skip_next = False
            continue
        if arg in ("-m", "--multirun"):
            multirun = True
        elif arg in _SKIP_VALIDATION:
            can_validate = False
            skip_next = True
        elif arg in _FLAGS_WITH_VALUE:
            skip_next = i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]
        elif not arg.startswith("-"):
            overrides.append(arg)
    return overrides, multirun, can_validate


def describe(exc: BaseException) -> str:
    """One line for a Hydra/OmegaConf composition error."""
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    if isinstance(exc, MissingConfigException):
        text = str(exc)
        found = re.search(r"Could not find '([^']+)/([^'/]+)'", text)
        options = re.findall(r"^\t(\S+)$", text.split("Config search path")[0], flags=re.M)
        if found:
            group, choice = found.groups()
            return (f"unknown choice '{choice}' for {group}; choices: {', '.join(options) or 'none'} "
                    f"(see `rewardlab configs`)")
        return text.splitlines()[0]
    if isinstance(exc, OverrideParseException):
        return f"cannot parse override: {str(exc).splitlines()[0]}"
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    key = getattr(cause, "full_key", None)
    component = re.search(r"override \+?(reward\.components\.[^.=']+)", str(exc))
    if component and "is not a subclass of ComponentConfig" in str(cause):
        name = component.group(1)
        return (f"{name} is not a component yet: add it by choosing its reward, +reward@{name}.reward=<reward> "
                f"(e.g. length), then set {name}.weight=... (see `rewardlab configs` for rewards)")
    missing = re.search(r"Key '([^']+)' not in '([^']+)'\s+full_key: (\S+)", str(exc))
    if missing:
        return (f"unknown config key '{missing.group(3)}' ({missing.group(2)} has no '{missing.group(1)}'); "
                f"check the spelling (`rewardlab train --cfg job` shows every key)")
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) or "No match in config" in str(exc) \
            or "not in struct" in str(cause):
        named = re.search(r"override '([^']+)'", str(exc))
        name = key or (named.group(1) if named else "?")
        return f"unknown config key '{name}'; check the spelling (`rewardlab train --cfg job` shows every key)"
    if isinstance(cause, ValidationError):
        return f"{key}: {str(cause).splitlines()[0]}"
    return str(exc).splitlines()[0]


def validate(config_name: str, args: Sequence[str]) -> None:
    """Compose the config for every override combination; raise UserError on the first failure."""
    from hydra import compose, initialize_config_module
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    overrides, multirun, can_validate = split_args(args)
    if not can_validate:
        return
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        combos = BasicSweeper.split_arguments(parsed, None)[0] if multirun else [overrides]
        if any(o.is_sweep_override() for o in parsed) and not multirun:
            raise UserError("a sweep override (a,b or range(...)) needs -m/--multirun")
        GlobalHydra.instance().clear()
        with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
            for combo in combos:
                compose(config_name=config_name, overrides=list(combo), return_hydra_config=True)
    except (HydraException, OmegaConfBaseException) as exc:
        raise UserError(describe(exc)) from exc
    finally:
        GlobalHydra.instance().clear()
