"""Tasks: prompts, references and answer formats (arith is embedded; others load from files or the hub)."""

from rewardlab.data.base import Example, PromptSampler, Task

__all__ = ["Example", "PromptSampler", "Task"]
