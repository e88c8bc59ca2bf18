"""The config schemas without importing the modules that declare them, so a mistyped override is reported
in a fraction of a second instead of after importing torch, transformers and TRL.

Schemas are declared beside their components (`@schema` in rewardlab/config.py), in modules that import
torch; registering them (`register_schemas`) imports every rewardlab module, which takes seconds. Each time
that happens, a description of every stored schema (its fields' types and defaults, its bases, the
dataclasses it nests) is written to `$REWARDLAB_CACHE/schemas/<install>-<fingerprint>.json` (else
~/.cache/rewardlab/schemas/), keyed by the size and modification time of every rewardlab source file, so an
edited module makes the cache stale and it is not used (and is replaced by the next write). `load()` rebuilds equivalent dataclasses
(same names, fields, types, defaults and subclass relations) from the file and stores them instead, with no
import of their modules. The CLI validates overrides against them and imports the real modules only once
the command line is good (cli/main.py); the run composes with the real classes.

Hand-written because no library does this: Hydra needs the dataclasses in its ConfigStore, and OmegaConf's
pickles of them name their classes, whose modules import torch. A schema field type this cannot describe
(an Enum, say) leaves the cache unwritten, and every command registers schemas by importing as before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

import omegaconf

from rewardlab.cache import cache_root

VERSION = 1  # of the file's layout


class Unsupported(Exception):
    """A schema uses a type or default this cache does not describe."""


def _package() -> Path:
    return Path(__file__).resolve().parent


def _install() -> str:
    """Names this copy of rewardlab (a checkout or an installation): its caches replace each other."""
    return hashlib.sha256(str(_package()).encode()).hexdigest()[:8]


def fingerprint() -> str:
    """Changes whenever a rewardlab source file is added, removed or edited (its size or mtime)."""
    digest = hashlib.sha256(f"{VERSION} {sys.version_info[:2]} {omegaconf.__version__}".encode())
    for path in sorted(_package().rglob("*.py")):
        stat = path.stat()
        digest.update(f"{path.relative_to(_package())} {stat.st_size} {stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:24]


def cache_file() -> Path:
    return cache_root() / "schemas" / f"{_install()}-{fingerprint()}.json"


def _ref(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


class _Describer:
    """Turns stored schema classes (and the dataclasses they name) into JSON-able descriptions."""

    def __init__(self) -> None:
        self.classes: dict[str, dict[str, Any]] = {}

    def cls(self, cls: type) -> str:
        ref = _ref(cls)
        if ref not in self.classes:
            self.classes[ref] = {}  # placed first: a class that names itself does not recurse forever
            hints = typing.get_type_hints(cls)
            bases = [self.cls(b) for b in cls.__bases__ if dataclasses.is_dataclass(b)]
            fields = [{"name": f.name, "type": self.type(hints[f.name]), **self.default(f)}
                      for f in dataclasses.fields(cls)]
            self.classes[ref] = {"bases": bases, "fields": fields}
        return ref

    def type(self, t: Any) -> Any:
        if t is Any:
            return "any"
        if t is type(None):
            return "none"
        if t in (int, float, str, bool, bytes):
            return t.__name__
        if t in (list, dict, tuple):
            return {t.__name__: "any"}
        if dataclasses.is_dataclass(t):
            return {"class": self.cls(t)}
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is typing.Union:
            return {"union": [self.type(a) for a in args]}
        if origin is list:
            return {"list": self.type(args[0]) if args else "any"}
        if origin is dict:
            return {"dict": [self.type(a) for a in args] if args else ["any", "any"]}
        if origin is tuple:
            return {"tuple": [self.type(a) for a in args]}
        raise Unsupported(f"type {t!r}")

    def default(self, f: dataclasses.Field) -> dict[str, Any]:
        if f.default is not dataclasses.MISSING:
            return {"default": self.value(f.default)}
        if f.default_factory is not dataclasses.MISSING:
            return {"factory": self.value(f.default_factory())}
        return {}

    def value(self, v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return {"v": v}
        if isinstance(v, (list, tuple)):
            return {type(v).__name__: [self.value(x) for x in v]}
        if isinstance(v, dict):
            return {"dict": [[self.value(k), self.value(x)] for k, x in v.items()]}
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {"obj": self.cls(type(v)), "fields": {f.name: self.value(getattr(v, f.name))
                                                         for f in dataclasses.fields(v) if f.init}}
        raise Unsupported(f"default {v!r}")


class _Builder:
    """Rebuilds the described classes (once each, bases first) and their types and default values."""

    def __init__(self, classes: dict[str, dict[str, Any]]) -> None:
        self.described, self.built = classes, {}

    def cls(self, ref: str) -> type:
        if ref not in self.built:
            spec = self.described[ref]
            module, qualname = ref.split(":")
            bases = tuple(self.cls(b) for b in spec["bases"])
            fields = [(f["name"], self.type(f["type"]), self.field(f)) for f in spec["fields"]]
            cls = dataclasses.make_dataclass(qualname.rsplit(".", 1)[-1], fields, bases=bases,
                                             namespace={"__module__": module})
            cls.__qualname__ = qualname
            self.built[ref] = cls
        return self.built[ref]

    def type(self, t: Any) -> Any:
        simple = {"any": Any, "none": type(None), "int": int, "float": float, "str": str, "bool": bool,
                  "bytes": bytes}
        if isinstance(t, str):
            return simple[t]
        (kind, arg), = t.items()
        if kind == "class":
            return self.cls(arg)
        if kind == "union":
            return typing.Union[tuple(self.type(a) for a in arg)]
        if kind == "list":
            return typing.List[self.type(arg)]
        if kind == "dict":
            return typing.Dict[self.type(arg[0]), self.type(arg[1])] if arg != "any" else dict
        if kind == "tuple":
            return typing.Tuple[tuple(self.type(a) for a in arg)] if arg != "any" else tuple
        raise Unsupported(f"type {t!r}")

    def field(self, f: dict[str, Any]) -> Any:
        if "default" in f:
            return dataclasses.field(default=self.value(f["default"]))
        if "factory" in f:
            return dataclasses.field(default_factory=lambda: self.value(f["factory"]))
        return dataclasses.field(default=omegaconf.MISSING)

    def value(self, v: dict[str, Any]) -> Any:
        if "obj" in v:
            return self.cls(v["obj"])(**{k: self.value(x) for k, x in v["fields"].items()})
        (kind, arg), = v.items()
        if kind == "v":
            return arg
        if kind in ("list", "tuple"):
            items = [self.value(x) for x in arg]
            return items if kind == "list" else tuple(items)
        return {self.value(k): self.value(x) for k, x in arg}


def _stored() -> list[Any]:
    """Hydra's ConfigStore entries whose node is a rewardlab dataclass (the schemas)."""
    from hydra.core.config_store import ConfigNode, ConfigStore

    found, pending = [], [ConfigStore.instance().repo]
    while pending:
        for item in pending.pop().values():
            if isinstance(item, dict):
                pending.append(item)
            elif isinstance(item, ConfigNode):
                cls = omegaconf.OmegaConf.get_type(item.node)
                if dataclasses.is_dataclass(cls) and cls.__module__.startswith("rewardlab"):
                    found.append((item, cls))
    return found


def describe() -> dict[str, Any]:
    """What `write` stores: every schema in the ConfigStore now, and the dataclasses they use."""
    describer = _Describer()
    entries = [{"group": node.group, "name": node.name.removesuffix(".yaml"), "package": node.package,
                "class": describer.cls(cls)} for node, cls in _stored()]
    return {"version": VERSION, "entries": sorted(entries, key=lambda e: (e["group"] or "", e["name"])),
            "classes": describer.classes}


def rebuild(description: dict[str, Any]) -> list[tuple[dict[str, Any], type]]:
    """(entry, rebuilt class) for every schema described."""
    builder = _Builder(description["classes"])
    return [(entry, builder.cls(entry["class"])) for entry in description["entries"]]


def write() -> None:
    """Describe the registered schemas for later commands (after `register_schemas` imported them all), unless a
    file for the same sources is there already. A schema the cache cannot describe, or a cache directory that
    cannot be written, leaves no file."""
    try:
        path = cache_file()
        if path.exists():  # written for these very sources
            return
        text = json.dumps(describe())
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, path)
        for stale in path.parent.glob(f"{_install()}-*.json"):  # this copy's files for older sources
            if stale != path:
                stale.unlink(missing_ok=True)
    except (Unsupported, OSError):
        return


def load() -> bool:
    """Store the cached schemas in Hydra's ConfigStore if the cache matches the sources; whether it did."""
    from hydra.core.config_store import ConfigStore

    try:
        description = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return False
    if description.get("version") != VERSION:
        return False
    store = ConfigStore.instance()
    for entry, cls in rebuild(description):
        store.store(group=entry["group"], name=entry["name"], node=cls, package=entry["package"])
    return True
