"""`rewardlab eval` / `train` on local files: every row of the file is evaluated, and no train split or hub
is read when the data is local (the hub reader is replaced by one that fails the test)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardlab.cli.main import app
from rewardlab.data.files import read_rows

DATA = Path(__file__).parent / "fixtures" / "data"
QUICK = ["run.threads=1", "dataset.max_new_tokens=4", "dataset.prompt.chat=false"]


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any hub read fails the test (the data here is local)."""
    def refuse(hub_id, subset, split):
        raise AssertionError(f"the hub was asked for {hub_id} ({split})")

    monkeypatch.setattr("rewardlab.data.source.hub_rows", refuse)


def gsm8k_file(tmp_path: Path, copies: int) -> tuple[Path, int]:
    """A GSM8K-schema file of the fixture's rows repeated `copies` times, and its row count."""
    rows = [json.dumps(dict(r.values)) for r in read_rows(DATA / "gsm8k_train.jsonl")] * copies
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(rows) + "\n")
    return path, len(rows)


def evaluate(tmp_path: Path, *overrides: str) -> dict:
    result = CliRunner().invoke(app, ["eval", *QUICK, *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads((tmp_path / "run" / "eval.json").read_text())


@pytest.mark.parametrize("setting", ["dataset.path", "dataset.test_path"])
def test_eval_on_a_gsm8k_file_uses_every_row(tmp_path, setting):
    path, rows = gsm8k_file(tmp_path, copies=3)  # 12 rows: more than the default test_size would leave
    out = evaluate(tmp_path, "dataset=gsm8k", f"{setting}={path}")
    assert out["eval/size"] == rows == 12


def test_eval_on_a_jsonl_file_is_capped_by_eval_size(tmp_path):
    out = evaluate(tmp_path, "dataset=jsonl", f"dataset.path={DATA / 'custom_fields.jsonl'}",
                   "dataset.prompt_field=q", "dataset.answer_field=final")
    assert out["eval/size"] == len(read_rows(DATA / "custom_fields.jsonl")) == 5
    capped = evaluate(tmp_path, "dataset=jsonl", f"dataset.path={DATA / 'custom_fields.jsonl'}",
                      "dataset.prompt_field=q", "dataset.answer_field=final", "run.eval_size=2")
    assert capped["eval/size"] == 2


def test_eval_reads_no_train_file(tmp_path):
    out = evaluate(tmp_path, "dataset=gsm8k", f"dataset.path={tmp_path / 'missing.jsonl'}",
                   f"dataset.test_path={DATA / 'gsm8k_test.jsonl'}")
    assert out["eval/size"] == 2


def test_eval_few_shot_on_a_lone_file_is_a_user_error(tmp_path):
    result = CliRunner().invoke(app, ["eval", *QUICK, "dataset=gsm8k", f"dataset.path={DATA / 'gsm8k_test.jsonl'}",
                                      "dataset.prompt.few_shot=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert result.stderr.strip().startswith("error: dataset.prompt.few_shot takes examples from a train split")


def test_train_on_two_local_files_contacts_no_hub(tmp_path):
    result = CliRunner().invoke(app, [
        "train", *QUICK, "logger=none", "dataset=gsm8k", f"dataset.path={DATA / 'gsm8k_train.jsonl'}",
        f"dataset.test_path={DATA / 'gsm8k_test.jsonl'}", "run.iterations=1", "run.prompts_per_iteration=2",
        "algo.samples_per_prompt=2", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
