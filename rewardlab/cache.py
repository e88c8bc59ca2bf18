"""Where rewardlab keeps what it builds once per machine (the tiny models, the schema description, large
arith splits): `$REWARDLAB_CACHE`, else ~/.cache/rewardlab. Every entry is keyed by what produces it, so
deleting the directory is always safe: the next command rebuilds what it needs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("REWARDLAB_CACHE") or Path.home() / ".cache" / "rewardlab")
