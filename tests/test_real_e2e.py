"""End to end on the tiny policy: LoRA training, and a chat-templated GSM8K-schema file."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny_chat import tiny_chat_policy
from typer.testing import CliRunner

from rewardlab.cli.main import app

DATA = Path(__file__).parent / "fixtures" / "data"
SMALL = ["logger=none", "run.iterations=2", "run.eval_size=4", "run.prompts_per_iteration=4", "run.threads=1",
         "algo.samples_per_prompt=4"]


def train(tmp_path: Path, *overrides: str) -> list[dict]:
    result = CliRunner().invoke(app, ["train", *SMALL, *overrides, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_lora_trains_end_to_end_with_kl_to_the_adapter_free_base(tmp_path):
    rows = train(tmp_path, "policy.lora.r=8", "algo.beta=0.05", "algo.lr=1e-2", "run.iterations=3")
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapters: the policy is its reference
    # an iteration whose groups all tie has no gradient and leaves LoRA's zero B untouched (KL stays 0);
    # after the first update with a gradient, the adapters have moved the policy off the base
    learned = next(i for i in (1, 2) if rows[i]["grad_norm"] > 0)
    assert rows[learned + 1]["kl"] > 0


@pytest.mark.slow
def test_chat_templated_gsm8k_file_trains_end_to_end(tmp_path):
    policy = tiny_chat_policy(tmp_path / "policy")
    rows = train(tmp_path, "dataset=gsm8k", f"dataset.path={DATA / 'gsm8k_train.jsonl'}",
                 f"dataset.test_path={DATA / 'gsm8k_test.jsonl'}", "dataset.max_new_tokens=8",
                 f"policy.path={policy}", "dataset.prompt.system=Be brief.")
    assert [r["iteration"] for r in rows] == [0, 1, 2] and "eval/accuracy" in rows[0]
    rollouts = pq.read_table(tmp_path / "run" / "rollouts" / "iter_0001.parquet").to_pylist()
    assert all(r["prompt"].startswith("<|system|>\nBe brief.\n<|user|>\n") for r in rollouts)
    assert all(r["prompt"].endswith("\\boxed{}.\n<|assistant|>\n") for r in rollouts)
    assert {r["reference"] for r in rollouts} <= {"72", "10", "5", "2000"}


def test_vllm_backend_without_vllm_is_one_line_exit_2(tmp_path):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vllm is installed here: tests/test_vllm.py exercises the backend")
    result = CliRunner().invoke(app, ["train", "generation=vllm", *SMALL, f"hydra.run.dir={tmp_path / 'run'}"])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines()[-1] == (  # after transformers' weight-loading progress bar
        "error: generation=vllm needs vLLM: pip install 'rewardlab[vllm]' on a CUDA machine; or use generation=hf")
    assert "Traceback" not in result.stderr
