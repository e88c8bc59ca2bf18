"""Any local data file (.jsonl, .json, .parquet) with configurable field names (`dataset=jsonl`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rewardlab.config import schema
from rewardlab.data.base import Example
from rewardlab.data.files import Row
from rewardlab.data.source import LoadedTask, SourceConfig
from rewardlab.data.templates import as_messages, last_user


@dataclass
class FieldsConfig(SourceConfig):
    """Which field of a row holds what (TRL's column names by default)."""

    prompt_field: str = "prompt"  # the question
    answer_field: Optional[str] = "answer"  # the final answer the verifiable reward checks; null: none
    solution_field: Optional[str] = None  # a full reference response (few-shot, SPIN, BLEU); null: none


@schema("dataset", "jsonl")
@dataclass
class JsonlConfig(FieldsConfig):
    _target_: str = "rewardlab.data.jsonl.FieldsTask"


class FieldsTask(LoadedTask):
    """Rows whose fields are named by `prompt_field`, `answer_field` and `solution_field`. A prompt that is a
    list of chat messages (TRL's conversational format) is kept as the conversation and rendered as given."""

    name = "jsonl"

    def __init__(self, prompt_field: str = "prompt", answer_field: str | None = "answer",
                 solution_field: str | None = None, **source) -> None:
        self.fields = {"prompt": prompt_field, "answer": answer_field, "solution": solution_field}
        super().__init__(**source)

    def example(self, row: Row, example_id: str) -> Example:
        prompt = row.get(self.fields["prompt"], f"dataset.prompt_field={self.fields['prompt']}")
        messages = as_messages(prompt, row.where)
        values = {key: None if name is None else str(row.get(name, f"dataset.{key}_field={name}"))
                  for key, name in self.fields.items() if key != "prompt"}
        question = str(prompt) if messages is None else last_user(messages)
        return Example(id=example_id, prompt=question, messages=messages, **values)
