"""Splitting a completion into reasoning steps, shared by every process reward and process credit.

`split_steps` returns the steps and, for each, the character offset where it ends, so a step's
score can be placed on the step's last token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rewardlab.config import schema


@schema("steps", "base")
@dataclass
class StepSplit:
    """How a completion is cut into steps: `newline` (each non-empty line), `blank_line`
    (paragraphs), or `regex` (split wherever `pattern` matches)."""

    mode: str = "newline"
    pattern: str = ""

    def split(self, text: str) -> list[tuple[str, int]]:
        """(step text, end offset in `text`) for each non-empty step, in order."""
        if self.mode == "newline":
            separator = re.compile(r"\n")
        elif self.mode == "blank_line":
            separator = re.compile(r"\n\s*\n")
        elif self.mode == "regex":
            if not self.pattern:
                raise ValueError("steps.mode=regex needs steps.pattern")
            separator = re.compile(self.pattern)
        else:
            raise ValueError(f"steps.mode={self.mode!r} is not one of newline, blank_line, regex")
        out: list[tuple[str, int]] = []
        start = 0
        for match in separator.finditer(text):
            piece = text[start : match.start()]
            if piece.strip():
                out.append((piece.strip(), match.start()))
            start = match.end()
        if text[start:].strip():
            out.append((text[start:].strip(), len(text.rstrip())))
        return out


def split_steps(text: str, split: StepSplit | None = None) -> list[str]:
    """The step texts of `text` (default: non-empty lines)."""
    return [step for step, _ in (split or StepSplit()).split(text)]
