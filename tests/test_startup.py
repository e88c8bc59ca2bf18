"""The CLI starts without the heavy libraries: `--help`, `configs` and argument errors import no torch."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "trl", "deepspeed", "datasets", "accelerate", "peft")


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_cli_imports_no_torch():
    assert _imported_after("import rewardlab.cli.main") == []


@pytest.mark.parametrize("args", [["--help"], ["configs"], ["nosuch"], ["score"]])
def test_help_configs_and_argument_errors_answer_without_torch(args):
    code = ("from rewardlab.cli.main import app\n"
            f"try:\n    app({args!r})\nexcept SystemExit as stop:\n    assert stop.code in (0, 2), stop.code")
    assert _imported_after(code) == []


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "rewardlab", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in ("train", "eval", "score", "configs", "export"))


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_deepspeed_still_learns_it_runs_on_the_cpu_before_it_is_imported():
    code = ("import os, rewardlab, torch\n"
            "assert 'DS_ACCELERATOR' not in os.environ\n"
            "import deepspeed\n"
            "print(os.environ.get('DS_ACCELERATOR'), torch.cuda.is_available())")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    accelerator, cuda = done.stdout.strip().splitlines()[-1].split()
    assert accelerator == ("None" if cuda == "True" else "cpu")
    assert "Setting ds_accelerator" not in done.stdout
