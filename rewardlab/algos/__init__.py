"""Update rules: native policy gradient (pg.py + advantages.py) and TRL-backed ones (rft.py, dpo.py)."""

from dataclasses import dataclass
from typing import Any


@dataclass
class AlgoContext:
    """What an algorithm needs to know about the run it is part of."""

    temperature: float = 1.0
    max_new_tokens: int = 48
    total_iterations: int = 1
    seed: int = 0
    reward: Any = None  # the run's reward, for algorithms that score extra samples (anchored rejection)
