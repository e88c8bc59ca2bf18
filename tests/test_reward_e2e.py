"""End to end: training on a PRM and on the PURE-style composite, then re-scoring the saved rollouts."""

import json

import pytest
from conftest import SMALL_RUN, read_metrics, run_cli

from rewardlab.cli.main import _user_error_in
from rewardlab.errors import UserError
from rewardlab.rollout import Batch
from rewardlab.scoring import score_file


@pytest.mark.slow
def test_grpo_on_the_default_prm_logs_diagnostics_to_metrics_and_wandb(tmp_path):
    run = tmp_path / "prm"
    small = [a for a in SMALL_RUN if not a.startswith("logger=")]
    done = run_cli("train", "algo=grpo", "reward=prm", *small, "logger=wandb", f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    row = read_metrics(run)[1]
    wandb_log = next((run / "wandb").glob("offline-run-*/run-*.wandb")).read_bytes()
    for key in ("reward/prm/mean", "gold/accuracy", "diag/reward_gold_corr", "diag/reward_length_corr",
                "diag/exploit_best_of_k", "diag/exploit_random", "diag/explore_distinct_correct",
                "diag/prm/step_agreement", "groups/zero_variance", "groups/repeated", "update/repeated_rows"):
        assert key in row, key
        assert key.encode() in wandb_log, f"{key} not logged to W&B"  # history keys are stored as text
    assert 0.0 <= row["diag/prm/step_agreement"] <= 1.0
    batch = Batch.load(run / "rollouts" / "iter_0001.parquet")
    assert batch.step_rewards is not None and len(batch.step_rewards) == len(batch)
    groups = batch.groups().values()  # samples that repeat an earlier one of their prompt, token for token
    assert row["groups/repeated"] == sum(len(g) - len({tuple(batch.completion_ids[i]) for i in g})
                                         for g in groups) / len(batch)


@pytest.mark.slow
def test_composite_prm_plus_verifiable_then_rescore(tmp_path):
    run = tmp_path / "pure"
    done = run_cli("train", "reward=composite", *SMALL_RUN, f"hydra.run.dir={run}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "reward/prm/mean" in read_metrics(run)[1] and "reward/verifiable/mean" in read_metrics(run)[1]
    out = tmp_path / "rescored.jsonl"
    done = run_cli("score", str(run), "reward=composite", "--output", str(out))
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    saved = [Batch.load(p) for p in sorted((run / "rollouts").glob("iter_*.parquet"))]
    assert len(rows) == sum(len(b) for b in saved)
    flat_saved = [r for b in saved for r in b.reward]
    for row, before in zip(rows, flat_saved):
        assert row["reward"] == pytest.approx(0.9 * row["rewards/prm"] + 0.1 * row["rewards/verifiable"])
        assert row["reward"] == pytest.approx(before, abs=1e-4)  # same PRM, same rollouts: same reward


def test_score_jsonl_passes_fields_through(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"id": "a", "prompt": "1+2=?\n", "completion": "1+2=3\n#### 3", "reference": "3"})
                      + "\n" + json.dumps({"id": "b", "prompt": "1+2=?\n", "completion": "#### 4", "reference": 3}) + "\n")
    out = tmp_path / "out.jsonl"
    assert score_file(source, out, ["reward=verifiable", "run.device=cpu"]) == 2
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"]
    assert [r["reward"] for r in rows] == [1.0, 0.0] and [r["rewards/verifiable"] for r in rows] == [1.0, 0.0]


def test_score_user_mistakes(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    out = tmp_path / "o.jsonl"
    with pytest.raises(UserError, match="bad.jsonl:1 needs the fields `prompt` and `completion`"):
        score_file(bad, out, [])
    with pytest.raises(Exception) as raised:  # instantiate wraps it; the CLI finds the UserError inside
        score_file(bad, out, ["reward=prm", "reward.format=shepherd"])
    assert "not a known PRM format" in str(_user_error_in(raised.value))
    with pytest.raises(UserError, match="has no rollouts"):
        score_file(tmp_path, out, [])
    done = run_cli("score", str(tmp_path / "missing.jsonl"), "--output", str(out))
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'missing.jsonl'} does not exist; give a JSONL file, a parquet file or a run directory"]
