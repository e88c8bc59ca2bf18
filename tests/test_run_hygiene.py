"""A run never misleads: a refused run changes nothing on disk, a sweep keeps each job's own overrides,
a finished run can be extended, an early error leaves no directory, the final model is a plain model
directory (and exports), W&B follows its own credentials and environment, `score` loads no weights it
does not need, and errors name the key the user set."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from conftest import read_metrics, run_cli
from rewardlab.errors import UserError

SMALL = ["run.iterations=2", "run.eval_every=2", "run.eval_size=16", "run.prompts_per_iteration=4", "run.threads=1"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file (by content) and symlink (by target) under `root`."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = "-> " + os.readlink(path)
        elif path.is_file():
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def sweep(tiny_policy, tmp_path_factory) -> Path:
    """A one-job sweep (2 iterations, W&B offline) at lr 1e-4: job 0 holds a finished run."""
    sweep_dir = tmp_path_factory.mktemp("sweep")
    result = run_cli("train", "-m", *SMALL, "logger=wandb", "algo.lr=1e-4", f"hydra.sweep.dir={sweep_dir}")
    assert result.returncode == 0, result.stderr
    return sweep_dir


@pytest.mark.slow
def test_refused_reruns_change_nothing_and_the_sweep_keeps_each_jobs_overrides(sweep: Path):
    job = sweep / "0"
    before = snapshot(job)
    assert ".hydra/overrides.yaml" in before and "final/model.safetensors" in before
    refused = [("train", "-m", *SMALL, "logger=wandb", "algo.lr=0.5", f"hydra.sweep.dir={sweep}"),
               ("train", *SMALL, "logger=wandb", "algo=rft", f"hydra.run.dir={job}"),
               ("train", f"resume={job}", "algo.lr=0.5"),
               ("train", f"resume={job}", "run.iterations=1")]
    for args in refused:
        result = run_cli(*args)
        assert result.returncode == 2 and result.stderr.count("error:") == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert snapshot(job) == before
    summary = run_cli("sweep-summary", str(sweep))
    assert "algo.lr=0.0001" in summary.stdout and "algo.lr=0.5" not in summary.stdout


@pytest.mark.slow
def test_extending_a_finished_run_keeps_its_rows_and_adds_the_new_ones(sweep: Path, tmp_path: Path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    shutil.copytree(sweep / "0", run_dir, symlinks=True)
    original = read_metrics(run_dir)
    result = run_cli("train", f"resume={run_dir}", "run.iterations=4")
    assert result.returncode == 0, result.stderr
    rows = read_metrics(run_dir)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3, 4] and rows[:3] == original
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["iterations"] == 4
    assert "run.iterations=4" in yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    assert json.loads((run_dir / "summary.json").read_text())["iterations_completed"] == 5
    # one W&B run across both sessions, and the last message names every directory it wrote
    run_id = (run_dir / "wandb_id").read_text().strip()
    sessions = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}*"))
    assert len(sessions) == 2 and f"wandb sync --id {run_id}" in result.stderr
    assert all(str(s) in result.stderr for s in sessions)

    final = AutoModelForCausalLM.from_pretrained(run_dir / "final").state_dict()
    latest = AutoModelForCausalLM.from_pretrained(run_dir / "checkpoints" / "latest").state_dict()
    assert (run_dir / "checkpoints" / "latest").resolve().parent.name == "iter_0004"
    assert final.keys() == latest.keys() and all(torch.equal(final[k], latest[k]) for k in final)
    exported = run_cli("export", str(run_dir), "--out", str(tmp_path / "model"))
    assert exported.returncode == 0, exported.stderr
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "model").state_dict()
    assert all(torch.equal(model[k], final[k]) for k in final)
    assert (tmp_path / "model" / "tokenizer.json").exists()
    again = run_cli("export", str(run_dir), "--out", str(tmp_path / "model"))
    assert again.returncode == 2 and "not empty" in again.stderr


def test_an_error_while_setting_up_leaves_no_run_directory(tiny_policy, tmp_path: Path):
    run_dir = tmp_path / "run"
    result = run_cli("train", "logger=none", "algo=dpo", "reward=orm", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "reward=orm needs reward.model" in result.stderr, result.stderr
    assert not run_dir.exists()


@pytest.mark.parametrize("command", ["eval", "label"])
def test_eval_and_label_refused_in_their_task_leave_no_run_directory(command: str, tmp_path: Path):
    """The policy is checked inside the Hydra task, after Hydra made the run directory: it goes again."""
    run_dir = tmp_path / "run"
    result = run_cli(command, f"policy.path={tmp_path / 'missing'}", f"hydra.run.dir={run_dir}")
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not run_dir.exists()


def test_a_failure_after_the_run_started_names_the_run_dir(tmp_path: Path, capsys):
    from rewardlab.run import Launch

    launch = Launch()
    launch.accept(tmp_path, main=True)  # empty: the directory Hydra just made
    (tmp_path / "config.yaml").write_text("run: {}\n")
    launch.started = True
    launch.failed()
    assert f"run dir: {tmp_path}" in capsys.readouterr().err and tmp_path.exists()

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    launch = Launch()
    launch.accept(fresh, main=True)
    (fresh / "config.yaml").write_text("run: {}\n")
    launch.failed()  # failed while building components: the directory goes
    assert not fresh.exists() and "run dir:" not in capsys.readouterr().err


def test_a_judge_model_path_error_names_the_judge_key(tmp_path: Path):
    from rewardlab.rewards.judge import JudgeModel, LLMJudge

    judge = LLMJudge(JudgeModel(model=str(tmp_path / "judge")))
    with pytest.raises(UserError, match=rf"^reward.judge.model={tmp_path / 'judge'} does not exist"):
        judge.bind(SimpleNamespace(device=torch.device("cpu")))


def test_lora_runs_export_merged_weights_only_when_asked(tmp_path: Path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rewardlab.export import export_model
    from rewardlab.policy import load_policy

    policy = load_policy(device="cpu", log=lambda *_: None)
    policy.model = get_peft_model(policy.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    (tmp_path / "run" / "final").mkdir(parents=True)
    policy.model.save_pretrained(tmp_path / "run" / "final")
    policy.tokenizer.save_pretrained(tmp_path / "run" / "final")
    with pytest.raises(UserError, match="LoRA adapters only; pass --merge-lora"):
        export_model(tmp_path / "run", tmp_path / "out")
    export_model(tmp_path / "run", tmp_path / "out", merge_lora=True)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = policy.tokenizer("12+3=", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, policy.model(ids).logits, atol=1e-5)
    assert not any("lora" in k for k in merged.state_dict())
    with pytest.raises(UserError, match="no final/ and no checkpoint"):
        export_model(tmp_path / "nothing", tmp_path / "out2")


def test_wandb_goes_online_with_credentials_from_wandb_login(tmp_path: Path, monkeypatch):
    from rewardlab.tracking import WandbLogger, wandb_credentials

    for key in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not wandb_credentials() and WandbLogger().resolved_mode() == "offline"
    (tmp_path / "netrc").write_text(f"machine api.wandb.ai\n  login user\n  password {'a' * 40}\n")
    (tmp_path / "netrc").chmod(0o600)
    assert wandb_credentials() and WandbLogger().resolved_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # the environment wins over the default `auto`
    assert WandbLogger().resolved_mode() == "offline" and WandbLogger(mode="online").resolved_mode() == "online"


def test_wandb_settings_left_unset_defer_to_the_environment_and_sweeps_group_jobs(tmp_path: Path, monkeypatch):
    from rewardlab.tracking import WandbLogger

    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    assert WandbLogger().init_kwargs(tmp_path, {}, "n", None)["project"] == "rewardlab"
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    kwargs = WandbLogger().init_kwargs(tmp_path, {}, "lr=0.1", "multirun/x")
    chosen = (kwargs["project"], kwargs["entity"], kwargs["name"], kwargs["group"])
    assert chosen == ("mine", None, "lr=0.1", "multirun/x")
    assert WandbLogger(project="set", group="g").init_kwargs(tmp_path, {}, "n", "multirun/x")["group"] == "g"
    again = WandbLogger().init_kwargs(tmp_path, {}, "n", None)
    assert again["id"] == kwargs["id"] and again["resume"] == "allow"  # one W&B run per run directory


def test_a_sweep_job_is_named_by_its_overrides_and_grouped_by_its_sweep(sweep: Path):
    from rewardlab.provenance import sweep_identity

    identity = sweep_identity(sweep / "0")
    assert identity["name"] == " ".join([*SMALL, "logger=wandb", "algo.lr=0.0001"])
    assert Path(identity["group"]).resolve() == sweep.resolve()
    assert sweep_identity(sweep) == {}


def test_score_with_a_rule_reward_loads_no_policy_weights(tmp_path: Path, monkeypatch):
    import rewardlab.policy as policy_module
    from rewardlab.scoring import score_file

    def refuse(*args, **kwargs):
        raise AssertionError("the policy's weights were loaded")

    monkeypatch.setattr(policy_module, "load_model", refuse)
    rows = [{"prompt": "1+2=", "completion": "#### 3", "reference": "3"},
            {"prompt": "1+2=", "completion": "#### 4", "reference": "3"}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert score_file(source, tmp_path / "out.jsonl", ["reward=verifiable"]) == 2
    scored = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in scored] == [1.0, 0.0]
