"""Reward-model training data for `rewardlab train-rm`, read and checked row by row before anything is
written: TRL's stepwise-supervision rows (PRM), TRL's preference rows or a run's rollouts (ORM), and the
held-out split by prompt. A bad row is refused with one line naming the file and the row."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable

from rewardlab.errors import UserError


def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-empty line; a line that is no JSON object is named."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number} is not valid JSON ({exc.msg}); one object per line") from None
        if not isinstance(row, dict):
            raise UserError(f"{path}:{number} is not a JSON object")
        rows.append((number, row))
    return rows


def data_path(data: str | None, inside: str) -> Path:
    """`rm.data` as an existing path (a directory stays a directory); `inside` names what a directory holds."""
    if not data:
        raise UserError(f"train-rm needs rm.data=<a JSONL file or {inside}>")
    path = Path(data).expanduser()
    if not path.exists():
        raise UserError(f"rm.data={data} does not exist; give a JSONL file or {inside}")
    return path


def read_stepwise(data: str | None) -> list[dict]:
    """{prompt, steps, labels} from TRL's stepwise rows (`prompt`, `completions`, `labels`; other fields such
    as `soft_labels` are ignored), in a file or a `rewardlab label` run directory's labels.jsonl."""
    path = data_path(data, "a `rewardlab label` run directory")
    if path.is_dir():
        path = path / "labels.jsonl"
        if not path.exists():
            raise UserError(f"rm.data={data} has no labels.jsonl; give a labels file or a label run directory")
    rows = []
    for number, row in read_jsonl(path):
        steps, labels = row.get("completions"), row.get("labels")
        if not isinstance(row.get("prompt"), str) or not isinstance(steps, list) or not isinstance(labels, list):
            raise UserError(f"{path}:{number} needs `prompt` (text), `completions` (list of steps) and "
                            f"`labels` (list of booleans): TRL's stepwise-supervision format")
        if len(labels) != len(steps):
            raise UserError(f"{path}:{number}: `labels` has {len(labels)} entries but `completions` has "
                            f"{len(steps)} steps; give one label per step")
        if not all(isinstance(s, str) for s in steps) or not all(y in (True, False) for y in labels):
            raise UserError(f"{path}:{number}: `completions` must be strings and `labels` booleans")
        if steps:
            rows.append({"prompt": row["prompt"], "steps": steps, "labels": [bool(y) for y in labels]})
    if not rows:
        raise UserError(f"{path} has no row with steps to train on")
    return rows


def read_preferences(data: str | None, pairs_per_prompt: int, seed: int) -> list[dict]:
    """{messages, chosen, rejected} from TRL's preference rows, or pairs from a run directory's rollouts."""
    path = data_path(data, "a `rewardlab train` run directory")
    rows = pairs_from_rollouts(path, pairs_per_prompt, seed) if path.is_dir() else _preference_file(path)
    if not rows:
        raise UserError(f"rm.data={data} gives no (chosen, rejected) pair to train on")
    return rows


def _reply(value: Any, where: str) -> str:
    """A preference side as text: a string, or a conversational list whose last message is the reply."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and isinstance(value[-1], dict) and "content" in value[-1]:
        return value[-1]["content"]
    raise UserError(f"{where}: `chosen` and `rejected` must be text or a list of messages")


def _preference_file(path: Path) -> list[dict]:
    """TRL's preference format, standard (text) or conversational (lists of messages)."""
    rows = []
    for number, row in read_jsonl(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in row]
        if missing:
            raise UserError(f"{path}:{number} has no `{missing[0]}`; preference rows need `prompt`, `chosen` and "
                            f"`rejected` (TRL's preference format)")
        prompt, where = row["prompt"], f"{path}:{number}"
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "content" in m for m in messages):
            raise UserError(f"{where}: `prompt` must be text or a list of messages")
        rows.append({"messages": [{"role": m.get("role", "user"), "content": m["content"]} for m in messages],
                     "chosen": _reply(row["chosen"], where), "rejected": _reply(row["rejected"], where)})
    return rows


def pairs_from_rollouts(run_dir: Path, pairs_per_prompt: int, seed: int) -> list[dict]:
    """Each prompt's distinct correct and incorrect completions (by `gold`) across the run's rollouts,
    paired: at most `pairs_per_prompt` of the (correct, incorrect) combinations, drawn with `seed`."""
    from rewardlab.rollout import Batch

    files = sorted((run_dir / "rollouts").glob("iter_*.parquet"))
    if not files:
        raise UserError(f"rm.data={run_dir} has no rollouts/iter_*.parquet; give a preference JSONL file or a "
                        f"`rewardlab train` run directory")
    groups: dict[str, tuple[list, set, set]] = {}
    for file in files:
        batch = Batch.load(file)
        if batch.gold is None:
            raise UserError(f"{file} has no gold column (its data set has no references); pairs need it")
        for i, gold in enumerate(batch.gold):
            if gold is not None:
                messages = batch.conversation(i)
                entry = groups.setdefault(json.dumps(messages), (messages, set(), set()))
                entry[1 if gold else 2].add(batch.completion[i])
    rng, rows = random.Random(seed), []
    for messages, right, wrong in groups.values():
        pairs = [(c, r) for c in sorted(right) for r in sorted(wrong)]
        rows += [{"messages": messages, "chosen": c, "rejected": r}
                 for c, r in rng.sample(pairs, min(pairs_per_prompt, len(pairs)))]
    return rows


def split_by_prompt(rows: list, key: Callable[[Any], str], fraction: float, seed: int) -> tuple[list, list]:
    """(train, held out): a `fraction` of the distinct prompts (at least one when fraction > 0) with all
    their rows held out, so the held-out accuracy is measured on prompts never trained on."""
    if not 0.0 <= fraction < 1.0:
        raise UserError(f"rm.eval_fraction={fraction} must be in [0, 1)")
    prompts = sorted({key(r) for r in rows})
    random.Random(seed).shuffle(prompts)
    held = set(prompts[: max(1, round(fraction * len(prompts)))] if fraction > 0 and len(prompts) > 1 else [])
    return [r for r in rows if key(r) not in held], [r for r in rows if key(r) in held]
