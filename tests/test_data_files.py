"""Loading data sets from fixture files in the exact upstream schemas, and one-line errors for broken files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rewardlab.data.files import read_rows
from rewardlab.data.gsm8k import GSM8KTask
from rewardlab.data.hf import HubTask
from rewardlab.data.jsonl import FieldsTask
from rewardlab.data.math import MathTask
from rewardlab.errors import UserError
from rewardlab.policy.tiny import build_tokenizer

DATA = Path(__file__).parent / "fixtures" / "data"
PLAIN = {"chat": False}


def prepared(task):
    task.prepare(build_tokenizer())
    return task


def from_config(*overrides: str):
    """The data set as `rewardlab train` builds it (YAML + schema + instantiate), prepared with plain prompts."""
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from rewardlab.config import register_schemas

    register_schemas()
    with initialize_config_module("rewardlab.conf", version_base="1.3"):
        cfg = compose("train", [*overrides, "dataset.prompt.chat=false"])
    return prepared(instantiate(cfg.dataset))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines))
    return path


# ---- files.py -------------------------------------------------------------------------------------
def test_jsonl_json_and_parquet_give_the_same_rows_with_their_locations(tmp_path):
    rows = read_rows(DATA / "gsm8k_train.jsonl")
    (tmp_path / "g.json").write_text(json.dumps([dict(r.values) for r in rows]))
    pq.write_table(pa.Table.from_pylist([dict(r.values) for r in rows]), tmp_path / "g.parquet")
    for name in ("g.json", "g.parquet"):
        assert [dict(r.values) for r in read_rows(tmp_path / name)] == [dict(r.values) for r in rows]
    assert rows[2].where == f"{DATA / 'gsm8k_train.jsonl'}:3"
    assert read_rows(tmp_path / "g.parquet")[2].where.endswith("g.parquet row 3")


@pytest.mark.parametrize("content, expected", [
    (['{"question": "a", "answer": "#### 1"}', '{"question": "b", "answer": "#### 2"', '{}'],
     ":2: malformed JSON"),
    (['{"question": "a", "answer": "#### 1"}', '', '[1, 2]'], ":3: expected a JSON object"),
])
def test_a_malformed_line_is_named_by_file_and_line(tmp_path, content, expected):
    path = write_lines(tmp_path / "bad.jsonl", content)
    with pytest.raises(UserError) as err:
        read_rows(path)
    assert str(err.value).startswith(f"{path}{expected}")
    assert "\n" not in str(err.value)


def test_missing_empty_and_unknown_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"dataset.path=.*nope.jsonl does not exist"):
        read_rows(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(UserError, match=r"empty.jsonl: the file is empty"):
        read_rows(tmp_path / "empty.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(UserError, match=r"unknown file type '.csv'"):
        read_rows(tmp_path / "data.csv")
    (tmp_path / "latin1.jsonl").write_bytes('{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.jsonl:2: not UTF-8 text \(invalid continuation byte at byte 16\)"):
        read_rows(tmp_path / "latin1.jsonl")
    (tmp_path / "broken.parquet").write_text("not parquet")
    with pytest.raises(UserError, match=r"broken.parquet: not a readable parquet file"):
        read_rows(tmp_path / "broken.parquet")


def test_a_row_without_the_configured_field_names_file_line_and_setting(tmp_path):
    path = write_lines(tmp_path / "rows.jsonl", ['{"prompt": "1+1=?", "answer": "2"}', '{"prompt": "2+2=?"}'])
    with pytest.raises(UserError) as err:
        FieldsTask(path=str(path), test_size=1, prompt=PLAIN)
    message = str(err.value)
    assert message.startswith(f"{path}:2: row has no field 'answer' (dataset.answer_field=answer)")
    assert "fields present: prompt" in message
    path = write_lines(tmp_path / "nulls.jsonl", ['{"prompt": "1+1=?", "answer": "2"}', '{"prompt": "2+2=?", "answer": null}'])
    with pytest.raises(UserError, match=r"nulls.jsonl:2: field 'answer' is null \(dataset.answer_field=answer\)"):
        FieldsTask(path=str(path), test_size=1, prompt=PLAIN)


# ---- the four data sets ---------------------------------------------------------------------------
def test_gsm8k_reads_the_upstream_schema_and_takes_the_answer_after_hashes():
    task = from_config("dataset=gsm8k", f"dataset.path={DATA / 'gsm8k_train.jsonl'}",
                       f"dataset.test_path={DATA / 'gsm8k_test.jsonl'}")
    train, test = task.train_examples(), task.test_examples()
    assert [e.answer for e in train] == ["72", "10", "5", "2000"]  # thousands separator removed
    assert [e.answer for e in test] == ["18", "3"]
    assert train[0].solution.endswith("#### 72") and train[0].prompt.startswith("Natalia sold clips")
    assert [e.id for e in test] == ["gsm8k-test-0", "gsm8k-test-1"]
    assert task.max_new_tokens == 512


def test_gsm8k_row_without_final_answer_is_named(tmp_path):
    path = write_lines(tmp_path / "g.jsonl", [json.dumps({"question": "q", "answer": "no final line"})] * 3)
    with pytest.raises(UserError, match=r"g.jsonl:1: the 'answer' field has no '#### <final answer>'"):
        GSM8KTask(path=str(path), test_size=1)


def test_gsm8k_loads_from_the_hub_by_default(monkeypatch):
    calls = []

    def fake_load_dataset(hub_id, subset, split):
        calls.append((hub_id, subset, split))
        rows = read_rows(DATA / f"gsm8k_{split}.jsonl")
        return [dict(r.values) for r in rows]

    monkeypatch.setattr("datasets.load_dataset", fake_load_dataset)
    task = prepared(GSM8KTask(hub_id="openai/gsm8k", subset="main", prompt=PLAIN))
    assert [e.answer for e in task.test_examples()] == ["18", "3"]
    assert calls == [("openai/gsm8k", "main", "test")]  # evaluation alone reads no train split
    assert len(task.train_examples()) == 4
    assert calls == [("openai/gsm8k", "main", "test"), ("openai/gsm8k", "main", "train")]


def test_math_uses_the_boxed_answer_of_the_solution_with_nested_braces():
    task = from_config("dataset=math", f"dataset.path={DATA / 'math_train.jsonl'}", "dataset.test_size=1")
    answers = sorted(e.answer for e in [*task.train_examples(), *task.test_examples()])
    assert answers == ["4", "7", "\\frac{3}{4}"]
    assert task.answer_format == "boxed"


def test_math500_uses_its_answer_field():
    task = prepared(MathTask(path=str(DATA / "math500_test.jsonl"), test_path=str(DATA / "math500_test.jsonl"),
                             prompt=PLAIN))
    assert task.test_examples()[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert task.test_examples()[0].prompt.startswith("Convert the point $(0,3)$")


def test_math_row_without_any_answer_is_named(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [json.dumps({"problem": "p", "solution": "no box"})] * 2)
    with pytest.raises(UserError, match=r"m.jsonl:1: no final answer"):
        MathTask(path=str(path), test_size=1)


def test_jsonl_with_configured_fields_and_a_seeded_held_out_split():
    def make():
        return prepared(FieldsTask(path=str(DATA / "custom_fields.jsonl"), prompt_field="q", answer_field="final",
                                   solution_field="worked", test_size=2, prompt=PLAIN))

    task = make()
    train, test = task.train_examples(), task.test_examples()
    assert len(train) == 3 and len(test) == 2
    assert {e.prompt for e in train}.isdisjoint({e.prompt for e in test})
    example = next(e for e in [*train, *test] if e.prompt.startswith("10+5=?"))
    assert example.answer == "15" and example.solution == "10+5=15\n#### 15"
    assert [e.id for e in make().test_examples()] == [e.id for e in test]  # same seed, same split


def test_unknown_answer_format_is_a_user_error():
    with pytest.raises(UserError, match=r"dataset.answer_format='latex' is not one of auto, hash, boxed"):
        MathTask(path=str(DATA / "math_train.jsonl"), test_size=1, answer_format="latex")


def test_test_size_that_leaves_no_training_rows_is_a_user_error():
    with pytest.raises(UserError, match=r"dataset.test_size=5 must hold out"):
        FieldsTask(path=str(DATA / "custom_fields.jsonl"), prompt_field="q", answer_field="final", test_size=5)


def test_hf_loads_a_local_data_directory_through_load_dataset():
    task = prepared(HubTask(hub_id=str(DATA / "hub_dir"), prompt_field="instruction", answer_field="target",
                            prompt=PLAIN))
    assert [(e.prompt, e.answer) for e in task.train_examples()] == [("1+2=?\n", "3"), ("3+4=?\n", "7"),
                                                                     ("10+5=?\n", "15")]
    assert [e.answer for e in task.test_examples()] == ["14", "21"]


def test_hf_unknown_split_is_a_user_error():
    with pytest.raises(UserError, match=r"cannot load .*hub_dir \(validation\)"):
        HubTask(hub_id=str(DATA / "hub_dir"), prompt_field="instruction", answer_field="target",
                test_split="validation")


def test_examples_are_not_readable_before_prepare():
    task = GSM8KTask(path=str(DATA / "gsm8k_train.jsonl"), test_size=1)
    with pytest.raises(RuntimeError, match="prepare"):
        task.train_examples()


# ---- through the CLI: one line, exit code 2 ------------------------------------------------------
def test_cli_malformed_line_exits_2_with_one_line_naming_file_and_line(tmp_path):
    path = write_lines(tmp_path / "broken.jsonl", ['{"question": "q", "answer": "a\\n#### 1"}',
                                                   '{"question": "q2", "answer": "#### 2"', ''])
    result = subprocess.run(
        [sys.executable, "-m", "rewardlab", "train", "dataset=gsm8k", f"dataset.path={path}", "logger=none",
         f"hydra.run.dir={tmp_path / 'run'}"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:2: malformed JSON (Expecting ',' delimiter at column 38); each line must be one JSON object"]


def test_cli_row_missing_the_configured_field_exits_2_naming_file_and_line(tmp_path):
    from typer.testing import CliRunner

    from rewardlab.cli.main import app

    path = write_lines(tmp_path / "rows.jsonl", ['{"q": "1+1=?", "a": "2"}', '{"q": "2+2=?", "answer": "4"}'])
    result = CliRunner().invoke(app, ["train", "dataset=jsonl", f"dataset.path={path}", "dataset.prompt_field=q",
                                      "dataset.answer_field=a", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {path}:2: row has no field 'a' (dataset.answer_field=a); fields present: answer, q"]
