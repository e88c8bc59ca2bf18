"""PPO's critic and PRIME's implicit PRM under the sharded accelerate configs (2 CPU processes, gloo): trained
the way the policy is (algos/auxiliary.py), both ranks ending with the same gathered weights, checkpointed the
way the policy is, and resumed exactly.

Which runs cover the 4 configs x 2 algorithms: the critic and the PRM share one code path (Auxiliary), so a
config needs one of them to exercise it, and each engine family needs its checkpoint resumed once. PPO runs
under fsdp.yaml and deepspeed_zero3.yaml, each resumed from its checkpoint after iteration 1: those are the
layouts where the parameters themselves are split (gathered for the critic's no-grad values, its digest and
its checkpoint), and resuming them tests DCP's shards and DeepSpeed's files (the PRM restores through the same code, and its
checkpoint's layout is checked). PRIME runs under fsdp_shard_grad_op.yaml and deepspeed_zero2.yaml, the
layouts that keep whole parameters between passes and split gradients and AdamW state (the other half of
each engine's settings). Each pair also trains the same config under the two
engines (FULL_SHARD = ZeRO-3, SHARD_GRAD_OP = ZeRO-2 in layout) from the same samples, so their metrics must
agree: a critic or PRM whose gradients were not averaged, or averaged twice, under one engine would diverge.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from rewardlab.checkpoint import load_state, locate_files
from rewardlab.errors import UserError
from test_distributed import TINY_GRPO, free_port
from test_sharding import accelerate, assert_same_metrics, rewind, rows

# two micro-batches per optimizer step and two optimizer steps per iteration (8 rollouts per rank), so
# AdamW's state matters on resume
SETTINGS = [*TINY_GRPO, "algo.minibatch_size=4", "algo.micro_batch_size=2"]
PPO = ["algo=ppo", *SETTINGS]
# three iterations: the PRM's step on iteration 1's rollouts (its buffer) in iteration 2 shows in iteration 3's metrics
PRIME = ["algo=prime", *SETTINGS, "algo.prime.micro_batch_size=4", "run.iterations=3"]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def untrained_digests() -> dict[str, set[str]]:
    """Per model, digests a trained and gathered one must differ from: its weights before training (the PRM
    starts as the policy), and its parameter names alone (what ZeRO-3's empty local partitions would give)."""
    import hashlib

    from rewardlab.algos.critic import CriticConfig, load_value_model
    from rewardlab.distributed import param_digest
    from rewardlab.policy import load_policy

    policy = load_policy(device="cpu", log=lambda *_: None)
    out = {}
    for name, model in (("critic", load_value_model(CriticConfig(), policy, seed=0)), ("prm", policy.model)):
        hollow = hashlib.sha256()
        for key, _ in sorted(model.named_parameters(), key=lambda item: item[0]):
            hollow.update(key.encode())
        out[name] = {param_digest(model), hollow.hexdigest()}
    return out


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[str, tuple[Path, str]]:
    """{config: (run dir, output)} for the four runs the module docstring names."""
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (pip install 'rewardlab[deepspeed]')")
    root = tmp_path_factory.mktemp("aux")
    plan = {"fsdp.yaml": PPO, "deepspeed_zero3.yaml": PPO, "fsdp_shard_grad_op.yaml": PRIME,
            "deepspeed_zero2.yaml": PRIME}
    return {config: (root / config[:-5], accelerate(config, root / config[:-5], *overrides))
            for config, overrides in plan.items()}


@pytest.mark.slow
@pytest.mark.parametrize("config,name,engine", [
    ("fsdp.yaml", "critic", "fsdp_full_shard"), ("deepspeed_zero3.yaml", "critic", "deepspeed_zero3"),
    ("fsdp_shard_grad_op.yaml", "prm", "fsdp_shard_grad_op"), ("deepspeed_zero2.yaml", "prm", "deepspeed_zero2")])
def test_ranks_end_with_the_same_trained_weights_and_checkpoint_like_the_policy(launched, config, name, engine):
    run_dir, output = launched[config]
    seen = summary(run_dir)
    assert seen["sharding"] == engine and f"sharded training over 2 processes ({engine})" in output
    assert len(set(seen["rank_param_sha256"])) == 1
    digests = seen[f"rank_{name}_param_sha256"]
    assert len(digests) == 2 and digests[0] == digests[1]  # gathered whole: the same on both ranks
    assert digests[0] not in untrained_digests()[name]  # trained, and hashed whole
    last = rows(run_dir)[-1]
    assert "update/skipped" not in last and "loss" in last
    assert ("critic/value_loss" if name == "critic" else "prime/loss") in last

    checkpoint = run_dir / "checkpoints" / "iter_0002"
    prefix = "critic" if name == "critic" else "prime"
    saved = load_state(checkpoint / "state.pt")["algo"][prefix]
    assert "model" not in saved  # no whole weights in state.pt: each rank wrote its part
    if name == "prm":  # each rank's buffer of earlier rollouts (iterations 1 and 2), its own rows
        assert [len(rank) for rank in saved["history"]] == [2, 2]
        assert not torch.equal(saved["history"][0][0]["input_ids"], saved["history"][1][0]["input_ids"])
    if engine.startswith("fsdp"):
        assert saved["dcp"] == f"{prefix}_sharded" and saved["optimizer"]["dcp"] == f"{prefix}_sharded"
        files = sorted(p.name for p in (checkpoint / f"{prefix}_sharded").iterdir())
        assert files == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    else:
        assert saved["deepspeed"] == f"{prefix}_deepspeed"
        assert len(list((checkpoint / f"{prefix}_deepspeed" / "zero").glob("*optim_states.pt"))) == 2


@pytest.mark.slow
def test_the_same_config_trains_alike_under_fsdp_and_deepspeed(launched):
    """Same seeds, same samples: FULL_SHARD vs ZeRO-3 (PPO) and SHARD_GRAD_OP vs ZeRO-2 (PRIME) give the
    same metrics, critic and PRM losses included (ZeRO sums in another order: rounding only). Not
    critic/clip_fraction: it counts tokens where clip(V, V_old +- eps) rounds above V, which for V within eps
    of V_old is a tie that float rounding decides (seen: 0.006 vs 0.009 with every other metric equal to 1e-6)."""
    def compared(run_dir: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "critic/clip_fraction"} for row in rows(run_dir)]

    for fsdp, zero in (("fsdp.yaml", "deepspeed_zero3.yaml"), ("fsdp_shard_grad_op.yaml", "deepspeed_zero2.yaml")):
        assert_same_metrics(compared(launched[fsdp][0]), compared(launched[zero][0]), rel=1e-4)
    # The PRMs are not compared bit for bit: they were with one PRM step per iteration, but the buffer's second
    # step per iteration carries ZeRO's rounding (seen: prime/loss 1.7578791 vs 1.7578804 at iteration 3); the
    # metrics above, prime/loss after the buffer's step included, agree to 1e-4.


@pytest.mark.slow
@pytest.mark.parametrize("config,name", [("fsdp.yaml", "critic"), ("deepspeed_zero3.yaml", "critic")])
def test_killed_after_iteration_1_resumes_to_the_same_metrics_and_weights(launched, config, name, tmp_path):
    original = launched[config][0]
    resumed = rewind(original, tmp_path / "resumed", to=1)
    assert "resuming" in accelerate(config, resumed, f"resume={resumed}")
    assert_same_metrics(rows(original), rows(resumed))
    for key in ("rank_param_sha256", f"rank_{name}_param_sha256"):
        assert summary(resumed)[key] == summary(original)[key], key


class _Runs:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def test_a_critics_shards_are_located_and_checked_before_they_are_read(tmp_path: Path, monkeypatch):
    """state.pt names the critic's folders relative to the checkpoint; hostile DCP metadata there is refused
    before DCP unpickles it, as the policy's is."""
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "critic_sharded"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Runs()))
    state = {"updates": 1, "critic": {"dcp": "critic_sharded", "optimizer": None}}
    with pytest.raises(UserError, match="could run code"):
        locate_files(state, tmp_path)
    assert not (tmp_path / "ran-code").exists()
    nested = {"prime": {"deepspeed": "prime_deepspeed"}}
    (tmp_path / "prime_deepspeed").mkdir()
    torch.save({"state": torch.zeros(1)}, tmp_path / "prime_deepspeed" / "optim.pt")
    locate_files(nested, tmp_path)
    assert nested["prime"]["deepspeed"] == str(tmp_path / "prime_deepspeed")


def _uneven_worker(rank: int, port: int, out: str) -> None:
    """Rank 0 trains the critic on 8 rows, rank 1 on 4 (3 vs 2 micro-batches of 3): once as a DDP replica,
    once sharded with FSDP, where rank 1 must join rank 0's third forward/backward pass."""
    from datetime import timedelta

    import torch.distributed as torch_dist

    from rewardlab.algos.auxiliary import Auxiliary
    from rewardlab.algos.critic import CriticConfig, load_value_model
    from rewardlab.policy import load_policy
    from rewardlab.sharding import FSDP

    # a rank left waiting in a collective fails after 2 minutes instead of hanging the suite
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                  timeout=timedelta(minutes=2))
    policy = load_policy(device="cpu", log=lambda *_: None)
    n = 8 if rank == 0 else 4
    ids = torch.randint(3, len(policy.tokenizer), (n, 10), generator=torch.Generator().manual_seed(rank))
    ones, positions = torch.ones_like(ids), torch.arange(10).expand(n, 10)
    targets = torch.rand(n, 6, generator=torch.Generator().manual_seed(10 + rank))
    norms, weights, passes = {}, {}, {}
    for name, sharding in (("ddp", None), ("fsdp", FSDP(reshard_after_forward=True))):
        model = load_value_model(CriticConfig(), policy, seed=0)
        aux = Auxiliary("critic", model, lambda p: torch.optim.AdamW(p, lr=1e-2), sharding, 3, 1.0,
                        units=(model.head,))
        passes[name] = 0

        def loss_of(index: int, real: bool) -> torch.Tensor:
            passes[name] += 1
            rows = slice(3 * index, 3 * index + 3)
            return ((aux.trained(ids[rows], ones[rows], positions[rows], 6) - targets[rows]) ** 2).sum() / n

        norms[name] = aux.train_step(-(-n // 3), loss_of)
        with aux.full_weights():
            weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    weights["fsdp"] = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in weights["fsdp"].items()}
    start = load_value_model(CriticConfig(), policy, seed=0).state_dict()
    Path(out, f"{rank}.json").write_text(json.dumps({
        "norms": norms, "passes": passes, "keys": sorted(weights["ddp"]) == sorted(weights["fsdp"]),
        "diff": max(float((weights["ddp"][k] - weights["fsdp"][k]).abs().max()) for k in weights["ddp"]),
        "moved": max(float((weights["ddp"][k] - start[k]).abs().max()) for k in start)}))
    torch_dist.destroy_process_group()


def test_a_sharded_critic_on_ranks_with_unequal_micro_batches_trains_as_data_parallel(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.spawn(_uneven_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert seen[0]["passes"] == {"ddp": 3, "fsdp": 3} and seen[1]["passes"] == {"ddp": 2, "fsdp": 3}
    assert seen[0]["norms"] == seen[1]["norms"] and seen[0]["diff"] == seen[1]["diff"]  # ranks agree
    assert seen[0]["norms"]["fsdp"] == pytest.approx(seen[0]["norms"]["ddp"], rel=1e-5)
    assert seen[0]["keys"] and seen[0]["moved"] > 1e-4  # the step moved the weights...
    # ...the same way under both. Not bit-equal: the sums run in another order, and AdamW's first step,
    # lr x g / (|g| + eps), turns that rounding into up to ~1e-5-1e-4 where |g| is near eps (1.9e-5 measured on an
    # AVX-512 Xeon, under 1e-5 on an AMD EPYC); a gradient of the wrong sign anywhere would differ by 2 x lr = 2e-2.
    assert seen[0]["diff"] < 1e-4
