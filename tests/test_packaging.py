"""pyproject lists every package directory (cli/ and conf/ install under the rewardlab namespace)."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rewardlab").rglob("__init__.py")}
    assert found | {"rewardlab.cli", "rewardlab.conf"} <= listed


def test_no_top_level_cli_module():
    import importlib.util

    assert importlib.util.find_spec("cli") is None
    assert importlib.util.find_spec("rewardlab.cli.main") is not None
