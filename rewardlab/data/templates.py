"""Prompt templates: turn a data set's raw question into the text the policy sees.

Chat mode renders the conversation with the policy tokenizer's own chat template
(`apply_chat_template`), so the same data set works with Qwen, Llama or any chat model; plain mode
writes `system`, the few-shot examples and the question as text, for base models. A data set row whose
prompt is already a conversation (TRL's conversational format: a list of `{role, content}`) is rendered
as given with the chat template.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from rewardlab.errors import UserError


@dataclass
class PromptConfig:
    """`dataset.prompt.*`: how questions are presented to the policy."""

    chat: bool = True  # render with the tokenizer's chat template (false: plain text, for base models)
    system: Optional[str] = None  # system message (plain mode: the first paragraph)
    instruction: Optional[str] = None  # added on its own line after each question, e.g. the answer format
    few_shot: int = 0  # solved train examples shown before the question (taken out of the train split)


class PromptTemplate:
    """Formats (question, few-shot examples) into one prompt string for a given tokenizer."""

    def __init__(self, chat: bool = True, system: str | None = None, instruction: str | None = None,
                 few_shot: int = 0) -> None:
        if few_shot < 0:
            raise UserError(f"dataset.prompt.few_shot={few_shot} must be >= 0")
        self.chat, self.system, self.instruction, self.few_shot = chat, system, instruction, few_shot

    def user(self, question: str) -> str:
        """The question as the user writes it: the question, then the instruction on its own line."""
        return f"{question}\n{self.instruction}" if self.instruction else question

    def messages(self, question: str, shots: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
        """The conversation for `question` after the solved `shots` ((question, solution) pairs)."""
        messages = [{"role": "system", "content": self.system}] if self.system else []
        for shot_question, solution in shots:
            messages += [{"role": "user", "content": self.user(shot_question)},
                         {"role": "assistant", "content": solution}]
        return messages + [{"role": "user", "content": self.user(question)}]

    @staticmethod
    def render(messages: list[dict[str, str]], tokenizer: Any) -> str:
        """`messages` through the policy tokenizer's chat template, ending with the assistant's turn header."""
        if getattr(tokenizer, "chat_template", None) is None:
            raise UserError("the policy's tokenizer has no chat template; set dataset.prompt.chat=false "
                            "for a plain-text prompt (base models), or use a chat model")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def format(self, question: str, shots: Sequence[tuple[str, str]], tokenizer: Any) -> str:
        """The prompt for `question` after the solved `shots` ((question, solution) pairs)."""
        if self.chat:
            return self.render(self.messages(question, shots), tokenizer)
        blocks = [self.system] if self.system else []
        blocks += [f"{self.user(q)}\n{solution}" for q, solution in shots]
        blocks.append(f"{self.user(question)}\n")
        return bos_text(tokenizer) + "\n\n".join(blocks)


def bos_text(tokenizer: Any) -> str:
    """The BOS token text when the tokenizer itself would add one (prompts are encoded without specials)."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos is None:
        return ""
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == tokenizer.bos_token_id else ""


def as_messages(value: Any, where: str) -> list[dict[str, str]] | None:
    """A conversational prompt (a list of `{role, content}` with text content) as plain dicts; None when
    `value` is not a list (a plain question). A list of anything else is a UserError naming `where`."""
    if not isinstance(value, (list, tuple)):
        return None
    messages = []
    for item in value:
        if not (isinstance(item, dict) and isinstance(item.get("role"), str) and isinstance(item.get("content"), str)):
            raise UserError(f"{where}: a prompt given as a list must be chat messages, each "
                            f"{{'role': ..., 'content': <text>}}; got {str(item)[:80]!r}")
        messages.append({"role": item["role"], "content": item["content"]})
    if not any(m["role"] == "user" for m in messages):
        raise UserError(f"{where}: the conversational prompt has no user message")
    return messages


def last_user(messages: list[dict[str, str]]) -> str:
    """The last user turn's text: the question a conversation asks."""
    return [m["content"] for m in messages if m["role"] == "user"][-1]
