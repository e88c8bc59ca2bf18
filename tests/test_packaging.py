"""pyproject lists every package directory (cli/ and conf/ install under the rewardlab namespace)."""

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "rewardlab").rglob("__init__.py")}
    assert found | {"rewardlab.cli", "rewardlab.conf"} <= listed


def test_no_top_level_cli_module(tmp_path):
    """Installed, the CLI is `rewardlab.cli`; no top-level `cli` module leaks (checked outside the repo,
    where the working directory cannot shadow the installation)."""
    import subprocess
    import sys

    code = ("import importlib.util, sys; "
            "sys.exit(importlib.util.find_spec('cli') is not None or importlib.util.find_spec('rewardlab.cli.main') is None)")
    assert subprocess.run([sys.executable, "-c", code], cwd=tmp_path).returncode == 0
