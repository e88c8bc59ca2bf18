"""Data-parallel training: prompt sharding, metric reduction, and a real 2-process torchrun run."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from rewardlab import distributed
from rewardlab.errors import UserError

TINY_GRPO = ["logger=none", "run.iterations=2", "run.eval_size=6", "run.prompts_per_iteration=4",
             "algo.samples_per_prompt=4", "run.threads=1"]


def test_shard_covers_every_item_once_in_contiguous_blocks():
    items = list(range(10))
    shards = [distributed.shard(items, r, 3) for r in range(3)]
    assert shards == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert distributed.shard(items, 0, 1) == items


def test_prompt_counts_that_do_not_split_evenly_are_refused():
    four = distributed.Dist(rank=0, world_size=4, device="cpu")
    distributed.check_sizes(four, 8, 4)
    with pytest.raises(UserError, match="prompts_per_iteration=6 is not divisible by the 4"):
        distributed.check_sizes(four, 6, 100)
    with pytest.raises(UserError, match="eval_size=3 leaves some of the 4 processes nothing"):
        distributed.check_sizes(four, 8, 3)


def test_combine_sums_counts_takes_slowest_time_and_weights_means():
    rows = [{"iteration": 3, "rollouts": 8.0, "reward/mean": 1.0, "length/max": 10.0, "time/update": 2.0,
             "name": "a"},
            {"iteration": 3, "rollouts": 8.0, "reward/mean": 0.0, "length/max": 30.0, "time/update": 5.0,
             "name": "b", "only/here": 4.0}]
    out = distributed.combine(rows, [3.0, 1.0])
    assert out["iteration"] == 3 and out["rollouts"] == 16.0
    assert out["reward/mean"] == pytest.approx(0.75)
    assert out["length/max"] == 30.0 and out["time/update"] == 5.0
    assert out["name"] == "a" and out["only/here"] == 4.0


def test_single_process_helpers_are_identity():
    one = distributed.Dist()
    row = {"iteration": 1, "reward/mean": 0.5}
    assert distributed.reduce_metrics(one, row) is row
    assert distributed.gather_to_main(one, "x") == ["x"]
    assert distributed.run_dir_overrides(["a=1"]) == ["a=1"]


def test_a_submitit_job_with_two_tasks_becomes_a_two_process_group(monkeypatch):
    """hydra.launcher.tasks_per_node=2: submitit's task ids become torch's env:// variables."""
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"SUBMITIT_EXECUTOR": "local", "SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_NTASKS": "2",
                       "SUBMITIT_LOCAL_JOB_NUM_NODES": "1", "SUBMITIT_LOCAL_NODEID": "0",
                       "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1"}.items():
        monkeypatch.setenv(key, value)
    assert distributed.launched_world_size() == 2
    assert os.environ["RANK"] == "1" and os.environ["LOCAL_RANK"] == "1" and os.environ["MASTER_ADDR"]
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        os.environ.pop(key, None)  # export() wrote them outside monkeypatch's bookkeeping


def _collectives_worker(rank: int, port: int, out: str) -> None:
    """One of two gloo ranks exercising the collectives run.py relies on; writes what it saw."""
    import types

    import torch
    import torch.distributed as torch_dist

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    dist = distributed.Dist(rank=rank, world_size=2, device="cpu")
    torch.manual_seed(rank)  # different initial weights: DDP starts every rank from rank 0's
    model = torch.nn.Linear(3, 1, bias=False)
    frozen = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)  # no gradient: takes no part in the reduction
    trained = distributed.data_parallel(torch.nn.Sequential(model, frozen))
    steps = [[1.0, 2.0], [5.0]][rank]  # unequal micro-batch counts; each rank reduces on its last
    for index, x in enumerate(steps):
        with distributed.no_sync(trained, last=index == len(steps) - 1):
            trained(torch.full((1, 3), x)).sum().backward()
    row = distributed.reduce_metrics(dist, {"iteration": 1, "reward/mean": float(rank), "time/update": rank + 1.0,
                                            "rollouts": 4.0})
    minibatched = types.SimpleNamespace(cfg=types.SimpleNamespace(minibatch_size=8))
    seen = {"grad": model.weight.grad.tolist(), "w2": frozen.weight.item(), "frozen": frozen.weight.grad,
            "wrapped": type(trained).__name__, "row": row,
            "skip_if_one_rank_is_empty": distributed.should_update(dist, minibatched, [0, 5][rank]),
            "equal_counts": distributed.should_update(dist, minibatched, 5)}
    try:
        distributed.should_update(dist, minibatched, [4, 5][rank])
    except UserError as exc:
        seen["unequal_minibatched"] = str(exc)
    Path(out, f"{rank}.json").write_text(json.dumps(seen))
    torch_dist.destroy_process_group()


def test_ddp_averages_accumulated_gradients_and_collectives_reduce_rows_and_agree_on_skipping(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.spawn(_collectives_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    seen = [json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1)]
    assert seen[0] == seen[1]  # every rank ends with the same gradients, row and decisions
    # d/dW1 of w2 * W1 x, x = (v, v, v): rank 0 accumulates (1 + 2) * w2, rank 1 5 * w2; both get the mean
    assert seen[0]["wrapped"] == "DistributedDataParallel" and seen[0]["frozen"] is None
    assert seen[0]["grad"][0] == pytest.approx([4.0 * seen[0]["w2"]] * 3)
    assert seen[0]["row"] == {"iteration": 1, "reward/mean": 0.5, "time/update": 2.0, "rollouts": 8.0}
    assert seen[0]["skip_if_one_rank_is_empty"] is False and seen[0]["equal_counts"] is True
    assert "algo.minibatch_size=0" in seen[0]["unequal_minibatched"]


@pytest.mark.slow
def test_torchrun_two_ranks_train_identical_weights(ddp_run: Path):
    """conftest's `ddp_run`: TINY_GRPO (with a KL term and minibatches, test_sharding's UPDATE) under torchrun."""
    from rewardlab.policy import load_policy

    summary = json.loads((ddp_run / "summary.json").read_text())
    rows = [json.loads(line) for line in (ddp_run / "metrics.jsonl").read_text().splitlines()]
    assert summary["world_size"] == 2 and [r["world_size"] for r in rows] == [2, 2, 2]
    assert [r["iteration"] for r in rows] == [0, 1, 2]  # written once, not once per rank
    assert rows[1]["rollouts"] == 16.0  # 4 prompts x 4 samples over both ranks
    first, second = summary["rank_param_sha256"]
    assert first == second
    initial = distributed.param_digest(load_policy(device="cpu", log=lambda *_: None).model)
    assert first != initial  # the two updates changed the weights, identically on both ranks


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def test_algorithms_without_gradient_averaging_refuse_several_processes():
    from rewardlab.algos.pg import PolicyGradient

    two = distributed.Dist(rank=0, world_size=2, device="cpu")
    distributed.check_algorithm(two, PolicyGradient())
    distributed.check_algorithm(distributed.Dist(), object())
    with pytest.raises(UserError, match="does not support 2-process data-parallel training"):
        distributed.check_algorithm(two, object())
