"""PPO with a learned critic: GAE, value-loss clipping and explained variance against hand-computed values and
against verl's formulas; the update (critic warm-up, KL in the reward, process rewards); bad settings; the CLI
end to end, exact resume after SIGKILL and two ranks under torchrun (the last two `slow`)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rewardlab.algos import SKIPPED, AlgoContext
from rewardlab.algos.advantages import adaptive_lambda, gae, token_rewards, whiten
from rewardlab.algos.critic import explained_variance, value_loss
from rewardlab.algos.ppo import PPO
from rewardlab.errors import UserError
from rewardlab.policy import Policy
from rewardlab.rewards.arith_steps import ArithStepsReward
from rewardlab.rollout import Batch

REPO = Path(__file__).resolve().parents[1]


# ---- verl's formulas, reimplemented as the reference (not imported: verl is not a dependency) ----------------
# volcengine/verl @ b178a3cd56f58b2d502255daba591e92833930a7: verl/trainer/ppo/core_algos.py
# `compute_gae_advantage_return` and `compute_value_loss` (loss_agg_mode="token-mean"),
# verl/utils/torch_functional.py `masked_whiten`, verl/trainer/ppo/metric_utils.py `critic/vf_explained_var`.

def verl_gae(token_level_rewards, values, response_mask, gamma, lam):
    nextvalues, lastgaelam, reversed_adv = 0, 0, []
    for t in reversed(range(token_level_rewards.shape[-1])):
        delta = token_level_rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * response_mask[:, t] + (1 - response_mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * response_mask[:, t] + (1 - response_mask[:, t]) * lastgaelam
        reversed_adv.append(lastgaelam)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values  # verl then whitens the advantages: verl_whiten below


def verl_whiten(values, mask):
    mean = (values * mask).sum() / (mask.sum() + 1e-8)
    var = (((values - mean) ** 2) * mask).sum() / (mask.sum() + 1e-8) * (mask.sum() / (mask.sum() - 1))
    return (values - mean) * torch.rsqrt(var + 1e-8)


def verl_value_loss(vpreds, returns, values, mask, cliprange_value):
    vpredclipped = torch.max(torch.min(vpreds, values + cliprange_value), values - cliprange_value)
    losses1, losses2 = (vpreds - returns) ** 2, (vpredclipped - returns) ** 2
    loss = 0.5 * (torch.max(losses1, losses2) * mask).sum() / mask.sum()
    return loss, (torch.gt(losses2, losses1).float() * mask).sum() / (mask.sum() + 1e-8)


def verl_explained_variance(returns, values, mask):
    r, v = torch.masked_select(returns, mask.bool()), torch.masked_select(values, mask.bool())
    return float(1.0 - torch.var(r - v) / (torch.var(r) + 1e-5))


def ragged(seed: int = 0, lengths=(5, 2, 7, 1)):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).double()
    return torch.randn(len(lengths), width, generator=g, dtype=torch.float64) * mask, \
        torch.randn(len(lengths), width, generator=g, dtype=torch.float64), mask


# ---- GAE ----------------------------------------------------------------------------------------------------
def test_gae_hand_computed_with_ragged_lengths_and_rewards_at_step_ends():
    # completion 0: 4 tokens, steps end at tokens 1 and 3 (rewards 0.5, -1), outcome 1 at its last token (3);
    # completion 1: 2 tokens, no steps, outcome 0; its third slot is padding
    rewards = token_rewards(torch.tensor([4, 2]), torch.tensor([1.0, 0.0]), [[0.5, -1.0], []], [[1, 3], []])
    assert rewards.tolist() == [[0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # -1 + 1 at token 3
    rewards = token_rewards(torch.tensor([4, 2]), torch.tensor([2.0, 3.0]), [[0.5, -1.0], []], [[1, 3], []])
    assert rewards.tolist() == [[0.0, 0.5, 0.0, 1.0], [0.0, 3.0, 0.0, 0.0]]
    values = torch.tensor([[0.2, 0.4, 0.1, 0.3], [1.0, 2.0, 9.0, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0 backwards: d3 = 1 - 0.3 = 0.7; d2 = 0 + 0.9*0.3 - 0.1 = 0.17; d1 = 0.5 + 0.9*0.1 - 0.4 = 0.19;
    # d0 = 0 + 0.9*0.4 - 0.2 = 0.16; A3 = 0.7, A2 = 0.17 + 0.45*0.7 = 0.485, A1 = 0.19 + 0.45*0.485 = 0.40825,
    # A0 = 0.16 + 0.45*0.40825 = 0.3437125.  row 1: d1 = 3 - 2 = 1, d0 = 0.9*2 - 1 = 0.8, A0 = 0.8 + 0.45 = 1.25
    assert torch.allclose(adv, torch.tensor([[0.3437125, 0.40825, 0.485, 0.7], [1.25, 1.0, 0, 0]], dtype=torch.float64))
    assert torch.allclose(ret, (adv + values) * mask)
    # gamma = lambda = 1: the advantage is the return-to-go minus the value
    adv1, ret1 = gae(rewards, values, mask, 1.0, 1.0)
    assert torch.allclose(ret1[0], torch.tensor([1.5, 1.5, 1.0, 1.0], dtype=torch.float64))
    assert torch.allclose(adv1, (ret1 - values) * mask)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0), (1.0, 0.5)])
def test_gae_and_whitening_equal_verls_formula(gamma, lam):
    rewards, values, mask = ragged(seed=int(gamma * 100 + lam * 10))
    ours, ours_ret = gae(rewards, values, mask, gamma, lam)
    ref, ref_ret = verl_gae(rewards, values, mask, gamma, lam)
    valid = mask.bool()
    assert torch.allclose(ours[valid], ref[valid]) and torch.allclose(ours_ret[valid], ref_ret[valid])
    assert torch.allclose(whiten(ours, mask)[valid], verl_whiten(ref, mask)[valid])


def test_length_adaptive_lambda_per_row_equals_verl_row_by_row():
    rewards, values, mask = ragged(seed=3)
    lengths = mask.sum(-1)
    lam = adaptive_lambda(lengths, alpha=0.5)
    assert torch.allclose(lam, torch.tensor([1 - 1 / 2.5, 0.0, 1 - 1 / 3.5, 0.0], dtype=torch.float64))  # clamped at 0
    ours, _ = gae(rewards, values, mask, 1.0, lam)
    for i in range(len(lengths)):
        ref, _ = verl_gae(rewards[i : i + 1], values[i : i + 1], mask[i : i + 1], 1.0, float(lam[i]))
        assert torch.allclose(ours[i][mask[i].bool()], ref[0][mask[i].bool()])
    assert math.isclose(float(adaptive_lambda(torch.tensor([100]), 0.05)), 0.8)  # VAPO's alpha: 1 - 1/(0.05*100)


# ---- the value loss and explained variance -----------------------------------------------------------------
def test_value_loss_clipping_hand_computed_and_equal_to_verl():
    values = torch.tensor([[1.0, 0.0, 2.0]])
    old = torch.tensor([[0.0, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 1.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    loss, clipped = value_loss(values, returns, old, mask, cliprange=0.5)
    # token 0: V=1 moved 1 from V_old=0, clipped to 0.5: max(1, 0.25) = 1 (unclipped kept) -> 0.5
    # token 1: V=0, R=1: both 1 -> 0.5, not clipped; token 2 masked
    assert loss.tolist() == [[0.5, 0.5, 0.0]] and clipped.tolist() == [[0.0, 0.0, 0.0]]
    loss, clipped = value_loss(torch.tensor([[1.0]]), torch.tensor([[2.0]]), old[:, :1], mask[:, :1], 0.5)
    assert loss.tolist() == [[0.5 * 1.5 ** 2]] and clipped.tolist() == [[1.0]]  # clipped V=0.5 is farther from R
    _, values, mask = ragged(seed=5)
    returns, old = values + torch.randn_like(values), values + 0.3 * torch.randn_like(values)
    ours, ours_clip = value_loss(values, returns, old, mask, 0.2)
    ref, ref_clip = verl_value_loss(values, returns, old, mask, 0.2)
    assert math.isclose(float(ours.sum() / mask.sum()), float(ref), rel_tol=1e-9)
    assert math.isclose(float(ours_clip.sum() / mask.sum()), float(ref_clip), rel_tol=1e-6) and 0 < float(ref_clip) < 1


def test_explained_variance_hand_computed_and_equal_to_verl():
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    returns = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    assert math.isclose(explained_variance(returns, returns, mask), 1.0, rel_tol=1e-4)
    assert math.isclose(explained_variance(returns, torch.full_like(returns, 2.0), mask), 0.0, abs_tol=1e-4)
    # R - V = [1, 1, -1]: var 4/3; var(R) = 1 -> 1 - 4/3 / (1 + 1e-5)
    worse = torch.tensor([[0.0, 1.0, 4.0, 0.0]])
    assert math.isclose(explained_variance(returns, worse, mask), 1 - (4 / 3) / (1 + 1e-5), rel_tol=1e-9)
    rewards, values, mask = ragged(seed=7)
    assert math.isclose(explained_variance(rewards, values, mask), verl_explained_variance(rewards, values, mask),
                        rel_tol=1e-9)


# ---- the update on a small random model ---------------------------------------------------------------------
def save_small(directory: Path, hidden: int) -> Policy:
    from rewardlab.policy.tiny import TinyBuild, build_model, build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer()
    model = build_model(TinyBuild(hidden_size=hidden, num_layers=1, num_heads=2, num_kv_heads=1,
                                  intermediate_size=2 * hidden), tok)
    model.save_pretrained(directory)
    return Policy(model=model.eval(), tokenizer=tok, source=str(directory), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A random 1-layer policy saved to disk (the critic copies its backbone from there) and a narrower model."""
    root = tmp_path_factory.mktemp("ppo_models")
    narrow = save_small(root / "narrow", 16)
    return save_small(root / "policy", 32), narrow


def make_batch(policy, completions, rewards, reference="22"):
    tok, n = policy.tokenizer, len(completions)
    ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
    return Batch(prompt_id=["p"] * n, prompt=["17+5=?\n"] * n, completion=list(completions),
                 prompt_ids=[tok("17+5=?\n", add_special_tokens=False)["input_ids"]] * n, completion_ids=ids,
                 finish_reason=["stop"] * n, reference=[reference] * n, solution=[None] * n, reward=list(rewards))


COMPLETIONS = ["17+5=22\n#### 22", "17+5=23\n#### 23", "17+5=22\n#### 21", "22"]


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def changed(before, model):
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_warmup_trains_only_the_critic_then_both_and_the_state_round_trips(small, tmp_path):
    policy, _ = small
    algo = PPO(AlgoContext(max_new_tokens=16), lr=1e-2, minibatch_size=2, critic={"warmup": 1, "lr": 1e-2})
    batch = make_batch(policy, COMPLETIONS, [1.0, 0.0, 0.0, 1.0])
    policy_before = snapshot(policy.model)
    out = algo.update(policy, batch)
    critic_before = snapshot(algo.critic.model)
    assert out[SKIPPED] == 1.0 and "warm-up (1 of 1)" in out["update/skip_reason"]
    assert not changed(policy_before, policy.model)  # warm-up: the policy is untouched
    for key in ("critic/value_loss", "critic/explained_variance", "critic/values_mean", "critic/clip_fraction"):
        assert math.isfinite(out[key]), key
    out = algo.update(policy, batch)
    assert SKIPPED not in out and changed(policy_before, policy.model) and changed(critic_before, algo.critic.model)
    assert out["update/steps"] == 2.0 and math.isfinite(out["loss"]) and "kl" not in out
    assert [len(a) for a in batch.advantages] == [len(c) for c in batch.completion_ids]

    torch.save(algo.state_dict(), tmp_path / "state.pt")  # checkpoint.py reads it back with weights_only=True
    fresh = PPO(AlgoContext(max_new_tokens=16), lr=1e-2, minibatch_size=2, critic={"warmup": 1, "lr": 1e-2})
    fresh.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True), policy)
    fresh.setup(policy)
    assert fresh.critic_updates == 2
    for k, v in algo.critic.model.state_dict().items():
        assert torch.equal(fresh.critic.model.state_dict()[k], v), k
    assert fresh.critic.optimizer.state_dict()["state"][0]["step"] == algo.critic.optimizer.state_dict()["state"][0]["step"]


def test_kl_in_the_reward_and_process_rewards_at_step_ends(small, monkeypatch):
    policy, _ = small
    batch = make_batch(policy, COMPLETIONS[:3], [0.0, 0.0, 0.0])
    ArithStepsReward().score(batch)
    batch.rewards["verifiable"] = [1.0, 0.0, 0.0]
    algo = PPO(AlgoContext(max_new_tokens=16), credit="sum", outcome="verifiable", beta=0.1, kl_in_reward=True)
    rewards = algo.rewards_per_token(batch, policy.tokenizer, 17)
    first_step_end = batch.completion[0].index("\n") - 1  # the arith step "17+5=22" ends on its last char
    assert rewards[0, first_step_end] == batch.step_rewards[0][0]
    assert float(rewards[0].sum()) == pytest.approx(sum(batch.step_rewards[0]) + 1.0)
    assert float(rewards[1].sum()) == pytest.approx(sum(batch.step_rewards[1]))
    assert algo.kl_loss_coef == 0.0  # the KL goes into the reward, not the loss
    seen = {}

    def shifted_reference(self, policy_, t):  # the sampling policy's log-probs minus 0.5: KL_t = 0.5 on every token
        seen["called"] = True
        with torch.no_grad():
            return self._forward_logprobs(policy_.model, t) - 0.5
    monkeypatch.setattr(PPO, "_ref_logprobs", shifted_reference)
    out = algo.update(policy, batch)
    assert seen["called"] and out["reward/kl_penalty"] == pytest.approx(0.5, abs=1e-5)
    assert "kl" not in out and math.isfinite(out["critic/value_loss"])


def test_a_local_critic_model_and_a_checkpoint_whose_head_it_cannot_take(small, tmp_path):
    policy, narrow = small
    algo = PPO(AlgoContext(), critic={"model": narrow.source})
    rng = torch.get_rng_state()
    algo.setup(policy)
    assert torch.equal(torch.get_rng_state(), rng)  # building the critic draws nothing from the run's RNG
    assert algo.critic.model.head.in_features == 16
    wide = PPO(AlgoContext())
    wide.setup(policy)
    resumed = PPO(AlgoContext(), critic={"model": narrow.source})
    resumed.load_state_dict(wide.state_dict(), policy)
    with pytest.raises(UserError, match="value head over 32 features.*16-wide"):
        resumed.setup(policy)
    with pytest.raises(UserError, match="has no config.json"):
        PPO(AlgoContext(), critic={"model": str(tmp_path)}).setup(policy)


@pytest.mark.parametrize("settings,message", [
    ({"gamma": 1.5}, r"algo.gamma=1.5 is outside \[0, 1\]"),
    ({"lam": -0.1}, r"algo.lam=-0.1 is outside \[0, 1\]"),
    ({"lam_critic": 2.0}, "algo.lam_critic=2.0"),
    ({"lam_alpha": 0.0}, "algo.lam_alpha"),
    ({"advantage": "grpo"}, "GAE"),
    ({"critic": {"cliprange_value": -1.0}}, "cliprange_value"),
    ({"outcome": "verifiable"}, "set algo.credit=sum or min"),
])
def test_bad_settings_fail_with_the_fix(settings, message):
    with pytest.raises(UserError, match=message):
        PPO(AlgoContext(), **settings)


# ---- through the CLI ----------------------------------------------------------------------------------------
SMALL = ["logger=none", "run.iterations=2", "run.eval_every=2", "run.eval_size=8", "run.prompts_per_iteration=4",
         "algo.samples_per_prompt=4", "run.threads=1"]


def train(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rewardlab", "train", *args], capture_output=True, text=True,
                          timeout=900, env=env, cwd=REPO)


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("time/")} for line in lines]


# VAPO with process rewards and the KL in the reward: the richest PPO configuration, so one uninterrupted run of it
# serves both the end-to-end checks and the SIGKILL test's reference (its checkpoint after iteration 2 holds the
# policy's AdamW state, the critic, its optimizer and the warm-up count)
VAPO = ["algo=ppo", "reward=arith_steps", "algo.credit=sum", "algo.kl_in_reward=true", "algo.beta=0.05",
        "algo.lam_critic=1.0", "algo.lam_alpha=0.05", "algo.critic.warmup=1", *SMALL, "run.iterations=3",
        "run.eval_every=1"]


@pytest.fixture(scope="module")
def vapo_run(tiny_policy, tmp_path_factory) -> Path:
    """Three uninterrupted VAPO iterations through the CLI: a critic-only warm-up, then two full updates."""
    run_dir = tmp_path_factory.mktemp("vapo") / "whole"
    done = train(*VAPO, f"hydra.run.dir={run_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_vapo_with_process_rewards_and_kl_in_reward_end_to_end(vapo_run):
    warmup, *trained = rows(vapo_run)[1:]
    assert warmup[SKIPPED] == 1.0 and "loss" not in warmup  # the warm-up iteration trained the critic only
    for row in trained:
        assert SKIPPED not in row and math.isfinite(row["loss"]) and 0 < row["critic/policy_lambda_mean"] < 1
    for row in (warmup, *trained):
        for key in ("critic/value_loss", "critic/explained_variance", "critic/values_mean", "critic/clip_fraction",
                    "reward/kl_penalty", "process/steps"):
            assert key in row, key


def test_gamma_outside_the_unit_interval_is_one_line_and_exit_2(tmp_path):
    done = train("algo=ppo", "algo.gamma=1.5", *SMALL, f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == "error: algo.gamma=1.5 is outside [0, 1]"


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_metrics(vapo_run, tmp_path):
    from test_resume import start_and_wait

    cut = tmp_path / "cut"
    env = {**os.environ, "WANDB_SILENT": "true"}
    proc = start_and_wait([sys.executable, "-m", "rewardlab", "train", *VAPO, f"hydra.run.dir={cut}"], cut,
                          "iter_0002", env)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert len(rows(cut)) < 4 and not (cut / "summary.json").exists()
    resumed = train(f"resume={cut}")
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr[-3000:]
    assert rows(cut) == rows(vapo_run) and "critic/value_loss" in rows(vapo_run)[-1]


@pytest.mark.slow
def test_torchrun_two_ranks_train_identical_policy_and_critic_weights(tiny_policy, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "rewardlab", "train", "algo=ppo", *SMALL, "run.eval_size=6", f"hydra.run.dir={run_dir}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert len(set(summary["rank_param_sha256"])) == 1 and len(set(summary["rank_critic_param_sha256"])) == 1
    from rewardlab.algos.critic import CriticConfig, load_value_model
    from rewardlab.distributed import param_digest

    initial = param_digest(load_value_model(CriticConfig(), tiny_policy, seed=0))
    assert summary["rank_critic_param_sha256"][0] != initial  # the critic trained, identically on both ranks
    assert SKIPPED not in rows(run_dir)[-1] and rows(run_dir)[-1]["rollouts"] == 16.0
