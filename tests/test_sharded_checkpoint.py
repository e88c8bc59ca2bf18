"""FSDP checkpoints written with torch.distributed.checkpoint: one shard file per rank, nothing gathered,
loaded back (resharded) into a whole model in one process; and hostile files refused before DCP unpickles
them. The end-to-end runs (2-process FSDP resumed under 1 and 2 processes) are in test_sharding.py."""

from __future__ import annotations

import os
import pickle
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from rewardlab import sharded_checkpoint, sharding
from rewardlab.errors import UserError
from test_distributed import free_port


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.Tanh(), torch.nn.Linear(256, 8))


def _step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    torch.manual_seed(1)
    model(torch.randn(4, 64)).square().sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _writer(rank: int, port: int, out: str) -> None:
    """Two FSDP ranks step once and write the sharded checkpoint; rank 0 also keeps the whole state
    (gathered here only to compare against) and what state.pt would hold."""
    import torch.distributed as torch_dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                                  timeout=timedelta(minutes=2))
    model = _model()
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    _step(model, optimizer)
    saved = sharding.optimizer_state(model, optimizer)  # state.pt's part: param_groups, no tensors
    sharded_checkpoint.save(Path(out, "sharded"), model, optimizer)
    whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
    reference = {"model": get_model_state_dict(model, options=whole),
                 "optim": get_optimizer_state_dict(model, optimizer, options=whole), "saved": saved}
    if rank == 0:
        torch.save(reference, Path(out, "reference.pt"))
    torch_dist.destroy_process_group()


def test_two_fsdp_ranks_write_one_shard_each_and_one_process_loads_them_whole(tmp_path: Path):
    import torch.multiprocessing as mp

    mp.spawn(_writer, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    folder = tmp_path / "sharded"
    assert sorted(os.listdir(folder)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    reference = torch.load(tmp_path / "reference.pt", weights_only=False)
    saved = reference["saved"]
    assert saved["dcp"] == "sharded" and not any(torch.is_tensor(v) for g in saved["param_groups"] for v in g.values())
    whole_bytes = sum(t.numel() * t.element_size() for t in reference["model"].values()) * 3  # weights + 2 moments
    for rank in (0, 1):  # each file holds about half of the weights and moments, not all of them
        assert (folder / f"__{rank}_0.distcp").stat().st_size < 0.8 * whole_bytes

    sharded_checkpoint.check_files(folder)
    model = _model()
    for p in model.parameters():
        p.data.zero_()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.5)
    sharded_checkpoint.load_weights(model, folder)
    sharding.load_optimizer_state(model, optimizer, {**saved, "dcp": str(folder)})
    for key, value in reference["model"].items():
        assert torch.equal(model.state_dict()[key], value), key
    names = dict(zip(reference["optim"]["param_groups"][0]["params"], model.parameters()))
    for name, state in reference["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(optimizer.state[names[name]][key], value), (name, key)
    assert optimizer.param_groups[0]["lr"] == 0.1 and float(optimizer.state[names["0.weight"]]["step"]) == 1.0


class _Runs:
    def __reduce__(self):
        return (os.system, ("touch ran-code",))


def test_hostile_dcp_metadata_is_refused_before_it_runs_code(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "sharded"
    sharded_checkpoint.save(folder, _model(), None)
    sharded_checkpoint.check_files(folder)  # DCP's own metadata passes
    (folder / ".metadata").write_bytes(pickle.dumps(_Runs()))
    with pytest.raises(UserError, match="could run code"):
        sharded_checkpoint.check_files(folder)
    assert not (tmp_path / "ran-code").exists()


def test_non_tensor_entries_are_refused(tmp_path: Path):
    """DCP unpickles non-tensor entries with code allowed; rewardlab writes tensors only and reads no others."""
    import torch.distributed.checkpoint as dcp

    dcp.save({"model": _model().state_dict(), "note": {"a": 1}}, checkpoint_id=str(tmp_path), no_dist=True)
    with pytest.raises(UserError, match="non-tensor entries"):
        sharded_checkpoint.check_files(tmp_path)
