"""No silent no-op: every reward x algorithm pairing the configs offer (conf/reward/* x conf/algo/*) runs one
iteration in-process, and each either trained (a loss logged), or skipped its update with `update/skipped`
= 1 and a warning giving the reason, or was refused at start with one line (a UserError: exit 2 from the
CLI), before any metrics row was written. `reward=orm` is given a tiny saved sequence classifier (no default model);
the paper-prompt judges fall back to the `correct` rule because the tiny policy cannot judge, and the compact-prompt
judges (tiny_judge, tiny_pairwise_judge) run on the judging tiny policy they were made for, with no fallback."""

from __future__ import annotations

import json
import warnings
from importlib import resources

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra

from rewardlab.config import register_schemas
from rewardlab.cli.main import _user_error_in
from rewardlab.run import train

from reward_fixtures import save_tiny

RUN = ["logger=none", "run.iterations=1", "run.eval_every=1", "run.eval_size=1", "run.prompts_per_iteration=4",
       "algo.samples_per_prompt=4", "run.threads=1", "run.save_rollouts=false", "run.keep_checkpoints=1"]
ARITH = ["dataset.train_size=256", "dataset.test_size=4"]  # the default splits (20,500 problems) take ~1 s to build
SETTINGS = {"judge": ["reward.fallback=correct", "reward.judge.samples=1", "reward.judge.max_new_tokens=8"],
            "pairwise_judge": ["reward.fallback=correct", "reward.judge.max_new_tokens=8"],
            "tiny_judge": ["policy=tiny_judge", "reward.judge.samples=1"],  # its config's 80-token budget
            "tiny_pairwise_judge": ["policy=tiny_judge"]}


def choices(group: str) -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("rewardlab.conf").joinpath(group).iterdir()
                  if p.name.endswith(".yaml"))


@pytest.fixture(scope="module")
def orm_model(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("orm"), "sequence", num_labels=1)


def outcome(reward: str, algo: str, run_dir, orm_model) -> str:
    """'trained', 'skipped: <reason>' or 'refused: <line>' for one pairing; fails on a silent no-op."""
    extra = SETTINGS.get(reward, []) + ([f"reward.model={orm_model}"] if reward == "orm" else [])
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"reward={reward}", f"algo={algo}", *RUN, *ARITH, *extra])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            train(cfg, run_dir)
        except Exception as exc:  # noqa: BLE001 - instantiate wraps what components raise
            exc = _user_error_in(exc)
            if exc is None:
                raise
            assert not (run_dir / "metrics.jsonl").exists(), f"{reward} x {algo} was refused only after it started"
            assert "\n" not in str(exc)
            return f"refused: {exc}"
    row = [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()][-1]
    if row.get("update/skipped") == 1.0:
        reason = row["update/skip_reason"]
        assert any(reason in str(w.message) for w in caught), f"{reward} x {algo}: skipped without a warning"
        assert "loss" not in row
        return f"skipped: {reason}"
    assert "loss" in row and row["loss"] == row["loss"], f"{reward} x {algo} trained on nothing, silently: {row}"
    return "trained"


@pytest.mark.slow
def test_every_reward_and_algorithm_trains_or_says_why_not(tmp_path, orm_model, tiny_judge_policy):
    threads = torch.get_num_threads()
    results = {}
    try:
        for reward in choices("reward"):
            for algo in choices("algo"):
                results[reward, algo] = outcome(reward, algo, tmp_path / f"{reward}-{algo}", orm_model)
    finally:
        torch.set_num_threads(threads)
    print("\n".join(f"{r} x {a}: {o}" for (r, a), o in results.items()))
    assert len(results) == len(choices("reward")) * len(choices("algo")) >= 14 * 8
    # graded rewards with no pass mark are refused by rft at start, binary ones are not
    assert results["prm", "rft"].startswith("refused: algo=rft keeps completions that pass")
    assert not results["verifiable", "rft"].startswith("refused")
    assert sum(o == "trained" for o in results.values()) > len(results) // 2


def test_more_prompts_per_iteration_than_train_rows_warns_once_at_start(tmp_path):
    rows = [{"prompt": f"{a}+{a}=", "answer": str(2 * a)} for a in range(1, 8)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:5]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[5:]))
    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            *RUN, "run.prompts_per_iteration=16", "run.iterations=2", "dataset=jsonl", "dataset.max_new_tokens=8",
            f"dataset.path={tmp_path / 'data.jsonl'}", f"dataset.test_path={tmp_path / 'test.jsonl'}",
            "dataset.prompt.chat=false", "dataset.prompt.instruction=null", "algo.samples_per_prompt=2"])
    threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg, tmp_path / "run")
    torch.set_num_threads(threads)
    repeats = [str(w.message) for w in caught if "more than the" in str(w.message)]
    assert repeats == ["run.prompts_per_iteration=16 is more than the 5 train prompts: each is drawn about 3.2 "
                       "times per iteration and its samples form one group of up to 8 completions; lower "
                       "run.prompts_per_iteration or add train prompts"]
