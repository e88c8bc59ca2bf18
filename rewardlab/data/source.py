"""Data sets loaded from the hub or a local file, and the task base that turns their rows into prompts.

Every loaded data set (gsm8k, math, jsonl, hf) shares these settings: the hub by default
(`dataset.hub_id`, `subset`, splits), or local files in the same schema with `dataset.path=...`
(and `dataset.test_path=...`, else `test_size` rows of the train file are held out, seeded).
`rewardlab eval` reads only the test data: `dataset.test_path`, or every row of a lone `dataset.path`.
Questions are kept raw until `prepare(tokenizer)` formats them with the data set's `PromptTemplate`.
"""

from __future__ import annotations

import random
from abc import abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Optional, Sequence

from rewardlab.data.base import Example, Task
from rewardlab.data.files import Row, hub_rows, read_rows
from rewardlab.data.templates import PromptConfig, PromptTemplate
from rewardlab.errors import UserError

ANSWER_FORMATS = ("auto", "hash", "boxed", "last_number")  # what rewardlab.answers.extract_answer reads


@dataclass
class SourceConfig:
    """Settings shared by every loaded data set (`dataset.*`)."""

    hub_id: Optional[str] = None  # hub data set id, or a local data directory, for datasets.load_dataset
    subset: Optional[str] = None  # the hub data set's config name (gsm8k: main)
    train_split: str = "train"
    test_split: Optional[str] = "test"  # null: hold out `test_size` rows of the train split
    path: Optional[str] = None  # local .jsonl/.json/.parquet train file in the same schema (replaces the hub)
    test_path: Optional[str] = None  # local test file; without it, `test_size` rows of `path` are held out
    test_size: int = 200  # rows held out for evaluation when there is no test split or file
    seed: int = 1234  # held-out rows and few-shot examples are drawn with it
    max_new_tokens: int = 512  # generation budget that fits this data set's solutions
    answer_format: str = "auto"  # how final answers are found: auto | hash | boxed | last_number
    prompt: PromptConfig = field(default_factory=PromptConfig)


class LoadedTask(Task):
    """Rows from the hub or local files turned into `Example`s; subclasses say how one row reads.

    The train split is read on first use (training, or few-shot examples), so evaluating on a test file or
    split alone never reads it, and never contacts the hub when the test data is local; only a test split
    held out of the train file needs the train split at once.
    """

    name = "data"  # prefix of example ids

    def __init__(self, hub_id: str | None = None, subset: str | None = None, train_split: str = "train",
                 test_split: str | None = "test", path: str | None = None, test_path: str | None = None,
                 test_size: int = 200, seed: int = 1234, max_new_tokens: int = 512, answer_format: str = "auto",
                 prompt: PromptConfig | dict | None = None) -> None:
        if answer_format not in ANSWER_FORMATS:
            raise UserError(f"dataset.answer_format={answer_format!r} is not one of {', '.join(ANSWER_FORMATS)}")
        self.max_new_tokens, self.answer_format = max_new_tokens, answer_format
        settings = prompt if isinstance(prompt, PromptConfig) else PromptConfig(**(prompt or {}))
        self.template = PromptTemplate(settings.chat, settings.system, settings.instruction, settings.few_shot)
        self.hub_id, self.subset, self.train_split, self.test_split = hub_id, subset, train_split, test_split
        self.path, self.test_path = path, test_path
        self._rng = random.Random(seed)
        self._whole_train: list[Example] | None = None  # the train split before few-shot examples are taken out
        self._raw_test = self._read_test()
        if self._raw_test is None:  # held out of the train split, which must be read now
            self._whole_train, self._raw_test = self._hold_out(self._read_train(), test_size, self._rng)
        self._shots: list[Example] | None = None
        self._raw_train: list[Example] | None = None
        self._tokenizer: Any = None
        self._train: list[Example] | None = None
        self._test: list[Example] | None = None

    @abstractmethod
    def example(self, row: Row, example_id: str) -> Example:
        """One row as an Example whose `prompt` is the raw question; UserError naming the row if it does not fit."""

    def _examples(self, rows: list[Row], split: str) -> list[Example]:
        return [self.example(row, f"{self.name}-{split}-{i}") for i, row in enumerate(rows)]

    def _no_source(self) -> UserError:
        return UserError(f"dataset={self.name} needs dataset.hub_id=<hub id or data directory> "
                         f"or dataset.path=<local .jsonl/.json/.parquet file>")

    def _read_test(self) -> list[Example] | None:
        """The test split from its own file or hub split; None when it is held out of the train file."""
        if self.test_path is not None:
            return self._examples(read_rows(self.test_path, "dataset.test_path"), "test")
        if self.path is not None or not self.test_split:
            return None
        if self.hub_id is None:
            raise self._no_source()
        return self._examples(hub_rows(self.hub_id, self.subset, self.test_split), "test")

    def _read_train(self) -> list[Example]:
        if self.path is not None:
            return self._examples(read_rows(self.path, "dataset.path"), "train")
        if self.hub_id is None:
            raise self._no_source()
        return self._examples(hub_rows(self.hub_id, self.subset, self.train_split), "train")

    def _training(self) -> tuple[list[Example], list[Example]]:
        """(few-shot examples, the train examples left), reading the train split on first use."""
        if self._shots is None:
            train = self._whole_train if self._whole_train is not None else self._read_train()
            self._shots = self._take_shots(train, self._rng)
            shot_ids = {e.id for e in self._shots}
            self._raw_train = [e for e in train if e.id not in shot_ids]
        return self._shots, self._raw_train

    @staticmethod
    def _hold_out(train: list[Example], test_size: int, rng: random.Random) -> tuple[list[Example], list[Example]]:
        """A seeded test split of `test_size` examples taken out of `train`."""
        if not 0 < test_size < len(train):
            raise UserError(f"dataset.test_size={test_size} must hold out at least one row and leave at least one "
                            f"of the {len(train)} rows for training; or give dataset.test_path")
        order = list(range(len(train)))
        rng.shuffle(order)
        held = set(order[:test_size])
        return ([e for i, e in enumerate(train) if i not in held], [e for i, e in enumerate(train) if i in held])

    def _take_shots(self, train: list[Example], rng: random.Random) -> list[Example]:
        k = self.template.few_shot
        if k == 0:
            return []
        if k >= len(train):
            raise UserError(f"dataset.prompt.few_shot={k} leaves no training examples of {len(train)}; lower it")
        shots = rng.sample(train, k)
        if any(e.solution is None for e in shots):
            raise UserError(f"dataset.prompt.few_shot={k} needs solutions, and dataset={self.name} has none; "
                            f"set a solution field or prompt.few_shot=0")
        return shots

    def prepare(self, tokenizer: Any) -> None:
        """Format the test prompts with the template and the policy's tokenizer (train prompts on first use),
        keeping the raw question and the conversation beside each (rewards render those with their own templates)."""
        self._tokenizer = tokenizer
        self._train = None
        self._test = [self._format(e) for e in self._raw_test]

    def _format(self, example: Example) -> Example:
        """A raw example (`prompt` = the question, `messages` = a conversation given by the data) rendered."""
        shots = [(e.prompt, e.solution) for e in self._training()[0]] if self.template.few_shot else []
        question = example.prompt
        if example.messages is not None:
            if not self.template.chat:
                raise UserError(f"{example.id}: the data set's prompts are chat messages, which need the policy's "
                                f"chat template; set dataset.prompt.chat=true")
            messages = example.messages
        else:
            messages = self.template.messages(question, shots) if self.template.chat else None
        prompt = (self.template.render(messages, self._tokenizer) if messages is not None
                  else self.template.format(question, shots, self._tokenizer))
        return replace(example, prompt=prompt, question=question, messages=messages)

    def train_examples(self) -> Sequence[Example]:
        if self._tokenizer is not None and self._train is None:
            self._train = [self._format(e) for e in self._training()[1]]
        return self._formatted(self._train)

    def test_examples(self) -> Sequence[Example]:
        return self._formatted(self._test)

    def _formatted(self, examples: list[Example] | None) -> list[Example]:
        if examples is None:
            raise RuntimeError(f"{type(self).__name__}.prepare(tokenizer) must run before its examples are read")
        return examples
