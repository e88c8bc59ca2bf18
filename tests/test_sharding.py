"""Sharded training under `accelerate launch`: FSDP2 (conf/accelerate/fsdp*.yaml) and DeepSpeed ZeRO-2/3
(conf/accelerate/deepspeed_zero*.yaml), on CPU over gloo.

Every sharded run is checked against plain data parallelism (torchrun, gradients all-reduced) on the same
config: with two ranks the sums are the same, so the metrics must match and the weights agree to float
rounding (exactly, where the reductions happen in the same order)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewardlab import sharding
from rewardlab.errors import UserError
from test_distributed import TINY_GRPO, free_port

REPO = Path(__file__).resolve().parents[1]
# a KL term (the sharded reference model), two passes of minibatches (old log-probs, optimizer state
# that matters on resume) and micro-batches of 4 rows
UPDATE = ["algo.beta=0.04", "algo.minibatch_size=8", "algo.num_iterations=2", "algo.micro_batch_size=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def where(run_dir: Path, overrides: tuple[str, ...]) -> list[str]:
    """The overrides with the run directory named (`resume=` names it itself)."""
    resumed = any(o.startswith("resume=") for o in overrides)
    return [*overrides] if resumed else [*overrides, f"hydra.run.dir={run_dir}"]


def torchrun(run_dir: Path, *overrides: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "rewardlab", "train", *where(run_dir, overrides)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def accelerate(config: str, run_dir: Path, *overrides: str) -> str:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "conf" / "accelerate" / config),
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "-m", "rewardlab", "train", *where(run_dir, overrides)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return " ".join((result.stdout + result.stderr).split())  # rich wraps long lines


def final_weights(run_dir: Path, iteration: int = 2) -> dict[str, torch.Tensor]:
    """The weights after `iteration`, the run's last: its checkpoint's policy/, or for an FSDP checkpoint
    (each rank's shard, no whole weights) the final/ model gathered when the run ended."""
    from safetensors.torch import load_file

    folder = run_dir / "checkpoints" / f"iter_{iteration:04d}"
    folder = run_dir / "final" if (folder / "sharded").is_dir() else folder / "policy"
    return load_file(next(folder.glob("*.safetensors")))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Equal to 1e-6, but for at most 1 element in 10,000, which must still be within 1e-4: AdamW's step is
    g / (|g| + eps), so an element whose gradient is at the level of rounding (FSDP sums in another order than
    DDP) moves by up to lr (5e-5) either way on each step. Measured on an AMD EPYC: 1 of 987,520 elements 1.6e-6 apart, the
    rest within 1.5e-7. A wrong or missing step moves most elements by ~lr, far beyond this."""
    assert sorted(a) == sorted(b)
    total = sum(v.numel() for v in a.values())
    beyond = {key: int(((a[key] - b[key]).abs() > 1e-6).sum()) for key in a}
    assert sum(beyond.values()) <= total // 10_000, {k: n for k, n in beyond.items() if n}
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-4, msg=key)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_metrics(a: list[dict], b: list[dict], rel: float = 0.0) -> None:
    assert [r["iteration"] for r in a] == [r["iteration"] for r in b]
    for x, y in zip(a, b):
        for key, value in x.items():
            if isinstance(value, str):  # e.g. update/skip_reason
                assert y[key] == value, (x["iteration"], key)
            elif not key.startswith("time/"):
                assert y[key] == pytest.approx(value, rel=rel, abs=1e-6), (x["iteration"], key)


def rewind(run_dir: Path, copy: Path, to: int) -> Path:
    """A copy of a finished run as a kill during iteration `to`+1 leaves it: that checkpoint is the latest."""
    shutil.copytree(run_dir, copy, symlinks=True)
    shutil.rmtree(copy / "final")  # written again by the resumed run
    for path in (copy / "checkpoints").glob("iter_*"):
        if int(path.name.split("_")[1]) > to:
            shutil.rmtree(path)
    (copy / "checkpoints" / "latest").unlink()
    (copy / "checkpoints" / "latest").symlink_to(f"iter_{to:04d}/policy")
    return copy


@pytest.fixture(scope="module")
def runs(ddp_run, tmp_path_factory) -> dict[str, Path]:
    """The same two-iteration GRPO run under plain data parallelism (conftest's `ddp_run`) and under FSDP
    (FULL_SHARD)."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {"ddp": ddp_run, "fsdp": root / "fsdp"}
    out["stdout"] = accelerate("fsdp.yaml", out["fsdp"], *TINY_GRPO, *UPDATE)
    return out


@pytest.fixture(scope="module")
def zero_runs(runs, tmp_path_factory) -> dict[int, tuple[Path, str]]:
    """The same run under DeepSpeed ZeRO stage 2 and stage 3: {stage: (run dir, output)}."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'rewardlab[deepspeed]')")
    root = tmp_path_factory.mktemp("zero")
    return {stage: (root / f"zero{stage}", accelerate(f"deepspeed_zero{stage}.yaml", root / f"zero{stage}",
                                                      *TINY_GRPO, *UPDATE)) for stage in (2, 3)}


@pytest.mark.slow
def test_fsdp_shards_the_policy_and_trains_exactly_as_data_parallel(runs):
    from rewardlab.policy import load_policy

    summary = json.loads((runs["fsdp"] / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"] == "fsdp_full_shard"
    assert "sharded training over 2 processes (fsdp_full_shard)" in runs["stdout"]
    total = sum(p.numel() for p in load_policy(device="cpu", log=lambda *_: None).model.parameters())
    assert all(n < 0.6 * total for n in summary["rank_local_params"])  # each rank holds about half
    assert json.loads((runs["ddp"] / "summary.json").read_text())["sharding"] == "none"

    # same samples, rewards, KL, losses, eval; FSDP sums the gradients in another order than DDP, so from the
    # second iteration on the continuous metrics agree to rounding (grad_norm 1.3e-6 apart, relative, on an
    # AVX-512 Xeon), not bit for bit
    assert_same_metrics(rows(runs["ddp"]), rows(runs["fsdp"]), rel=1e-5)
    assert rows(runs["fsdp"])[1]["update/steps"] == 2.0 and "kl" in rows(runs["fsdp"])[1]
    assert_same_weights(final_weights(runs["ddp"]), final_weights(runs["fsdp"]))
    # each rank wrote its own shard of the weights and AdamW state (torch.distributed.checkpoint); nothing
    # whole is in the checkpoint, and the ranks' files are about the same size (each about half)
    checkpoint = runs["fsdp"] / "checkpoints" / "iter_0002"
    assert sorted(p.name for p in (checkpoint / "sharded").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    sizes = [(checkpoint / "sharded" / f"__{r}_0.distcp").stat().st_size for r in (0, 1)]
    assert max(sizes) < 1.2 * min(sizes) and not list((checkpoint / "policy").glob("*.safetensors"))
    # final/ is gathered whole once, at the end: it loads with from_pretrained like any other
    loaded = load_policy(path=str(runs["fsdp"] / "final"), device="cpu", log=lambda *_: None)
    assert_same_weights({k: v for k, v in loaded.model.state_dict().items() if k in final_weights(runs["fsdp"])},
                        final_weights(runs["fsdp"]))


@pytest.mark.slow
def test_checkpoints_resume_across_sharding(runs, tmp_path: Path):
    """Killed after iteration 1: an FSDP run (its sharded checkpoint) resumes under FSDP with 2 processes
    and under plain data parallelism, a data-parallel run under SHARD_GRAD_OP, and all end exactly where
    the uninterrupted runs did; in one process the sharded checkpoint resumes too (other samples: one
    rank's RNG states cannot stand in for two, so it is not compared)."""
    from_fsdp = rewind(runs["fsdp"], tmp_path / "from_fsdp", to=1)
    torchrun(from_fsdp, f"resume={from_fsdp}")
    fsdp_again = rewind(runs["fsdp"], tmp_path / "fsdp_again", to=1)
    assert "resuming" in accelerate("fsdp.yaml", fsdp_again, f"resume={fsdp_again}")
    from_ddp = rewind(runs["ddp"], tmp_path / "from_ddp", to=1)
    stdout = accelerate("fsdp_shard_grad_op.yaml", from_ddp, f"resume={from_ddp}")
    assert "resuming" in stdout and "(fsdp_shard_grad_op)" in stdout
    for resumed, original in ((from_fsdp, runs["fsdp"]), (fsdp_again, runs["fsdp"]), (from_ddp, runs["ddp"])):
        assert_same_weights(final_weights(original), final_weights(resumed))
        assert_same_metrics(rows(original), rows(resumed))

    alone = rewind(runs["fsdp"], tmp_path / "alone", to=1)
    result = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={alone}"], capture_output=True,
                            text=True, env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    output = " ".join((result.stdout + result.stderr).split())  # rich wraps long lines
    assert "resuming" in output and "written by 2 processes, this run has 1" in output
    assert [r["iteration"] for r in rows(alone)] == [0, 1, 2] and rows(alone)[2]["world_size"] == 1
    assert sorted(final_weights(alone)) == sorted(final_weights(runs["fsdp"]))


@pytest.mark.slow
def test_a_stopped_fsdp_run_exports_its_sharded_checkpoint_whole(runs, tmp_path: Path):
    """No final/ yet: `rewardlab export` reads the newest checkpoint's shards whole, in one process."""
    from rewardlab.export import export_model

    stopped = rewind(runs["fsdp"], tmp_path / "stopped", to=2)
    out = export_model(stopped, tmp_path / "out")
    from safetensors.torch import load_file

    assert_same_weights(load_file(out / "model.safetensors"), final_weights(runs["fsdp"]))
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()


@pytest.mark.slow
def test_lora_adapters_start_equal_on_every_rank_and_shard(tmp_path: Path):
    """Adapters are initialised at random; ranks seed differently, so rank 0's are broadcast. Under
    FSDP the frozen base and the adapters are sharded together."""
    # 8 prompts: with TINY_GRPO's 4, every group's rewards came out equal at iteration 1 on one machine's tiny
    # build (AMD EPYC, 2026-12-04): a gradient of exactly 0 (adapters B = 0, so the KL's is 0 too), which DDP
    # sums to 0 and FSDP to rounding noise (1.8e-8), which AdamW then turns into steps of up to lr
    lora = [*TINY_GRPO, "run.prompts_per_iteration=8", "policy.lora.r=8", "algo.beta=0.04"]
    torchrun(tmp_path / "ddp", *lora)
    accelerate("fsdp.yaml", tmp_path / "fsdp", *lora)
    assert all(r["groups/zero_variance"] < 1 for r in rows(tmp_path / "ddp")[1:]), "a step with no gradient"
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert len(set(ddp["rank_param_sha256"])) == 1
    assert (tmp_path / "fsdp" / "checkpoints" / "iter_0002" / "sharded" / ".metadata").exists()
    assert (tmp_path / "fsdp" / "final" / "adapter_config.json").exists()  # only the adapters, gathered at the end
    assert_same_weights(final_weights(tmp_path / "ddp"), final_weights(tmp_path / "fsdp"))
    assert_same_metrics(rows(tmp_path / "ddp"), rows(tmp_path / "fsdp"), rel=1e-5)  # another summation order


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_trains_as_data_parallel(runs, zero_runs, stage: int):
    from rewardlab.policy import load_policy

    run_dir, output = zero_runs[stage]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["sharding"] == f"deepspeed_zero{stage}"
    assert f"sharded training over 2 processes (deepspeed_zero{stage})" in output
    total = sum(p.numel() for p in load_policy(device="cpu", log=lambda *_: None).model.parameters())
    if stage == 3:  # parameters partitioned; under ZeRO-2 each rank keeps them whole
        assert all(n < 0.6 * total for n in summary["rank_local_params"])
    else:
        assert summary["rank_local_params"] == [total, total]
    assert len(set(summary["rank_param_sha256"])) == 1
    # ZeRO-3 sums its partitions in another order: rounding (seen: grad_norm 1.3e-6 relative), far
    # below one step's change
    assert_same_metrics(rows(runs["ddp"]), rows(run_dir), rel=1e-5 if stage == 3 else 0.0)
    ddp, zero = final_weights(runs["ddp"]), final_weights(run_dir)
    assert sorted(ddp) == sorted(zero)
    for key in ddp:
        torch.testing.assert_close(zero[key], ddp[key], rtol=0, atol=1e-5, msg=key)
    checkpoint = run_dir / "checkpoints" / "iter_0002"
    assert (checkpoint / "deepspeed" / "zero").is_dir()  # DeepSpeed's own optimizer partitions, one per rank
    assert len(list((checkpoint / "deepspeed" / "zero").glob("*optim_states.pt"))) == 2


@pytest.mark.slow
def test_deepspeed_resumes_its_own_checkpoints_and_refuses_others(runs, zero_runs, tmp_path: Path):
    """ZeRO-3 killed after iteration 1 resumes to the same end; a data-parallel checkpoint (whole AdamW
    state) cannot continue under DeepSpeed, which is told in one line."""
    original = zero_runs[3][0]
    resumed = rewind(original, tmp_path / "zero3", to=1)
    assert "resuming" in accelerate("deepspeed_zero3.yaml", resumed, f"resume={resumed}")
    assert_same_weights(final_weights(original), final_weights(resumed))
    assert_same_metrics(rows(original), rows(resumed))

    foreign = rewind(runs["ddp"], tmp_path / "ddp", to=1)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / "conf" / "accelerate" / "deepspeed_zero2.yaml"), "--num_processes", "2",
           "--main_process_port", str(free_port()), "-m", "rewardlab", "train", f"resume={foreign}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert result.returncode != 0
    assert "error: this checkpoint's optimizer state was written without DeepSpeed" in result.stderr
    assert "(exitcode: 2)" in result.stderr and "rewardlab/algos/pg.py" not in result.stderr  # no traceback


def _uneven_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 trains on 8 rows, rank 1 on 4 (3 vs 1 micro-batches of 3): once sharded, once plain with
    all-reduced gradients. Sharded, rank 1 must join rank 0's extra forward/backward passes."""
    import torch.distributed as torch_dist

    from rewardlab.algos import AlgoContext
    from rewardlab.algos.pg import PolicyGradient
    from rewardlab.data.arith import ArithTask
    from rewardlab.generation.hf import HFGenerator
    from rewardlab.policy import load_policy

    from datetime import timedelta

    # a rank left waiting in a collective fails after 2 minutes instead of hanging the suite
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                  timeout=timedelta(minutes=2))
    torch.manual_seed(rank)
    task = ArithTask(train_size=16, test_size=4)
    plain = load_policy(device="cpu", log=lambda *_: None)
    prompts = list(task.train_examples())[rank * 4: rank * 4 + (2 if rank == 0 else 1)]
    batch = HFGenerator(plain, sampling={"max_new_tokens": 12}).generate(prompts, n=4)
    batch.reward = [float(i % 3 == 0) for i in range(len(batch))]
    models, norms = {}, {}
    for name in ("plain", "sharded"):
        policy = load_policy(device="cpu", log=lambda *_: None)
        if name == "sharded":
            policy.shard(sharding.FSDP(reshard_after_forward=True))
        algo = PolicyGradient(AlgoContext(temperature=1.0, max_new_tokens=12, seed=0), samples_per_prompt=4,
                              minibatch_size=0, micro_batch_size=3, lr=1e-3)
        norms[name] = algo.update(policy, batch)["grad_norm"]
        models[name] = policy.model
    start = load_policy(device="cpu", log=lambda *_: None).model.state_dict()
    plain = models["plain"].state_dict()
    sharded = {k: v.full_tensor() for k, v in models["sharded"].state_dict().items()}
    Path(out, f"{rank}.json").write_text(json.dumps({
        "norms": norms, "keys_equal": sorted(plain) == sorted(sharded),
        "diff": max(float((plain[k] - sharded[k]).abs().max()) for k in plain),
        "moved": max(float((plain[k] - start[k]).abs().max()) for k in plain)}))
    torch_dist.destroy_process_group()


def test_ranks_with_unequal_micro_batches_train_as_data_parallel(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.spawn(_uneven_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]  # both ranks agree on the weights and the gradient norm
    assert seen[0]["norms"]["sharded"] == pytest.approx(seen[0]["norms"]["plain"], rel=1e-5)
    assert seen[0]["keys_equal"] and seen[0]["moved"] > 1e-4  # the update moved the weights...
    # ...the same way: sums in another order (the plain run's packed pass computes each shared prompt once, the
    # sharded one pads every row), which AdamW's normalization scales up on near-zero gradients: 1.5e-5 seen,
    # not bit-equal; a wrong or missing gradient moves weights by ~lr = 1e-3
    assert seen[0]["diff"] < 5e-5


def test_fsdp_settings_come_from_the_accelerate_launch(monkeypatch):
    for key in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_RESHARD_AFTER_FORWARD", "FSDP_CPU_RAM_EFFICIENT_LOADING"):
        monkeypatch.delenv(key, raising=False)
    assert sharding.FSDP.from_launch() is None
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "false")
    assert sharding.FSDP.from_launch().name == "fsdp_shard_grad_op"
    monkeypatch.setenv("FSDP_RESHARD_AFTER_FORWARD", "true")
    assert sharding.FSDP.from_launch().name == "fsdp_full_shard"
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "true")
    with pytest.raises(UserError, match="fsdp_cpu_ram_efficient_loading: true"):
        sharding.FSDP.from_launch()
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UserError, match="set fsdp_version: 2"):
        sharding.FSDP.from_launch()


def test_fsdp_refuses_a_generator_that_does_not_use_the_policy_model():
    with pytest.raises(UserError, match="launch use generation=hf"):
        sharding.check_generator(object())


@pytest.mark.parametrize("name", ["deepspeed_zero2.yaml", "deepspeed_zero3.yaml"])
def test_the_shipped_deepspeed_configs_name_their_stage(name: str):
    import yaml

    config = yaml.safe_load((REPO / "conf" / "accelerate" / name).read_text())
    assert config["distributed_type"] == "DEEPSPEED"
    assert config["deepspeed_config"]["zero_stage"] == int(name[-6])
    assert config["deepspeed_config"].get("zero3_init_flag", False) is False
    # several nodes: one accelerate launch per node (multi_node.sbatch), not DeepSpeed's pdsh runner
    assert config["deepspeed_config"]["deepspeed_multinode_launcher"] == "standard"


@pytest.mark.parametrize("name", ["fsdp.yaml", "fsdp_shard_grad_op.yaml"])
def test_the_shipped_fsdp_configs_parse_as_fsdp2(name: str):
    import yaml

    config = yaml.safe_load((REPO / "conf" / "accelerate" / name).read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    assert config["fsdp_config"]["fsdp_reshard_after_forward"] is (name == "fsdp.yaml")
    assert config["fsdp_config"]["fsdp_cpu_ram_efficient_loading"] is False


def test_an_optimizer_that_never_stepped_is_saved_as_nothing_and_left_alone():
    """torch's get_optimizer_state_dict fills an empty AdamW state by stepping with zero gradients,
    which advances Adam's step count and shrinks the first real update; saving must not do that."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    assert sharding.optimizer_state(model, optimizer) is None and not optimizer.state
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    saved = sharding.optimizer_state(model, optimizer)
    assert float(saved["state"]["weight"]["step"]) == 1.0
    fresh = torch.optim.AdamW(model.parameters(), lr=0.1)
    sharding.load_optimizer_state(model, fresh, saved)
    assert float(fresh.state[model.weight]["step"]) == 1.0
    assert torch.equal(fresh.state[model.weight]["exp_avg"], optimizer.state[model.weight]["exp_avg"])
