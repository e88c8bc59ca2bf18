"""algo=prime: the implicit PRM's training (its buffer, the accuracy filter, steps), exact state round trips, the
offline replay script, and (slow) a run that resumes after SIGKILL and a 2-process torchrun whose ranks end with
identical policy and PRM weights. The formulas: tests/test_prime_formulas.py."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, read_metrics, run_cli
from rewardlab.algos import AlgoContext
from rewardlab.algos.prime import Prime
from rewardlab.checkpoint import load_state
from rewardlab.data.base import Example
from rewardlab.errors import UserError
from rewardlab.policy import Policy



# ---- the algorithm on a small random model --------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_small_policy(tmp_path_factory):
    """A 1-layer random model over the tiny vocabulary, saved so the PRM and the reference load from it."""
    from rewardlab.policy import load_model, load_tokenizer
    from rewardlab.policy.tiny import TinyBuild, build_model, build_tokenizer, save_char_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    directory = tmp_path_factory.mktemp("small")
    build_model(TinyBuild(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
                tok).save_pretrained(directory)
    save_char_tokenizer(tok, directory)
    return str(directory), load_model(str(directory), torch.float32), load_tokenizer(str(directory))


def small_policy(saved) -> Policy:
    source, model, tok = saved
    return Policy(model=copy.deepcopy(model).eval(), tokenizer=tok, source=source, device=torch.device("cpu"))


def make_batch(tok, gold):
    prompts = ["1+2", "1+2", "3+4", "3+4"]
    completions = ["1+2=3\n#### 3", "#### 4", "3+4=7\n#### 7", "#### 9"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    from rewardlab.rollout import Batch

    return Batch(prompt_id=prompts, prompt=[f"{p}=?\n" for p in prompts], completion=completions,
                 prompt_ids=[tok(f"{p}=?\n", add_special_tokens=False)["input_ids"] for p in prompts],
                 completion_ids=ids, finish_reason=["stop"] * 4, reference=[None if g is None else "x" for g in gold],
                 solution=[None] * 4, reward=[1.0, 0.0, 1.0, 0.0], gold=gold)


def prime(**settings) -> Prime:
    return Prime(AlgoContext(temperature=1.0, max_new_tokens=12, total_iterations=4), minibatch_size=0,
                 samples_per_prompt=2, prime={"lr": 1e-2, **settings})


def test_the_prm_learns_the_labels_and_its_state_round_trips_exactly(saved_small_policy):
    policy = small_policy(saved_small_policy)
    batch = make_batch(policy.tokenizer, [1.0, 0.0, 1.0, 0.0])
    algo = prime()
    first = algo.update(policy, batch)
    assert first["prime/reward_mean"] == 0.0 and first["prime/accuracy"] == 0.5  # the PRM starts as the reference
    assert first["prime/loss"] == pytest.approx(math.log(2)) and first["prime/pairwise_accuracy"] == 0.0  # all tied
    assert first["prime/auc"] == 0.5  # ties count 1/2
    assert algo.advantages(batch).shape == (4, max(len(c) for c in batch.completion_ids))

    saved_state, saved_weights = copy.deepcopy(algo.state_dict()), copy.deepcopy(policy.model.state_dict())
    later = [algo.update(policy, batch) for _ in range(3)]
    assert later[-1]["prime/loss"] < first["prime/loss"] and later[-1]["prime/accuracy"] == 1.0
    assert later[-1]["prime/auc"] == 1.0

    resumed_policy = small_policy(saved_small_policy)
    resumed_policy.model.load_state_dict(saved_weights)
    resumed = prime()
    resumed.load_state_dict(saved_state, resumed_policy)
    assert [resumed.update(resumed_policy, batch) for _ in range(3)] == later  # same metrics, float for float
    for a, b in zip(algo.prm.parameters(), resumed.prm.parameters()):
        assert torch.equal(a, b)


def prm_weights(algo) -> list[torch.Tensor]:
    return [p.detach().clone() for p in algo.prm.parameters()]


def test_the_prm_trains_only_on_kept_groups_and_takes_the_steps_asked(saved_small_policy):
    tok = small_policy(saved_small_policy).tokenizer
    mixed = make_batch(tok, [1.0, 0.0, 1.0, 1.0])  # group 1+2: one right, one wrong; group 3+4: all right
    filtered = prime(accuracy_bounds=(0.2, 0.8))
    metrics = filtered.update(small_policy(saved_small_policy), mixed)
    assert metrics["prime/kept"] == 0.5
    alone = prime()  # the same step on the mixed group's rows alone
    alone.update(small_policy(saved_small_policy), mixed.select([0, 1]))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(prm_weights(filtered), prm_weights(alone)))
    assert not all(torch.equal(a, b) for a, b in zip(prm_weights(filtered), prm_weights(prime_on(mixed, saved_small_policy))))

    twice = prime(steps=2, buffer=1)
    both = twice.update(small_policy(saved_small_policy), mixed)
    once = prime(buffer=1)
    policy = small_policy(saved_small_policy)
    first = once.update(policy, mixed)
    once.update(policy, mixed)  # the PRM's step depends on the rollouts, labels and reference, not the policy
    assert both["prime/loss"] == first["prime/loss"] and both["prime/auc"] == first["prime/auc"]  # before any step
    assert all(torch.equal(a, b) for a, b in zip(prm_weights(twice), prm_weights(once)))

    none_kept = prime(accuracy_bounds=(0.2, 0.8))
    policy = small_policy(saved_small_policy)
    start = [p.detach().clone() for p in policy.model.parameters()]
    metrics = none_kept.update(policy, make_batch(tok, [1.0, 1.0, 0.0, 0.0]))
    assert metrics["prime/kept"] == 0.0 and "prime/loss" not in metrics and "prime/auc" not in metrics
    assert all(torch.equal(a, b) for a, b in zip(prm_weights(none_kept), start))  # the PRM did not move


def test_the_buffer_trains_on_earlier_iterations_newest_first_and_round_trips(saved_small_policy, tmp_path):
    tok = small_policy(saved_small_policy).tokenizer
    first, second = make_batch(tok, [1.0, 0.0, 1.0, 0.0]), make_batch(tok, [0.0, 1.0, 1.0, 1.0])
    buffered, trained = prime(buffer=2), small_policy(saved_small_policy)
    buffered.update(trained, first)
    metrics = buffered.update(trained, second)  # a step on `second`, then one on `first`
    assert metrics["prime/buffer"] == 2.0
    plain, policy = prime(buffer=1), small_policy(saved_small_policy)
    for batch in (first, second, first):  # PRIME's one step per iteration, the same three steps in that order
        plain.update(policy, batch)
    assert all(torch.allclose(a, b, atol=1e-7) for a, b in zip(prm_weights(buffered), prm_weights(plain)))
    assert not all(torch.allclose(a, b, atol=1e-4) for a, b in zip(prm_weights(buffered), prm_weights(prime_on(first, saved_small_policy))))

    torch.save(buffered.state_dict(), tmp_path / "state.pt")  # state.pt is read with weights_only=True
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert len(state["prime"]["history"]) == 1 and len(state["prime"]["history"][0]) == 1  # buffer 2: one earlier
    resumed, policy = prime(buffer=2), small_policy(saved_small_policy)
    policy.model.load_state_dict(copy.deepcopy(trained.model.state_dict()))
    resumed.load_state_dict(state, policy)
    third = make_batch(tok, [1.0, 1.0, 0.0, 1.0])
    assert resumed.update(policy, third) == buffered.update(trained, third)  # float for float
    assert all(torch.equal(a, b) for a, b in zip(prm_weights(buffered), prm_weights(resumed)))

    state["prime"]["history"] = state["prime"]["history"] * 2  # written by two processes, resumed under one
    other = prime(buffer=2)
    with pytest.warns(UserWarning, match="written by 2 process"):
        other.load_state_dict(state, small_policy(saved_small_policy))
    assert len(other._history) == 0
    with pytest.raises(UserError, match="algo.prime.buffer=0 must be at least 1"):
        prime(buffer=0)


def prime_on(batch, saved) -> Prime:
    algo = prime()
    algo.update(small_policy(saved), batch)
    return algo


def test_rows_without_references_and_bad_settings_are_refused(saved_small_policy):
    policy = small_policy(saved_small_policy)
    with pytest.raises(UserError, match="algo=prime trains its implicit PRM on outcome labels"):
        prime().update(policy, make_batch(policy.tokenizer, [None] * 4))
    with pytest.raises(UserError, match="algo=prime trains its implicit PRM on outcome labels"):
        prime().check_data([Example(id="0", prompt="1+1=?", answer=None)])
    prime().check_data([Example(id="0", prompt="1+1=?", answer="2")])
    with pytest.raises(UserError, match="algo.prime.norm='layer' is not one of batch_norm, none"):
        prime(norm="layer")
    with pytest.raises(UserError, match=r"algo.prime.accuracy_bounds=\[0.8, 0.2\] must be \[lo, hi\]"):
        prime(accuracy_bounds=(0.8, 0.2))
    with pytest.raises(UserError, match="algo.prime.steps=0 must be at least 1"):
        prime(steps=0)
    with pytest.raises(UserError, match="leave algo.credit"):
        Prime(AlgoContext(), credit="sum")


# ---- through the CLI: one uninterrupted run serves the end-to-end checks and the resume comparison ----------
TINY = ["algo=prime", "logger=none", "run.iterations=3", "run.eval_every=3", "run.eval_size=8",
        "run.prompts_per_iteration=4", "algo.samples_per_prompt=4", "run.threads=1"]


@pytest.fixture(scope="module")
def uninterrupted(tiny_policy, tmp_path_factory) -> Path:
    """`rewardlab train algo=prime` for three iterations, not interrupted (the SIGKILL test's reference)."""
    run_dir = tmp_path_factory.mktemp("prime") / "whole"
    result = run_cli("train", *TINY, f"hydra.run.dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_train_algo_prime_end_to_end(uninterrupted):
    rows = read_metrics(uninterrupted)
    assert [r["iteration"] for r in rows] == [0, 1, 2, 3]
    assert rows[1]["prime/reward_mean"] == 0.0 and rows[2]["prime/reward_mean"] != 0.0  # the PRM was updated
    for key in ("prime/accuracy", "prime/loss", "prime/token_reward/std", "loss", "advantage/abs_mean"):
        assert math.isfinite(rows[2][key])
    state = load_state(uninterrupted / "checkpoints" / "iter_0002" / "state.pt")
    assert set(state["algo"]["prime"]) == {"model", "optimizer", "history"}  # one process: no per-rank digests
    history = state["algo"]["prime"]["history"]
    assert len(history) == 1 and len(history[0]) == 2  # one rank; iterations 1 and 2 buffered for the PRM
    assert all(len(b["labels"]) == 16 for b in history[0])  # 4 prompts x 4 samples each


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_metrics(uninterrupted, tmp_path):
    from test_resume import environment, rows, start_and_wait

    cut = tmp_path / "cut"
    command = [sys.executable, "-m", "rewardlab", "train", *TINY, f"hydra.run.dir={cut}"]
    proc = start_and_wait(command, cut, "iter_0001", environment())
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert len(rows(cut)) < 4
    resumed = subprocess.run([sys.executable, "-m", "rewardlab", "train", f"resume={cut}"],
                             capture_output=True, text=True, env=environment())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert rows(cut) == rows(uninterrupted)


@pytest.mark.slow
def test_torchrun_two_ranks_end_with_identical_policy_and_prm(tiny_policy, tmp_path: Path):
    from rewardlab import distributed
    from rewardlab.policy import load_policy

    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "rewardlab", "train", *TINY, "run.iterations=2", f"hydra.run.dir={run_dir}"]
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and len(set(summary["rank_param_sha256"])) == 1
    prm = load_state(run_dir / "checkpoints" / "iter_0002" / "state.pt")["algo"]["prime"]
    first, second = prm["rank_sha256"]
    assert first == second  # the PRM replicas trained identically
    initial = distributed.param_digest(load_policy(device="cpu", log=lambda *_: None).model)
    assert first != initial  # and they did train (the PRM starts as the initial policy)


def test_train_algo_prime_on_a_data_set_without_answers_stops_with_one_line_and_exit_code_2(tiny_policy, tmp_path):
    data = tmp_path / "questions.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1=?"}) + "\n" for i in range(12)))
    result = run_cli("train", "algo=prime", "dataset=jsonl", f"dataset.path={data}", "dataset.answer_field=null",
                     "dataset.test_size=4", "dataset.prompt.chat=false", "reward=length", "logger=none",
                     f"hydra.run.dir={tmp_path}/run")
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith("error: algo=prime trains its implicit PRM on outcome")
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


def test_the_offline_replay_script_scores_like_the_run_it_replays(uninterrupted):
    """scripts/prime_replay.py (the README's evidence for the buffer) trains the PRM as algo=prime does: on
    the run's own rollouts, with the run's settings, its per-iteration AUC is the run's `prime/auc`."""
    result = subprocess.run([sys.executable, str(REPO / "scripts" / "prime_replay.py"), str(uninterrupted),
                             "--windows", "3"], capture_output=True, text=True, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    replay = json.loads(result.stdout.strip().splitlines()[-1])
    logged = [r.get("prime/auc") for r in read_metrics(uninterrupted) if r["iteration"] >= 1]
    assert len(replay["auc"]) == len(logged) == 3
    assert logged[0] in (None, 0.5) and replay["auc"][0] == logged[0]  # the PRM starts as the reference: ties
    assert any(a is not None for a in logged[1:])  # a group with both right and wrong answers was ranked
    rewards = [r["prime/reward_mean"] for r in read_metrics(uninterrupted) if r["iteration"] >= 1]
    assert rewards[0] == 0.0 and replay["reward_mean"] == pytest.approx(rewards, abs=1e-5)
    for a, b in zip(replay["auc"], logged):
        assert (a is None and b is None) or a == pytest.approx(b, abs=1e-6)
