"""`rewardlab label`: Monte-Carlo step labels on a hand-built case whose continuations are known (mc and
OmegaPRM binary search), the labels file's TRL stepwise schema, and resuming an interrupted real run."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from rewardlab.cli.main import app
from rewardlab.data.base import Example
from rewardlab.errors import UserError
from rewardlab.rmlab.label import Labeller, LabelSettings, read_rows, resume_point, solution_of
from rewardlab.steps import StepSplit

PROMPT = "2+3+4=?\n"
EXAMPLE = Example(id="case", prompt=PROMPT, answer="9")
SAMPLES = [("2+3=5\n5+4=9\n#### 9", "stop"),  # right throughout
           ("2+3=5\n5+4=8\n#### 8", "stop"),  # first wrong step: the second
           ("2+3=6\n6+4=10\n#### 10", "stop"),  # first wrong step: the first
           ("2+3=5\n5+4", "length")]  # cut off by the budget: its end is not known from the text
CONTINUATIONS = {  # every continuation of each prefix; rollouts cycle through them
    "2+3=5\n": ["5+4=9\n#### 9", "5+4=8\n#### 8"],
    "2+3=5\n5+4=9\n": ["#### 9"],
    "2+3=5\n5+4=8\n": ["#### 8"],
    "2+3=6\n": ["6+4=10\n#### 10"],
    "2+3=6\n6+4=10\n": ["#### 10"],
    "2+3=5\n5+4": ["=9\n#### 9"],
}


class StubGenerator:
    """A policy stand-in: the bare prompt gives SAMPLES, a prefix gives its CONTINUATIONS in turn."""

    def __init__(self) -> None:
        self.rows = 0

    def generate(self, prompts, n=1, sampling=None, greedy=False):
        completion, finish = [], []
        for example in prompts:
            assert example.prompt.startswith(PROMPT) and example.answer == "9"
            tail = example.prompt[len(PROMPT):]
            if not tail:
                assert n == len(SAMPLES)
                completion += [text for text, _ in SAMPLES]
                finish += [reason for _, reason in SAMPLES]
            else:
                completion += [CONTINUATIONS[tail][i % len(CONTINUATIONS[tail])] for i in range(n)]
                finish += ["stop"] * n
        self.rows += len(completion)
        return SimpleNamespace(completion=completion, finish_reason=finish)


def labelled(method: str) -> tuple[list[dict], int]:
    stub = StubGenerator()
    settings = LabelSettings(samples_per_prompt=len(SAMPLES), rollouts=4, method=method)
    rows = Labeller(stub, settings, answer_format="hash").label(EXAMPLE)
    return rows, stub.rows - len(SAMPLES)


def test_prefixes_keep_the_separator_and_a_cut_off_end_is_continued_as_is():
    solution = solution_of("2+3=5\n\n5+4=9\n#### 9", True, True, StepSplit())
    assert solution.steps == ["2+3=5", "5+4=9", "#### 9"]
    assert solution.prefixes == ["2+3=5\n\n", "2+3=5\n\n5+4=9\n", "2+3=5\n\n5+4=9\n#### 9"]


def test_mc_labels_of_the_hand_built_case():
    rows, spent = labelled("mc")
    assert [r["soft_labels"] for r in rows] == [[0.5, 1.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 1.0]]
    assert [r["labels"] for r in rows] == [[True, True, True], [True, False, False], [False, False, False],
                                          [True, True]]
    assert [r["rollouts"] for r in rows] == [8, 8, 8, 8]  # a finished last step is its own outcome: no rollouts
    assert spent == 32


def test_binary_search_finds_the_same_first_errors_with_fewer_rollouts():
    mc, mc_spent = labelled("mc")
    rows, spent = labelled("binary_search")
    assert [r["labels"] for r in rows] == [r["labels"] for r in mc]
    assert [r["rollouts"] for r in rows] == [0, 8, 4, 8]  # a right finished solution is searched no further
    assert spent == sum(r["rollouts"] for r in rows) == 20 < mc_spent
    # measured where rolled out; inferred (hard label as 0/1) where the search skipped the prefix
    assert [r["soft_labels"] for r in rows] == [[1.0, 1.0, 1.0], [0.5, 0.0, 0.0], [0.0, 0.0, 0.0], [0.5, 1.0]]


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="label.method"):
        Labeller(StubGenerator(), LabelSettings(method="beam"), "hash")
    with pytest.raises(UserError, match="label.rollouts"):
        Labeller(StubGenerator(), LabelSettings(rollouts=0), "hash")


def test_a_cut_off_last_line_and_the_last_prompt_are_dropped_on_resume(tmp_path):
    rows = [{"prompt_index": i, "sample": j} for i in range(3) for j in range(2)]
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt_index": 3, "sam')
    assert read_rows(path) == rows
    assert resume_point(path, prompts=5) == 2  # prompt 2 may be incomplete: it is labelled again
    assert read_rows(path) == rows[:4] and path.read_text().endswith("\n")
    with pytest.raises(UserError, match="label.prompts >= 2"):
        resume_point(path, prompts=1)
    assert read_rows(path) == rows[:4]  # refused: the file as it was


TINY = ["run.threads=1", "label.samples_per_prompt=2", "label.rollouts=2", "dataset.max_new_tokens=24"]


def label_cli(run_dir: Path, *overrides: str):
    return CliRunner().invoke(app, ["label", *TINY, *overrides, f"hydra.run.dir={run_dir}"])


def test_label_on_the_tiny_policy_writes_trl_stepwise_rows_and_resumes_without_duplicates(tmp_path):
    run_dir = tmp_path / "run"
    result = label_cli(run_dir, "label.prompts=3")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    assert result.stdout.strip().splitlines()[-1] == f"run dir: {run_dir}"
    path = run_dir / "labels.jsonl"
    whole = path.read_text()
    rows = read_rows(path)
    assert rows and {r["prompt_index"] for r in rows} == {0, 1, 2}
    for row in rows:  # TRL's stepwise supervision: prompt, completions (steps), labels (bools) of one length
        assert isinstance(row["prompt"], str) and row["prompt"].endswith("=?\n")
        assert row["completions"] and all(isinstance(s, str) and s for s in row["completions"])
        assert len(row["labels"]) == len(row["soft_labels"]) == len(row["completions"])
        assert all(isinstance(x, bool) for x in row["labels"])
        assert all(0.0 <= s <= 1.0 and (s > 0) == x for s, x in zip(row["soft_labels"], row["labels"]))
        assert isinstance(row["reference"], str)
    summary = json.loads((run_dir / "summary.json").read_text())["final"]
    steps = sum(len(r["labels"]) for r in rows)
    assert summary["label/steps"] == steps and summary["label/rows"] == len(rows)
    assert summary["label/agree_hard_steps"] / steps == pytest.approx(summary["label/agreement_hard"])

    # interrupted while labelling prompt 2: its rows partly written, the last line cut short
    kept = [line for line, row in zip(whole.splitlines(), rows) if row["prompt_index"] < 2]
    partial = [line for line, row in zip(whole.splitlines(), rows) if row["prompt_index"] == 2][0]
    path.write_text("".join(line + "\n" for line in kept) + partial[: len(partial) // 2])
    changed = label_cli(run_dir, "label.prompts=3", "label.rollouts=3")
    assert changed.exit_code == 2 and "other settings" in changed.stderr
    resumed = label_cli(run_dir, "label.prompts=3")
    assert resumed.exit_code == 0, (resumed.stdout, resumed.stderr, resumed.exception)
    assert path.read_text() == whole  # no duplicates, the rows an uninterrupted run wrote
    assert "label/resumed_at_prompt: 1" in resumed.stdout
