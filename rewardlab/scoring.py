"""`rewardlab score`: score a JSONL file of {prompt, completion[, reference]} rows, or a run's saved
parquet rollouts, with any reward config; write one JSON row per input with `reward` and one
`rewards/<name>` per component.

JSONL rows are grouped by prompt text (group rewards such as majority vote see each prompt's rows
together) and tokenized with the policy's tokenizer; fields other than prompt/completion/reference
(e.g. `id`) pass through unchanged. Rollouts keep their own groups and token ids. A plain-text prompt is
taken as the raw question (rewards render it with their own templates; the policy reads it as given); a
prompt given as chat messages (TRL's conversational format) is rendered with the policy's chat template.
The policy's weights are loaded only if the reward uses them (a judge with model=self, reference
likelihood, self-certainty): a verifiable or rule-based reward needs the tokenizer alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rewardlab.config import command_schema
from rewardlab.errors import UserError
from rewardlab.io import write_text_atomic
from rewardlab.rollout import Batch

PASSED_FROM_ROLLOUTS = ("prompt_id", "prompt", "completion", "reference", "gold")


@dataclass
class ScoreRunConfig:
    device: str = "auto"
    seed: int = 0
    threads: int = 0
    verbose: bool = False  # libraries' progress bars, info logs and deprecation warnings


@dataclass
class ScoreConfig:
    run: ScoreRunConfig = field(default_factory=ScoreRunConfig)
    policy: Any = None
    reward: Any = None


command_schema("_score_schema", ScoreConfig)


class LazyPolicy:
    """Stands in for the Policy: its tokenizer and device at once, the model loaded on first use of
    anything else (then it is the real Policy's)."""

    def __init__(self, policy_cfg: DictConfig, device: str) -> None:
        from rewardlab.policy import load_tokenizer, resolve_device

        self._cfg, self._loaded = policy_cfg, None
        self.device = resolve_device(device)
        source = _tokenizer_source(policy_cfg)
        try:
            self.tokenizer = load_tokenizer(source)
        except OSError as exc:
            raise UserError(f"cannot load the policy's tokenizer from {source}: {str(exc).splitlines()[0]}; "
                            f"download it first or set policy.path=<local model directory>") from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        if self._loaded is None:
            from hydra.utils import instantiate

            self._loaded = instantiate(self._cfg, device=str(self.device))
        return getattr(self._loaded, name)


def _tokenizer_source(policy_cfg: DictConfig) -> str:
    """Where load_policy would read the tokenizer: policy.path, else policy.hub_id, else the tiny model."""
    from rewardlab.policy import _local_dir
    from rewardlab.policy.tiny import TinyBuild, ensure_tiny

    if policy_cfg.get("path"):
        return str(_local_dir(policy_cfg.path, "policy.path"))
    if policy_cfg.get("hub_id"):
        return policy_cfg.hub_id
    if policy_cfg.get("name", "tiny") == "tiny":
        tiny = policy_cfg.get("tiny")
        return str(ensure_tiny(TinyBuild(**(OmegaConf.to_container(tiny) if tiny is not None else {}))))
    raise UserError(f"policy {policy_cfg.name!r} needs policy.hub_id=<hub model id> or "
                    f"policy.path=<local model directory>")


def json_lines(path: Path) -> list[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSONL file; a line that is not JSON is a
    UserError naming the file and line."""
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number} is not valid JSON ({exc.msg}); one object per line") from exc
    if not rows:
        raise UserError(f"{path} has no rows to score")
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for number, row in json_lines(path):
        if not isinstance(row, dict) or "prompt" not in row or "completion" not in row:
            raise UserError(f"{path}:{number} needs the fields `prompt` and `completion`")
        rows.append(row)
    return rows


def batch_from_rows(rows: list[dict[str, Any]], tokenizer) -> Batch:
    """One Batch of JSONL rows, grouped by prompt text, token ids from `tokenizer`."""

    from rewardlab.data.templates import PromptTemplate, as_messages, last_user

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    messages = [as_messages(r["prompt"], f"row {n} of the input") for n, r in enumerate(rows, start=1)]
    prompts = [str(r["prompt"]) if m is None else PromptTemplate.render(m, tokenizer) for r, m in zip(rows, messages)]
    return Batch(prompt_id=list(prompts), prompt=prompts,
                 completion=[r["completion"] for r in rows], prompt_ids=[encode(p) for p in prompts],
                 completion_ids=[encode(r["completion"]) for r in rows], finish_reason=["stop"] * len(rows),
                 reference=[None if r.get("reference") is None else str(r["reference"]) for r in rows],
                 solution=[r.get("solution") for r in rows],
                 question=[str(r["prompt"]) if m is None else last_user(m) for r, m in zip(rows, messages)],
                 messages=messages)


def rollout_files(path: Path) -> list[Path]:
    """The parquet files at `path`: the file itself, or a run directory's rollouts/iter_*.parquet."""
    if path.is_file():
        return [path]
    files = sorted((path / "rollouts").glob("iter_*.parquet")) or sorted(path.glob("*.parquet"))
    if not files:
        raise UserError(f"{path} has no rollouts (rollouts/iter_*.parquet); give a run directory, a parquet "
                        f"file or a JSONL file")
    return files


def scored_rows(batch: Batch, passed: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, fields in enumerate(passed):
        row = dict(fields, reward=batch.reward[i])
        row.update({f"rewards/{name}": values[i] for name, values in batch.rewards.items()})
        if batch.step_rewards is not None:
            row["step_rewards"] = batch.step_rewards[i]
        out.append(row)
    return out


def build_reward(cfg: DictConfig) -> tuple[Any, LazyPolicy]:
    """`cfg.reward` built as training builds it (instantiated, then bound to the policy), with a LazyPolicy
    of `cfg.policy` standing in for the policy; `score` and `bench-rm` build their rewards here."""
    from hydra.utils import instantiate

    policy = LazyPolicy(cfg.policy, cfg.run.device)
    reward = instantiate(cfg.reward)
    reward.bind(policy)
    return reward, policy


def score_file(source: Path, output: Path, overrides: list[str]) -> int:
    """Score `source` with the reward composed from `overrides`; write JSONL to `output`; return rows."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rewardlab.config import register_schemas
    from rewardlab.run import setup_torch
    from rewardlab.tracking import quiet_libraries

    register_schemas()
    if not source.exists():
        raise UserError(f"{source} does not exist; give a JSONL file, a parquet file or a run directory")
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="score", overrides=overrides)
    quiet_libraries(cfg.run.verbose)
    setup_torch(cfg.run)
    reward, policy = build_reward(cfg)
    results: list[dict[str, Any]] = []
    if source.suffix in (".jsonl", ".json"):
        rows = read_jsonl(source)
        batch = batch_from_rows(rows, policy.tokenizer)
        reward.score(batch)
        results = scored_rows(batch, rows)
    else:
        for path in rollout_files(source):
            batch = Batch.load(path)
            passed = [{"source": path.name, "iteration": batch.iteration,
                       **{k: getattr(batch, k)[i] for k in PASSED_FROM_ROLLOUTS if getattr(batch, k) is not None}}
                      for i in range(len(batch))]
            batch.rewards, batch.reward, batch.step_rewards, batch.extra = {}, None, None, {}
            reward.score(batch)
            results += scored_rows(batch, passed)
    write_text_atomic(output, "".join(json.dumps(r, default=str) + "\n" for r in results))
    return len(results)
