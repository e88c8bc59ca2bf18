"""Rows of a data set, each remembering where it came from, read from local files or the hub.

Local files are read here rather than with `datasets.load_dataset("json", ...)` because a broken file
must get one line naming the file and the line (the pyarrow JSON reader reports a byte offset inside
a traceback). Hub data sets go through `datasets.load_dataset`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from rewardlab.errors import UserError

SUFFIXES = (".jsonl", ".json", ".parquet")


@dataclass(frozen=True)
class Row:
    """One record and where it is (`data.jsonl:3`, `data.parquet row 3`, `openai/gsm8k (test) row 3`)."""

    where: str
    values: Mapping[str, Any]

    def get(self, name: str, setting: str) -> Any:
        """The value of field `name`; a UserError naming this row and the `setting` that chose the field."""
        value = self.values.get(name)
        if name in self.values and value is None:
            raise UserError(f"{self.where}: field '{name}' is null ({setting}); give it a value or drop the row")
        if value is None:
            present = ", ".join(sorted(map(str, self.values))) or "none"
            raise UserError(f"{self.where}: row has no field '{name}' ({setting}); fields present: {present}")
        return value


def read_rows(path: str | Path, setting: str = "dataset.path") -> list[Row]:
    """All rows of a local .jsonl (one JSON object per line), .json (a list of objects) or .parquet file."""
    file = Path(path).expanduser()
    if not file.is_file():
        what = "is a directory, not a file" if file.is_dir() else "does not exist"
        raise UserError(f"{setting}={path} {what}; point it at a {'/'.join(SUFFIXES)} file")
    if file.suffix not in SUFFIXES:
        raise UserError(f"{setting}={path}: unknown file type '{file.suffix}'; use one of {', '.join(SUFFIXES)}")
    rows = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}[file.suffix](file)
    if not rows:
        raise UserError(f"{file}: the file is empty (no rows); {setting} needs at least one row")
    return rows


def _jsonl(file: Path) -> list[Row]:
    rows: list[Row] = []
    with open(file, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _text(raw, f"{file}:{number}")
            if not line.strip():
                continue
            try:
                value = json.loads(line.rstrip("\r\n"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{file}:{number}: malformed JSON ({exc.msg} at column {exc.colno}); "
                                f"each line must be one JSON object") from None
            rows.append(Row(f"{file}:{number}", _object(value, f"{file}:{number}")))
    return rows


def _json(file: Path) -> list[Row]:
    text = _text(file.read_bytes(), str(file))
    if not text.strip():
        return []
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{file}:{exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(value, list):
        raise UserError(f"{file}: expected a JSON list of objects, got {type(value).__name__}; "
                        f"or write one object per line in a .jsonl file")
    return [Row(f"{file} item {i}", _object(item, f"{file} item {i}")) for i, item in enumerate(value, start=1)]


def _parquet(file: Path) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as exc:
        raise UserError(f"{file}: not a readable parquet file ({str(exc).splitlines()[0]})") from None
    return [Row(f"{file} row {i}", values) for i, values in enumerate(table.to_pylist(), start=1)]


def _text(raw: bytes, where: str) -> str:
    try:
        return raw.decode("utf-8-sig")  # a leading BOM (Windows editors) is not part of the data
    except UnicodeDecodeError as exc:
        raise UserError(f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start + 1}); save the file as UTF-8") from None


def _object(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise UserError(f"{where}: expected a JSON object with named fields, got {type(value).__name__}")
    return value


def hub_rows(hub_id: str, subset: str | None, split: str) -> list[Row]:
    """Rows of one split of a hub data set (or a local data directory) through `datasets.load_dataset`."""
    from datasets import load_dataset

    name = f"{hub_id}{f' [{subset}]' if subset else ''} ({split})"
    try:
        data = load_dataset(hub_id, subset, split=split)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {name}: {str(exc).splitlines()[0]}; check dataset.hub_id/subset/split, "
                        f"or use dataset.path=<local file> offline") from None
    rows = [Row(f"{name} row {i}", values) for i, values in enumerate(data, start=1)]
    if not rows:
        raise UserError(f"{name} has no rows")
    return rows
