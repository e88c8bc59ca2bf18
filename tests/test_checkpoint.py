"""Checkpoint save/restore of the whole loop state, atomicity, pruning, LoRA adapters, disk full,
the resume command line and SIGTERM handling (in-process; the end-to-end runs are in test_resume.py)."""

from __future__ import annotations

import errno
import os
import random
import signal

import numpy as np
import pytest
import torch

from rewardlab import checkpoint as ckpt
from rewardlab.algos import AlgoContext
from rewardlab.algos.pg import PolicyGradient
from rewardlab.checkpoint import Checkpointer
from rewardlab.data.arith import ArithTask
from rewardlab.data.base import PromptSampler
from rewardlab.errors import UserError
from rewardlab.generation.hf import HFGenerator
from rewardlab.policy import load_policy
from rewardlab.preemption import Preempted, PreemptionGuard
from rewardlab.resume import resume_args
from rewardlab.rewards.verifiable import VerifiableReward


@pytest.fixture(scope="module")
def task():
    return ArithTask(train_size=64, test_size=8)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, more threads spin against each other (10-50x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def components(task, seed=0):
    """A live policy, a PG algorithm that has made one update (so it has optimizer state) and a sampler."""
    torch.manual_seed(seed)
    policy = load_policy(device="cpu", log=lambda *_: None)
    algo = PolicyGradient(AlgoContext(temperature=1.0, max_new_tokens=16, seed=seed), samples_per_prompt=2)
    sampler = PromptSampler(task.train_examples(), seed=0)  # a resumed run builds it from the same config
    sampler.sample(seed)
    batch = HFGenerator(policy, sampling={"max_new_tokens": 16}).generate(sampler.sample(2), n=2)
    VerifiableReward().score(batch)
    batch.reward = [float(i % 2) for i in range(len(batch))]  # non-zero advantages: the weights move
    algo.update(policy, batch)
    return policy, algo, sampler


def draws(algo, sampler):
    """The next value of every random source the loop uses."""
    return (random.random(), float(np.random.rand()), float(torch.rand(1)),
            torch.randperm(50, generator=algo.generator).tolist(), [e.id for e in sampler.sample(3)])


def weights(policy):
    return {k: v.clone() for k, v in policy.model.state_dict().items()}


def test_restore_brings_back_weights_optimizer_rngs_and_cursor(task, tmp_path):
    policy, algo, sampler = components(task)
    store = Checkpointer(tmp_path, keep=2)
    store.save(3, policy, algo, sampler)
    saved_weights, saved_optim = weights(policy), algo.optimizer.state_dict()
    expected = draws(algo, sampler)

    fresh_policy, fresh_algo, fresh_sampler = components(task, seed=1)  # different weights, RNGs, cursor
    assert any(not torch.equal(saved_weights[k], v) for k, v in weights(fresh_policy).items())
    assert store.restore(fresh_policy, fresh_algo, fresh_sampler) == 3
    for k, v in weights(fresh_policy).items():
        assert torch.equal(saved_weights[k], v), k
    fresh_algo.setup(fresh_policy)  # the optimizer is built (with the restored state) at the first update
    restored_optim = fresh_algo.optimizer.state_dict()["state"]
    for pid, state in saved_optim["state"].items():
        assert torch.equal(state["exp_avg"], restored_optim[pid]["exp_avg"])
    assert fresh_algo.updates == algo.updates == 1
    assert draws(fresh_algo, fresh_sampler) == expected
    assert (tmp_path / "checkpoints" / "iter_0003" / "policy" / "config.json").exists()  # loadable by policy.path


class CarryOver:
    """An algorithm whose state is what anchored rejection or CREAM carry: rollouts and a ranking."""

    def __init__(self, state=None):
        self.state = state

    def state_dict(self):
        return self.state

    def load_state_dict(self, state, policy):
        self.state = state


def test_whatever_an_algorithm_carries_across_iterations_round_trips(task, tmp_path):
    policy, _, sampler = components(task)
    anchor = HFGenerator(policy, sampling={"max_new_tokens": 8}).generate(sampler.sample(2), n=2)
    carried = {"anchor": {"prompt": anchor.prompt, "completions": anchor.completion, "reward": [0.5, float("nan")]},
               "previous_ranking": [[2, 0, 1], [0, 1, 2]], "reference": policy.source,
               "snapshot": {k: v.clone() for k, v in list(policy.model.state_dict().items())[:2]}}
    Checkpointer(tmp_path).save(0, policy, CarryOver(carried), sampler)
    algo = CarryOver()
    Checkpointer(tmp_path).restore(policy, algo, sampler)  # plain data and tensors: what weights_only loads
    assert algo.state["previous_ranking"] == carried["previous_ranking"]
    assert algo.state["anchor"]["completions"] == anchor.completion and algo.state["reference"] == policy.source
    assert all(torch.equal(algo.state["snapshot"][k], v) for k, v in carried["snapshot"].items())


def test_keeps_the_newest_n_and_latest_is_written_last(task, tmp_path):
    policy, algo, sampler = components(task)
    store = Checkpointer(tmp_path, keep=2)
    for iteration in range(5):
        store.save(iteration, policy, algo, sampler)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0003", "iter_0004", "latest"]
    assert os.readlink(root / "latest") == "iter_0004/policy" and store.latest() == root / "iter_0004"
    from transformers import AutoModelForCausalLM  # `latest` is a model directory for from_pretrained

    loaded = AutoModelForCausalLM.from_pretrained(root / "latest").state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in weights(policy).items() if k in loaded)
    with pytest.raises(UserError, match="keep at least 1"):
        Checkpointer(tmp_path, keep=0)


def test_disk_full_during_a_checkpoint_keeps_the_previous_one_usable(task, tmp_path, monkeypatch):
    policy, algo, sampler = components(task)
    store = Checkpointer(tmp_path, keep=2)
    store.save(1, policy, algo, sampler)
    at_one = weights(policy)
    expected = draws(algo, sampler)
    with torch.no_grad():
        for p in policy.model.parameters():
            p.add_(1.0)

    def full(*args, **kwargs):  # weights already written: the disk fills while writing state.pt
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full)
    with pytest.raises(UserError, match=r"no space left.*iter_0002.*iter_0001 is intact.*resume="):
        store.save(2, policy, algo, sampler)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["iter_0001", "latest"]  # nothing half-written left
    fresh_policy, fresh_algo, fresh_sampler = components(task, seed=1)
    assert store.restore(fresh_policy, fresh_algo, fresh_sampler) == 1
    assert all(torch.equal(at_one[k], v) for k, v in weights(fresh_policy).items())
    assert draws(fresh_algo, fresh_sampler) == expected


def test_an_interrupted_save_is_invisible_and_cleaned_up(task, tmp_path):
    policy, algo, sampler = components(task)
    store = Checkpointer(tmp_path, keep=3)
    store.save(0, policy, algo, sampler)
    (tmp_path / "checkpoints" / ".tmp-iter_0001-999").mkdir()  # a save killed half-way
    (tmp_path / "checkpoints" / "iter_0001").mkdir()  # renamed, but killed before `latest` named it
    assert store.latest().name == "iter_0000"
    store.save(1, policy, algo, sampler)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["iter_0000", "iter_0001", "latest"]
    assert (tmp_path / "checkpoints" / "iter_0001" / ckpt.STATE).exists()


def test_lora_checkpoints_hold_only_the_adapters_and_load_back(task, tmp_path):
    from peft import LoraConfig, get_peft_model

    policy, algo, sampler = components(task)
    policy.model = get_peft_model(policy.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                           init_lora_weights=False))
    store = Checkpointer(tmp_path, keep=1)
    path = store.save(0, policy, algo, sampler)
    assert (path / "policy" / "adapter_config.json").exists()
    assert not (path / "policy" / "model.safetensors").exists()
    lora = {k: v.clone() for k, v in policy.model.state_dict().items() if "lora_" in k}
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_" in name:
                p.zero_()
    store.restore(policy, algo, sampler)
    restored = policy.model.state_dict()
    assert all(torch.equal(v, restored[k]) for k, v in lora.items())

    full_policy, _, _ = components(task)
    with pytest.raises(UserError, match="holds LoRA adapters but the policy is a full model"):
        store.restore(full_policy, algo, sampler)


def test_resume_args_run_hydra_in_the_run_dir_and_refuse_config_overrides(tmp_path):
    assert resume_args(["algo=grpo", "run.iterations=3"]) == ["algo=grpo", "run.iterations=3"]
    (tmp_path / "config.yaml").write_text("run:\n  iterations: 3\n")
    args = resume_args([f"resume={tmp_path}", "hydra/launcher=basic"])
    assert f"hydra.run.dir='{tmp_path}'" in args and "hydra.output_subdir=null" in args
    assert "run.iterations=3" in args  # the run's own horizon unless the command extends it
    assert "run.iterations=3" not in resume_args([f"resume={tmp_path}", "run.iterations=5"])
    with pytest.raises(UserError, match=r"own config.yaml \(only run.iterations may change.*drop algo.lr=0.5"):
        resume_args([f"resume={tmp_path}", "run.iterations=5", "algo.lr=0.5"])
    with pytest.raises(UserError, match="no config.yaml there"):
        resume_args([f"resume={tmp_path / 'missing'}"])


def _signal(signum: int) -> None:
    os.kill(os.getpid(), signum)
    for _ in range(1000):  # the handler runs between bytecodes
        pass


def test_sigterm_raises_preempted_and_waits_for_a_checkpoint_being_written():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted):
            _signal(signal.SIGTERM)
    finished = []
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted, match="checkpoint completed"):
            with guard.deferred():
                _signal(signal.SIGTERM)
                finished.append(True)
    assert finished == [True]
    assert signal.getsignal(signal.SIGTERM) == before


def test_in_the_loop_a_signal_lets_the_iteration_finish_and_raises_after_its_checkpoint():
    steps = []
    with PreemptionGuard() as guard, guard.finishing():
        _signal(signal.SIGTERM)
        steps.append("rest of the iteration")  # not interrupted
        assert guard.pending
        with pytest.raises(Preempted, match="SIGTERM received; stopped after the checkpoint completed") as stopped:
            with guard.deferred():
                steps.append("checkpoint")
    assert steps == ["rest of the iteration", "checkpoint"] and stopped.value.exit_code == 75
    with PreemptionGuard() as guard, guard.finishing():  # a second signal (Ctrl-C twice) stops at once
        _signal(signal.SIGINT)
        with pytest.raises(Preempted, match="SIGINT received again: stopped at once") as stopped:
            _signal(signal.SIGINT)
    assert stopped.value.exit_code == 130
    with PreemptionGuard() as guard, guard.finishing():
        assert not guard.pending
        with guard.deferred():
            pass  # no signal: nothing raised


def test_sigint_is_handled_like_sigterm_with_its_own_exit_code():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted, match="SIGINT received") as stopped:
            _signal(signal.SIGINT)
    assert stopped.value.exit_code == 130
    with PreemptionGuard() as guard:
        with pytest.raises(Preempted, match="SIGINT received; stopped after the checkpoint completed") as stopped:
            with guard.deferred():
                _signal(signal.SIGINT)
    assert stopped.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) == before


def test_cadence_counts_iterations_and_minutes_and_always_takes_the_last(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(ckpt.time, "monotonic", lambda: clock[0])
    every5 = ckpt.Cadence(every=5, minutes=0, last=12)
    assert [i for i in range(13) if every5.due(i)] == [0, 5, 10, 12]
    timed = ckpt.Cadence(every=0, minutes=2, last=9)
    assert not timed.due(1)
    clock[0] += 119
    assert not timed.due(2)
    clock[0] += 1
    assert timed.due(3)
    timed.saved()
    assert not timed.due(4) and timed.due(9)
    with pytest.raises(UserError, match="run.checkpoint_every=-1"):
        ckpt.Cadence(every=-1, minutes=0, last=3)


class _WritesAFile:
    """A pickled object whose loading would create `path` (what a hostile state.pt would do)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_state_pt_that_would_run_code_is_refused_and_the_code_never_runs(task, tmp_path):
    policy, algo, sampler = components(task)
    store = Checkpointer(tmp_path / "run")
    saved = store.save(0, policy, algo, sampler)
    marker = tmp_path / "marker"
    torch.save({"format": ckpt.FORMAT, "iteration": 0, "algo": _WritesAFile(marker)}, saved / ckpt.STATE)
    with pytest.raises(UserError, match=r"state.pt holds a pickled object that could run code \(.*open\)"):
        store.restore(policy, algo, sampler)
    assert not marker.exists()


def test_deepspeed_files_naming_anything_but_its_known_classes_are_refused_unrun(tmp_path):
    folder = tmp_path / "deepspeed" / "zero"
    folder.mkdir(parents=True)
    torch.save({"optimizer_state_dict": {"state": {0: torch.zeros(2)}}, "ds_version": "0.18"}, folder / "optim.pt")
    ckpt.check_deepspeed_files(tmp_path / "deepspeed")  # tensors and plain data pass
    marker = tmp_path / "marker"
    torch.save({"loss_scaler": _WritesAFile(marker)}, folder / "zero_pp_rank_1_optim_states.pt")
    with pytest.raises(UserError, match=r"zero_pp_rank_1_optim_states.pt holds pickled objects that could run code"):
        ckpt.check_deepspeed_files(tmp_path / "deepspeed")
    assert not marker.exists()
