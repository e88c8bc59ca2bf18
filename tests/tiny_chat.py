"""Test helpers: the tiny tokenizer with a chat template, and a copy of the tiny policy that has one."""

from __future__ import annotations

import shutil
from pathlib import Path

from rewardlab.policy.tiny import TinyBuild, build_tokenizer, ensure_tiny

# ChatML-like, as Qwen's: role headers, then the assistant header when a reply is wanted.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def chat_tokenizer():
    """The tiny character tokenizer with CHAT_TEMPLATE set."""
    tokenizer = build_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_chat_policy(directory: Path) -> Path:
    """A copy of the cached tiny policy whose tokenizer carries CHAT_TEMPLATE (for `policy.path=`)."""
    shutil.copytree(ensure_tiny(TinyBuild()), directory)
    tokenizer = chat_tokenizer()
    tokenizer.save_pretrained(directory)
    return directory
