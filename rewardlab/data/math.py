"""MATH / MATH-500: `problem`, `solution` with the final answer in `\\boxed{}`, and `answer` where present.

The default hub copy is `DigitalLearningGmbH/MATH-lighteval` (train and test splits of the original
MATH); MATH-500 (`HuggingFaceH4/MATH-500`, test split only, with an `answer` field) loads with
`dataset.hub_id=HuggingFaceH4/MATH-500 dataset.train_split=test dataset.test_split=null`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rewardlab.config import schema
from rewardlab.data.base import Example
from rewardlab.data.files import Row
from rewardlab.data.gsm8k import BOXED_INSTRUCTION
from rewardlab.data.source import LoadedTask, SourceConfig
from rewardlab.data.templates import PromptConfig
from rewardlab.errors import UserError
from rewardlab.answers import last_boxed


@schema("dataset", "math")
@dataclass
class MathConfig(SourceConfig):
    _target_: str = "rewardlab.data.math.MathTask"
    hub_id: Optional[str] = "DigitalLearningGmbH/MATH-lighteval"
    max_new_tokens: int = 1024
    answer_format: str = "boxed"
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(instruction=BOXED_INSTRUCTION))


class MathTask(LoadedTask):
    """Competition math; the reference is the `answer` field, else the solution's last `\\boxed{}`."""

    name = "math"

    def example(self, row: Row, example_id: str) -> Example:
        schema_name = "math schema: problem, solution, answer where present"
        solution = str(row.get("solution", schema_name))
        answer = row.values.get("answer")
        answer = str(answer) if answer is not None else last_boxed(solution)
        if not answer:
            raise UserError(f"{row.where}: no final answer: the row has no 'answer' field and its 'solution' "
                            f"has no \\boxed{{...}} ({schema_name})")
        return Example(id=example_id, prompt=str(row.get("problem", schema_name)), answer=answer, solution=solution)
