"""`rewardlab bench-rm` with bench=pairs and bench=process: RewardBench / ProcessBench files read in their hub
schemas, the metrics on hand-computed examples, and bad input refused with one line and nothing left behind."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rewardlab.errors import UserError
from rewardlab.rmlab.bench_pairs import pair_accuracy, read_pairs
from rewardlab.rmlab.bench_process import first_error, processbench_f1, read_processbench
from tests.conftest import REPO, run_cli

FIXTURES = REPO / "tests" / "fixtures"
PAIRS = FIXTURES / "rewardbench_pairs.jsonl"  # RewardBench's fields: prompt chosen chosen_model rejected rejected_model subset id
PROCESS = FIXTURES / "processbench_arith.jsonl"  # ProcessBench's fields, plus `reference` for arith_steps' final line


def bench(tmp_path: Path, *overrides: str) -> tuple[dict, Path]:
    """Run bench-rm in process (composed like the CLI) into tmp_path/run; (bench.json, run dir)."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rewardlab.config import register_schemas
    from rewardlab.rmlab.bench import run_bench

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="bench_rm", overrides=["logger=none", "run.threads=1", *overrides])
    run_dir = tmp_path / "run"
    result = run_bench(cfg, run_dir)
    assert json.loads((run_dir / "bench.json").read_text()) == json.loads(json.dumps(result))
    return result, run_dir


def test_pair_accuracy_by_hand():
    metrics, rows = pair_accuracy([2.0, 1.0, 3.0, math.nan, 5.0, math.inf],
                                  [1.0, 2.0, 3.0, 0.0, 4.0, 1.0], ["a", "a", "b", "b", "b", "c"])
    # a: win, loss -> 0.5; b: tie (0.5), NaN (0), win (1) -> 0.5; c: inf is not finite -> 0
    assert metrics["pairs/accuracy/a"] == 0.5 and metrics["pairs/accuracy/b"] == 0.5
    assert metrics["pairs/accuracy/c"] == 0.0
    assert metrics["pairs/accuracy"] == pytest.approx(2.5 / 6)
    assert metrics["pairs/ties"] == 1 and metrics["pairs/nonfinite"] == 2 and metrics["pairs/rows"] == 6
    assert [r["subset"] for r in rows] == ["a", "b", "c", "all"]
    metrics, rows = pair_accuracy([1.0], [0.0])  # no subsets: the overall row only
    assert metrics == {"pairs/accuracy": 1.0, "pairs/rows": 1.0, "pairs/ties": 0.0, "pairs/nonfinite": 0.0}
    assert len(rows) == 1


def test_processbench_f1_by_hand():
    assert first_error([0.9, 0.4, 0.1], 0.5) == 1
    assert first_error([0.9, 0.5], 0.5) == -1  # below the threshold, not at it
    assert first_error([0.9, math.nan], 0.5) == 1
    assert first_error([0.9, 0.6], 0.7) == 1
    # erroneous rows: labels 2, 0, 1 predicted 2, 0, -1 -> 2/3; correct rows: predicted -1, 3 -> 1/2
    m = processbench_f1([2, 0, -1, -1, 3], [2, 0, 1, -1, -1])
    assert m["process/acc_error"] == pytest.approx(2 / 3) and m["process/acc_correct"] == 0.5
    assert m["process/f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))
    assert (m["process/erroneous"], m["process/correct"]) == (3, 2)
    zero = processbench_f1([0, 0], [1, -1])
    assert zero["process/f1"] == 0.0
    assert math.isnan(processbench_f1([1], [1])["process/f1"])  # no correct rows: F1 is undefined


def test_hub_schemas_read_exactly(tmp_path):
    rows = read_pairs(PAIRS)
    assert set(rows[0]) == {"prompt", "chosen", "chosen_model", "rejected", "rejected_model", "subset", "id"}
    rows = read_processbench(PROCESS)
    assert [r["label"] for r in rows] == [-1, 0, 1, 2, 0, -1]
    hub = {"id": "gsm8k-0", "generator": "Qwen2-7B-Instruct", "problem": "Sue lives...", "steps": ["a", "b"],
           "final_answer_correct": False, "label": 1}  # Qwen/ProcessBench's row, field for field
    (tmp_path / "pb.jsonl").write_text(json.dumps(hub) + "\n")
    assert read_processbench(tmp_path / "pb.jsonl") == [hub]
    (tmp_path / "rb.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n")
    assert read_pairs(tmp_path / "rb.jsonl")[0]["rejected"] == "r"


@pytest.mark.parametrize("row, message", [
    ({"problem": "p", "steps": ["a", "b"], "label": 2}, "pb.jsonl:2: `label` 2 is past its last step"),
    ({"problem": "p", "steps": ["a"], "label": -2}, "pb.jsonl:2: `label` -2 must be a step index"),
    ({"problem": "p", "steps": "a\nb", "label": 0}, "pb.jsonl:2: `steps` must be a non-empty list"),
    ({"problem": "p", "label": 0}, "pb.jsonl:2 has no `steps` field"),
])
def test_processbench_bad_rows_name_file_and_line(tmp_path, row, message):
    good = {"problem": "p", "steps": ["a"], "label": -1}
    (tmp_path / "pb.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(UserError, match=message):
        read_processbench(tmp_path / "pb.jsonl")


def test_pairs_bench_on_a_rewardbench_file(tmp_path, capsys):
    """reward=length prefers the shorter response (the tiny tokenizer is one token per character): by hand,
    `short` has a win and a loss (0.5), `tie` a tie and a win (0.75), overall 2.5 / 4."""
    result, run_dir = bench(tmp_path, "bench=pairs", f"bench.data={PAIRS}", "reward=length")
    m = result["metrics"]
    assert (m["pairs/accuracy"], m["pairs/accuracy/short"], m["pairs/accuracy/tie"]) == (0.625, 0.5, 0.75)
    assert m["pairs/ties"] == 1 and m["pairs/nonfinite"] == 0 and m["pairs/rows"] == 4
    assert [r["subset"] for r in result["rows"]] == ["short", "tie", "all"]
    scored = [json.loads(line) for line in (run_dir / "scored.jsonl").read_text().splitlines()]
    assert scored[0]["chosen_score"] > scored[0]["rejected_score"] and scored[0]["id"] == 0
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["pairs/accuracy"] == 0.625
    out = capsys.readouterr().out
    assert "short" in out and "0.6250" in out


def test_process_bench_exact_biased_and_threshold(tmp_path):
    """The exact checker finds every labelled first error (F1 1); the biased checker gives wrong but tidy
    lines 0.8, so at threshold 0.5 it misses pb-1, pb-3 (no error found) and pb-4 (one step late):
    acc_error 1/4, acc_correct 2/2, F1 0.4; at threshold 0.9 the tidy lines count as wrong again."""
    exact, _ = bench(tmp_path / "exact", "bench=process", f"bench.data={PROCESS}", "reward=arith_steps")
    assert exact["metrics"]["process/f1"] == 1.0
    biased, run_dir = bench(tmp_path / "biased", "bench=process", f"bench.data={PROCESS}", "reward=arith_steps_biased")
    m = biased["metrics"]
    assert (m["process/acc_error"], m["process/acc_correct"], m["process/f1"]) == (0.25, 1.0, pytest.approx(0.4))
    predictions = [json.loads(line)["prediction"] for line in (run_dir / "scored.jsonl").read_text().splitlines()]
    assert predictions == [-1, -1, 1, -1, 1, -1]
    strict, _ = bench(tmp_path / "strict", "bench=process", f"bench.data={PROCESS}",
                      "reward=arith_steps_biased", "bench.threshold=0.9")
    assert strict["metrics"]["process/f1"] == 1.0


def test_process_bench_builds_a_reusable_arith_file(tmp_path):
    """bench.data=arith: the policy's test-split samples labelled by the exact checker, so the checker
    itself scores every side it has at 1.0, and the written file gives the same result when read back."""
    built, run_dir = bench(tmp_path / "built", "bench=process", "bench.data=arith", "reward=arith_steps",
                           "bench.prompts=3", "bench.samples_per_prompt=3")
    file = run_dir / "processbench_arith.jsonl"
    rows = read_processbench(file)
    assert {"id", "generator", "problem", "steps", "final_answer_correct", "label"} <= set(rows[0])
    assert len(rows) == built["metrics"]["process/erroneous"] + built["metrics"]["process/correct"]
    test_prompts = {r["problem"] for r in rows}
    from rewardlab.data.arith import ArithTask

    assert test_prompts <= {e.prompt for e in ArithTask().test_examples()[:3]}
    for key in ("process/acc_error", "process/acc_correct"):
        assert built["metrics"][key] == 1.0 or math.isnan(built["metrics"][key])
    again, _ = bench(tmp_path / "again", "bench=process", f"bench.data={file}", "reward=arith_steps")
    assert {k: v for k, v in again["metrics"].items() if k != "time/bench"} == pytest.approx(
        {k: v for k, v in built["metrics"].items() if k != "time/bench"}, nan_ok=True)


def test_process_bench_train_split_samples_the_problems_label_never_reaches(tmp_path):
    """bench.split=train: the last bench.prompts problems of the train split (`rewardlab label` takes the
    first ones), none of the test split's; an unknown split is refused."""
    from rewardlab.data.arith import ArithTask

    built, run_dir = bench(tmp_path / "built", "bench=process", "bench.data=arith", "reward=arith_steps",
                           "bench.split=train", "bench.prompts=3", "bench.samples_per_prompt=2")
    problems = {r["problem"] for r in read_processbench(run_dir / "processbench_arith.jsonl")}
    task = ArithTask()
    assert problems and problems <= {e.prompt for e in task.train_examples()[-3:]}
    assert not problems & {e.prompt for e in task.test_examples()}
    with pytest.raises(UserError, match="bench.split='dev' is not one of test, train"):
        bench(tmp_path / "bad", "bench=process", "bench.data=arith", "reward=arith_steps", "bench.split=dev")


def test_a_missing_file_is_named_and_leaves_no_run_dir(tmp_path):
    with pytest.raises(UserError, match="bench.data=.*nowhere.jsonl: no such file"):
        bench(tmp_path, "bench=process", f"bench.data={tmp_path / 'nowhere.jsonl'}", "reward=arith_steps")
    assert not (tmp_path / "run").exists()


def test_process_bench_refuses_a_reward_without_step_scores(tmp_path):
    with pytest.raises(UserError, match="reward 'length' .* gives no step scores"):
        bench(tmp_path, "bench=process", f"bench.data={PROCESS}", "reward=length")
    assert not (tmp_path / "run").exists()


def test_bench_yamls_name_their_choice():
    for path in sorted((REPO / "conf" / "bench").glob("*.yaml")):
        assert f"\nname: {path.stem}\n" in path.read_text(), path


@pytest.mark.parametrize("bench_choice, content, message", [
    ("pairs", '{"prompt": "p", "chosen": "c", "rejected": "r"}\n{"prompt": "p", "chosen": "c"}\n',
     "bad.jsonl:2 has no `rejected` field"),
    ("process", '{"problem": "p", "steps": ["a", "b"], "label": 5}\n', "bad.jsonl:1: `label` 5 is past its last step"),
])
def test_cli_bad_input_one_line_exit_2_nothing_left(tmp_path, bench_choice, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    run_dir = tmp_path / "run"
    done = run_cli("bench-rm", f"bench={bench_choice}", f"bench.data={data}", "reward=arith_steps", "logger=none",
                   f"hydra.run.dir={run_dir}")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr
    assert not run_dir.exists()


def test_cli_prints_the_table_then_the_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli("bench-rm", "bench=pairs", f"bench.data={PAIRS}", "reward=length", "logger=none",
                   f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == f"run dir: {run_dir}" and any("0.6250" in line for line in lines)
    assert json.loads((run_dir / "bench.json").read_text())["metrics"]["pairs/accuracy"] == 0.625
    assert (run_dir / "config.yaml").exists() and (run_dir / "metrics.jsonl").exists()


@pytest.mark.slow
def test_process_bench_thresholds_a_prm_on_its_probability_whatever_its_scale(tmp_path):
    """reward.scale=signed maps p to 2p - 1 for training; the bench's threshold stays on p, so the signed
    PRM finds the same first errors as the plain one (0.5 would otherwise flag every step below p = 0.75)."""
    plain, plain_dir = bench(tmp_path / "prob", "bench=process", f"bench.data={PROCESS}", "reward=prm")
    signed, signed_dir = bench(tmp_path / "signed", "bench=process", f"bench.data={PROCESS}", "reward=prm",
                               "reward.scale=signed")

    def scored(run_dir):
        return [json.loads(line) for line in (run_dir / "scored.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in scored(plain_dir)] == [r["prediction"] for r in scored(signed_dir)]
    assert all(0.0 <= s <= 1.0 for r in scored(signed_dir) for s in r["step_scores"])
    assert signed["metrics"]["process/f1"] == plain["metrics"]["process/f1"]
