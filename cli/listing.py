"""`rewardlab configs`: the config groups, their choices, and each choice's one-line description
(the first comment line of its YAML file)."""

from __future__ import annotations

from importlib import resources

from rich.console import Console
from rich.table import Table


def describe_yaml(text: str) -> str:
    for line in text.splitlines():
        if line.startswith("#") and not line.startswith("# @package"):
            return line.lstrip("#").strip()
    return ""


NOT_GROUPS = {"accelerate"}  # conf/accelerate/: files for `accelerate launch --config_file`, not Hydra choices


def collect() -> dict[str, dict[str, str]]:
    """{group: {choice: description}} for every group under conf/ (nested groups joined with '/')."""
    root = resources.files("rewardlab.conf")
    groups: dict[str, dict[str, str]] = {}

    def walk(node, prefix: str) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir() and not child.name.startswith(("_", ".")) and child.name not in NOT_GROUPS:
                walk(child, f"{prefix}{child.name}/")
            elif child.name.endswith(".yaml") and prefix:
                groups.setdefault(prefix.rstrip("/"), {})[child.name[:-5]] = describe_yaml(child.read_text())

    walk(root, "")
    return groups


def config_table() -> None:
    table = Table(title="rewardlab config groups (choose with group=choice)")
    table.add_column("group", style="bold")
    table.add_column("choice", style="cyan")
    table.add_column("what it is")
    for group, choices in collect().items():
        for i, (choice, text) in enumerate(choices.items()):
            table.add_row(group if i == 0 else "", choice, text)
    Console(width=160).print(table)
