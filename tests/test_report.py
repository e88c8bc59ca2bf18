"""`rewardlab report`: PNG panels and report.md from metrics.jsonl, one run or a multirun overlaid."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from rewardlab.report import PANELS, series, write_report, y_scale

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(run_dir: Path, reward_slope: float, with_kl: bool = True) -> None:
    rows = [{"iteration": 0, "eval/accuracy": 0.2, "eval/length": 20.0, "time/eval": 1.0, "world_size": 2}]
    for i in range(1, 5):
        row = {"iteration": i, "reward/mean": 0.2 + reward_slope * i, "reward/verifiable/mean": 0.2 + reward_slope * i,
               "gold/accuracy": 0.2 + reward_slope * i, "length/mean": 20.0 + i, "length/max": 30.0,
               "time/generate": 2.0, "time/score": 0.1, "time/update": 1.0, "world_size": 2,
               "judge/gold_agreement": 0.8 - 0.05 * i, "pairs/chosen_reward": 4.0, "pairs/rejected_reward": 1.0 + 0.5 * i,
               "pairs/reward_margin": 3.0 - 0.5 * i}
        if with_kl:
            row["kl"] = 0.01 * i
        if i % 2 == 0:
            row.update({"eval/accuracy": 0.2 + 0.1 * i, "time/eval": 1.0})
        rows.append(row)
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_one_run_gets_every_panel_and_a_summary(tmp_path: Path):
    write_run(tmp_path / "run", 0.1)
    report = write_report(tmp_path / "run")
    assert report == tmp_path / "run" / "report" / "report.md"
    for panel in PANELS:
        png = report.parent / f"{panel.name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert matplotlib.image.imread(png).shape[1] > 500  # a real, decodable image
    text = report.read_text()
    assert "| run | 4 | 2 | 0.200 | 0.600 | 0.300 | 0.600 |" in text  # eval 0.2 -> 0.6, gold 0.3 -> 0.6
    assert "![kl](kl.png)" in text and "Not logged" not in text


def test_eval_series_skips_iterations_without_eval(tmp_path: Path):
    write_run(tmp_path / "run", 0.1)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert series(rows, "eval/accuracy") == ([0, 2, 4], [0.2, 0.4, 0.6000000000000001])


def test_multirun_overlays_jobs_labelled_by_their_overrides(tmp_path: Path):
    for num, lr, slope in ((0, "1e-4", 0.1), (1, "1e-3", -0.05)):
        job = tmp_path / str(num)
        write_run(job, slope, with_kl=False)
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["logger=none", f"algo.lr={lr}"]))
    text = write_report(tmp_path, tmp_path / "out").read_text()
    assert "Multirun of 2 jobs" in text
    assert "| 0: algo.lr=1e-4 |" in text and "| 1: algo.lr=1e-3 |" in text and "logger=none" not in text
    assert "Not logged by any job: KL to the reference policy, Proxy reward and gold accuracy against sqrt(KL)" in text
    assert not (tmp_path / "out" / "kl.png").exists() and (tmp_path / "out" / "reward.png").exists()


def test_cli_report_on_a_missing_directory_is_one_line_and_exit_2(tmp_path: Path):
    result = subprocess.run([sys.executable, "-m", "rewardlab", "report", str(tmp_path / "nope")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope'} is not a directory; pass a run dir or a multirun dir"


def test_kl_spanning_decades_goes_on_a_symlog_axis_that_keeps_zeros():
    assert y_scale([0.0, 0.01, 0.02, 0.04]) == {"value": "linear"}
    # a collapsed job's spike beside a healthy one (seen in a sweep at lr 1e-3): symlog, zeros kept
    assert y_scale([0.0, 16000.0, 0.9, 0.0, 0.01, 0.03]) == {"value": "symlog", "linthresh": 0.01}
    assert y_scale([]) == {"value": "linear"} and y_scale([0.0, 0.0]) == {"value": "linear"}


def test_a_multirun_over_seeds_averages_each_setting_with_its_range(tmp_path: Path):
    """2 settings x 3 seeds: one curve per setting (the seeds' mean, their range as a band), the table's end
    values as mean ± sd over seeds; --seeds each keeps one curve per job."""
    from rewardlab.report import band, load_runs

    num = 0
    for lr in ("1e-4", "1e-3"):
        for seed, slope in enumerate((0.1, 0.05, 0.0)):
            job = tmp_path / str(num)
            write_run(job, slope if lr == "1e-4" else -slope)
            (job / ".hydra").mkdir()
            (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"run.seed={seed}", f"algo.lr={lr}"]))
            num += 1
    runs, multirun = load_runs(tmp_path)
    assert multirun and [r.label for r in runs] == ["algo.lr=1e-4 (3 seeds)", "algo.lr=1e-3 (3 seeds)"]
    assert series(runs[0].rows, "gold/accuracy")[1][-1] == pytest.approx(0.4)  # (0.6 + 0.4 + 0.2) / 3
    assert band(runs[0], "gold/accuracy") == ([1, 2, 3, 4], [0.2, 0.2, 0.2, 0.2],
                                              pytest.approx([0.3, 0.4, 0.5, 0.6]))
    text = write_report(tmp_path, tmp_path / "out").read_text()
    assert "Multirun of 6 jobs in 2 settings" in text
    # eval 0.2 -> 0.6 on every seed; gold first 0.3/0.25/0.2, last 0.6/0.4/0.2
    assert "| algo.lr=1e-4 (3 seeds) | 4 | 2 | 0.200 ± 0.000 | 0.600 ± 0.000 | 0.250 ± 0.050 | 0.400 ± 0.200 |" in text
    assert (tmp_path / "out" / "gold_vs_proxy.png").read_bytes()[:8] == PNG_MAGIC
    each = write_report(tmp_path, tmp_path / "each", seeds="each").read_text()
    assert "Multirun of 6 jobs, curves overlaid" in each and "| 5: run.seed=2 algo.lr=1e-3 |" in each


def test_cli_report_refuses_an_unknown_seeds_mode(tmp_path: Path):
    write_run(tmp_path / "run", 0.1)
    result = subprocess.run([sys.executable, "-m", "rewardlab", "report", str(tmp_path / "run"), "--seeds", "median"],
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().startswith("error: --seeds median:"), result.stderr
