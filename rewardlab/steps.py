"""Steps: splitting a completion into reasoning steps, shared by every process reward and by process credit.

It sits below rewards and algorithms and imports neither. `StepSplit` is the one splitter: each process
reward (rewardlab.rewards.process.ProcessReward subclasses) splits with it and
writes `batch.steps` and `batch.step_rewards`; the process advantage finds each step's last token from
those texts with `step_token_ends`, which maps character offsets to token positions by decoding prefixes
of the generated ids (correct for any tokenizer, not only one-character-per-token ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rollout import Batch


@schema("steps", "base")
@dataclass
class StepSplit:
    """How a completion is cut into steps: `newline` (each non-empty line), `blank_line`
    (paragraphs), or `regex` (split wherever `pattern` matches)."""

    mode: str = "newline"
    pattern: str = ""

    def separator(self) -> re.Pattern:
        if self.mode == "newline":
            return re.compile(r"\n")
        if self.mode == "blank_line":
            return re.compile(r"\n\s*\n")
        if self.mode == "regex":
            if not self.pattern:
                raise UserError("steps.mode=regex needs steps.pattern (a regular expression between steps)")
            return re.compile(self.pattern)
        raise UserError(f"steps.mode={self.mode!r} is not one of newline, blank_line, regex")

    def split(self, text: str) -> list[tuple[str, int]]:
        """(step text, end offset in `text`) for each non-empty step, in order; text[end-1] is its last char."""
        out: list[tuple[str, int]] = []
        start = 0
        for match in self.separator().finditer(text):
            piece = text[start : match.start()]
            if piece.strip():
                out.append((piece.strip(), start + len(piece.rstrip())))
            start = match.end()
        if text[start:].strip():
            out.append((text[start:].strip(), len(text.rstrip())))
        return out


def split_steps(text: str, split: StepSplit | None = None) -> list[str]:
    """The step texts of `text` (default: non-empty lines)."""
    return [step for step, _ in (split or StepSplit()).split(text)]


def step_char_ends(text: str, steps: Sequence[str]) -> list[int]:
    """End offset of each step in `text`, found in order (steps are stripped substrings of the text)."""
    ends, position = [], 0
    for step in steps:
        found = text.find(step, position)
        if found < 0:
            raise UserError(f"step {step[:40]!r} is not in its completion; a process reward must write "
                            f"batch.steps as substrings of the completion (use rewardlab.steps.StepSplit)")
        position = found + len(step)
        ends.append(position)
    return ends


def step_token_ends(tokenizer, ids: Sequence[int], char_ends: Sequence[int]) -> list[int]:
    """Token index of each step's last token: the first t with len(decode(ids[:t+1])) >= the step's end.

    Decoding prefixes (binary search, skip_special_tokens as the completion text was decoded) is exact for
    multi-character, byte-level and SentencePiece tokens alike; the tokenizer's re-encoding of the text is
    not used because it need not reproduce the sampled ids.
    """
    cache: dict[int, int] = {}

    def decoded(t: int) -> int:
        if t not in cache:
            cache[t] = len(tokenizer.decode(list(ids[: t + 1]), skip_special_tokens=True))
        return cache[t]

    out = []
    for end in char_ends:
        low, high = 0, len(ids) - 1
        while low < high:
            mid = (low + high) // 2
            if decoded(mid) >= end:
                high = mid
            else:
                low = mid + 1
        out.append(low)
    return out


def aggregate_steps(scores: Sequence[float], how: str, empty: float = 0.0) -> float:
    """One number from a completion's step scores (METHODS.md §2: min by default)."""
    if not scores:
        return empty
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "prod":
        out = 1.0
        for s in scores:
            out *= s
        return out
    if how == "mean":
        return sum(scores) / len(scores)
    if how == "sum":
        return sum(scores)
    raise UserError(f"reward.aggregate={how!r} is not one of min, last, prod, mean, sum")


def process_metrics(batch: Batch, wrong_below: float = 0.5) -> dict[str, float]:
    """Per-iteration process diagnostics: steps per completion, step-reward mean and per-completion min,
    and the fraction of completions whose worst step is wrong (by the gold per-step check in
    `extra['step_correct']` when the reward wrote one, else a step score below `wrong_below`)."""
    if batch.step_rewards is None:
        return {}
    rows = [r for r in batch.step_rewards if r]
    flat = [s for r in rows for s in r]
    out = {"process/steps": sum(map(len, batch.step_rewards)) / max(len(batch), 1),
           "process/no_steps": sum(not r for r in batch.step_rewards) / max(len(batch), 1)}
    if flat:
        out["process/step_reward_mean"] = sum(flat) / len(flat)
        out["process/step_reward_min"] = sum(min(r) for r in rows) / len(rows)
        out["process/step_reward_sum"] = sum(sum(r) for r in rows) / len(rows)
    correct = batch.extra.get("step_correct")
    if correct is not None:
        out["process/worst_step_wrong"] = sum(not all(c) for c in correct) / max(len(batch), 1)
    elif rows:
        out["process/worst_step_wrong"] = sum(min(r) < wrong_below for r in rows) / len(rows)
    return out
