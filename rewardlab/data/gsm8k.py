"""GSM8K (`openai/gsm8k`, config `main`): `question`, and `answer` = worked solution ending in `#### <final>`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from rewardlab.config import schema
from rewardlab.data.base import Example
from rewardlab.data.files import Row
from rewardlab.data.source import LoadedTask, SourceConfig
from rewardlab.data.templates import PromptConfig
from rewardlab.errors import UserError

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@schema("dataset", "gsm8k")
@dataclass
class GSM8KConfig(SourceConfig):
    _target_: str = "rewardlab.data.gsm8k.GSM8KTask"
    hub_id: Optional[str] = "openai/gsm8k"
    subset: Optional[str] = "main"
    max_new_tokens: int = 512
    prompt: PromptConfig = field(default_factory=lambda: PromptConfig(instruction=BOXED_INSTRUCTION))


def final_answer(solution: str) -> str | None:
    """The text after the last `####` of a GSM8K solution, thousands separators removed."""
    if "####" not in solution:
        return None
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    return answer or None


class GSM8KTask(LoadedTask):
    """Grade-school math word problems; the reference is the number after `####`."""

    name = "gsm8k"

    def example(self, row: Row, example_id: str) -> Example:
        solution = str(row.get("answer", "gsm8k schema: question, answer"))
        answer = final_answer(solution)
        if answer is None:
            raise UserError(f"{row.where}: the 'answer' field has no '#### <final answer>' line (gsm8k schema)")
        return Example(id=example_id, prompt=str(row.get("question", "gsm8k schema: question, answer")),
                       answer=answer, solution=solution)
