"""The Batch: one row per completion, grouped by prompt; saved per iteration as parquet.

Rewards add columns, filters drop rows, algorithms read what they need and write `advantages`.
Columns are plain Python lists (ragged token ids and step rewards stay ragged); `rewards` holds one
column per named reward component and `extra` any other per-row column a component adds.
`question` and `messages` keep each row's input before the policy's chat template (the data set's raw
question, and the conversation the policy was shown), so every reward renders its own model's template
once instead of wrapping an already rendered prompt; a row without them (a plain JSONL prompt given to
`rewardlab score`) treats its `prompt` as the raw question.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

_ROW_LISTS = ("prompt_id", "prompt", "completion", "prompt_ids", "completion_ids", "sample_logprobs",
              "sample_entropy", "finish_reason", "steps", "reference", "solution", "question", "messages", "reward",
              "step_rewards", "gold", "advantages")


@dataclass
class Batch:
    prompt_id: list[str]
    prompt: list[str]
    completion: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finish_reason: list[str]
    reference: list[str | None]
    solution: list[str | None]
    sample_logprobs: list[list[float]] | None = None
    # per completion token, the entropy of the sampling policy's next-token distribution at temperature T
    # (recorded while decoding by the transformers engines; None where the engine does not give it, e.g. vLLM)
    sample_entropy: list[list[float]] | None = None
    steps: list[list[str]] | None = None
    question: list[str | None] | None = None  # the raw question, before any chat template
    messages: list[list[dict[str, str]] | None] | None = None  # the conversation the policy was shown
    rewards: dict[str, list[float]] = field(default_factory=dict)
    reward: list[float] | None = None
    step_rewards: list[list[float]] | None = None
    gold: list[float] | None = None
    advantages: list[Any] | None = None
    extra: dict[str, list[Any]] = field(default_factory=dict)
    iteration: int = 0

    def __len__(self) -> int:
        return len(self.prompt_id)

    def groups(self) -> dict[str, list[int]]:
        """Row indices per prompt, in first-seen order."""
        out: dict[str, list[int]] = {}
        for i, pid in enumerate(self.prompt_id):
            out.setdefault(pid, []).append(i)
        return out

    def raw_question(self, i: int) -> str:
        """Row `i`'s question before any template; its `prompt` when the batch has none (taken as raw)."""
        question = None if self.question is None else self.question[i]
        return self.prompt[i] if question is None else question

    def conversation(self, i: int) -> list[dict[str, str]]:
        """Row `i`'s conversation before any template (the raw question as one user turn when none is stored)."""
        messages = None if self.messages is None else self.messages[i]
        if messages:
            return [{"role": m["role"], "content": m["content"]} for m in messages]
        return [{"role": "user", "content": self.raw_question(i)}]

    def has_references(self) -> bool:
        return any(r is not None for r in self.reference)

    def select(self, indices: Iterable[int]) -> "Batch":
        """A new Batch with the given rows, every column kept aligned."""
        idx = list(indices)
        kwargs: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _ROW_LISTS:
                kwargs[f.name] = None if value is None else [value[i] for i in idx]
            elif f.name in ("rewards", "extra"):
                kwargs[f.name] = {k: [v[i] for i in idx] for k, v in value.items()}
            else:
                kwargs[f.name] = value
        return Batch(**kwargs)

    @classmethod
    def concat(cls, batches: list["Batch"]) -> "Batch":
        """Rows of several batches with the same columns, in order."""
        first = batches[0]
        kwargs: dict[str, Any] = {}
        for f in fields(first):
            values = [getattr(b, f.name) for b in batches]
            if f.name in _ROW_LISTS:
                kwargs[f.name] = None if any(v is None for v in values) else [x for v in values for x in v]
            elif f.name in ("rewards", "extra"):
                keys = set.intersection(*(set(v) for v in values))
                kwargs[f.name] = {k: [x for v in values for x in v[k]] for k in getattr(first, f.name) if k in keys}
            else:
                kwargs[f.name] = getattr(first, f.name)
        return cls(**kwargs)

    # ---- persistence -------------------------------------------------------------------------
    def to_table(self) -> pa.Table:
        columns: dict[str, list[Any]] = {}
        for name in _ROW_LISTS:
            value = getattr(self, name)
            if value is not None:
                columns[name] = value
        for name, values in self.rewards.items():
            columns[f"rewards/{name}"] = values
        for name, values in self.extra.items():
            columns[f"extra/{name}"] = values
        columns["iteration"] = [self.iteration] * len(self)
        return pa.table(columns)

    @classmethod
    def from_table(cls, table: pa.Table) -> "Batch":
        data = table.to_pydict()
        kwargs: dict[str, Any] = {name: data[name] for name in _ROW_LISTS if name in data}
        kwargs["rewards"] = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("rewards/")}
        kwargs["extra"] = {k.split("/", 1)[1]: v for k, v in data.items() if k.startswith("extra/")}
        kwargs["iteration"] = int(data["iteration"][0]) if data.get("iteration") else 0
        return cls(**kwargs)

    def save(self, path: str | Path) -> None:
        """Write atomically (temporary file, then rename): a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.close(fd)
        try:
            pq.write_table(self.to_table(), tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @classmethod
    def load(cls, path: str | Path) -> "Batch":
        return cls.from_table(pq.read_table(path))
