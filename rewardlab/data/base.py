"""The task interface every data set implements, and the seeded, resumable prompt sampler."""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence


@dataclass(frozen=True)
class Example:
    """One prompt with what is known about its answer.

    `answer` is the final answer the verifiable reward compares with; `solution` is a full
    reference response (for SPIN, BLEU or a warm start) when the data set has one. `prompt` is what the
    policy reads (rendered by `Task.prepare`); `question` and `messages` are the raw question and the
    conversation before any chat template, which rewards render with their own models' templates.
    """

    id: str
    prompt: str
    answer: str | None = None
    solution: str | None = None
    question: str | None = None
    messages: Optional[list[dict[str, str]]] = field(default=None, hash=False)


class Task(ABC):
    """A data set: a train and a test split of `Example`s, plus how answers are written."""

    #: how the verifiable reward finds the final answer: "hash" (`#### x`), "boxed", "last_number", "auto"
    answer_format: str = "auto"

    @abstractmethod
    def train_examples(self) -> Sequence[Example]: ...

    @abstractmethod
    def test_examples(self) -> Sequence[Example]: ...

    def prepare(self, tokenizer: Any) -> None:
        """Format prompts for the policy's tokenizer (chat templates need it); called once before sampling.

        Tasks whose prompts are fixed text (arith) need nothing; templated tasks (data/source.py) format here.
        """


class PromptSampler:
    """Draws prompts without replacement, reshuffling each epoch; its cursor is checkpointable."""

    def __init__(self, examples: Sequence[Example], seed: int) -> None:
        if not examples:
            raise ValueError("cannot sample from an empty split")
        self.examples = examples
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> list[int]:
        order = list(range(len(self.examples)))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def sample(self, n: int) -> list[Example]:
        out: list[Example] = []
        while len(out) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._shuffled(self.epoch)
            take = min(n - len(out), len(self._order) - self.position)
            out.extend(self.examples[i] for i in self._order[self.position : self.position + take])
            self.position += take
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._shuffled(self.epoch)
