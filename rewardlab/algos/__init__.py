"""Update rules: native policy gradient (pg.py + advantages.py) and TRL-backed ones (rft.py, dpo.py)."""

from dataclasses import dataclass
from typing import Any

SKIPPED, SKIP_REASON = "update/skipped", "update/skip_reason"


@dataclass
class AlgoContext:
    """What an algorithm needs to know about the run it is part of."""

    temperature: float = 1.0
    max_new_tokens: int = 48
    total_iterations: int = 1
    seed: int = 0
    reward: Any = None  # the run's reward, for algorithms that score extra samples (anchored rejection)


def skipped(reason: str, **metrics: Any) -> dict[str, Any]:
    """The metrics of an update that trained on nothing: `update/skipped` = 1 and the reason, which the
    loop warns with and logs (metrics.jsonl, W&B). An update never returns without a loss or this."""
    return {**metrics, SKIPPED: 1.0, SKIP_REASON: reason}
