"""Evaluation: maj@k votes by mathematical equivalence, pass@k is unbiased over all samples, and evaluating
never moves the training random stream (unit level with a scripted generator, and through the CLI)."""

import pytest
import torch

from conftest import SMALL_RUN, read_metrics, run_cli
from rewardlab.data.base import Example
from rewardlab.evaluation import evaluate, majority_correct
from rewardlab.rollout import Batch


class ScriptedGenerator:
    """Returns fixed completions per prompt; each sampled call also draws from torch's global generator,
    as a real sampler does, and records the draw."""

    def __init__(self, sampled: list[str], greedy: str) -> None:
        self.sampled, self.greedy, self.draws = sampled, greedy, []

    def generate(self, examples, n=1, greedy=False):
        if not greedy:
            self.draws.append(torch.rand(3).tolist())
        texts = [self.greedy] * n if greedy else self.sampled[:n]
        rows = [(ex, t) for ex in examples for t in texts]
        return Batch(prompt_id=[ex.id for ex, _ in rows], prompt=[ex.prompt for ex, _ in rows],
                     completion=[t for _, t in rows], prompt_ids=[[1]] * len(rows),
                     completion_ids=[[1] * len(t) for _, t in rows], finish_reason=["stop"] * len(rows),
                     reference=[ex.answer for ex, _ in rows], solution=[None] * len(rows))


def test_maj_at_k_clusters_equivalent_answers():
    # by exact string "3" wins 2 votes to 1; as numbers 1/2 = 0.5 = \frac12 wins 3 to 2
    answers = ["3", "1/2", "0.5", "\\frac12", "3"]
    assert majority_correct(answers, "\\frac{1}{2}") == 1.0
    assert majority_correct(answers[:2] + [None, None], "3") == 1.0  # no answer never votes; ties: first seen
    assert majority_correct([None, None], "3") == 0.0
    gen = ScriptedGenerator([f"so \\boxed{{{a}}}" for a in answers], greedy="\\boxed{0.5}")
    out = evaluate(gen, [Example("q", "q", answer="\\frac{1}{2}")], pass_k=[1, 5])
    assert out["eval/accuracy"] == 1.0
    assert out["eval/maj@5"] == 1.0 and out["eval/maj@1"] == 0.0  # maj@1 is the first sample alone ("3")
    assert out["eval/pass@1"] == pytest.approx(3 / 5) and out["eval/pass@5"] == 1.0  # unbiased over all 5


def test_accuracy_counts_only_problems_with_a_reference():
    """A test split with unanswered problems (label-free data) gives accuracy over the answered ones, says how
    many those were, and no accuracy at all when there are none, instead of failing or counting them wrong."""
    gen = ScriptedGenerator(["\\boxed{2}", "\\boxed{3}"], greedy="\\boxed{2}")
    mixed = [Example("a", "a", answer="2"), Example("b", "b", answer=None), Example("c", "c", answer="3")]
    out = evaluate(gen, mixed, pass_k=[2])
    assert out["eval/accuracy"] == 0.5 and out["eval/with_reference"] == 2.0
    assert out["eval/pass@2"] == 1.0  # over the two answered problems only
    none = evaluate(gen, [Example("b", "b", answer=None)], pass_k=[2])
    assert "eval/accuracy" not in none and none["eval/with_reference"] == 0.0 and "eval/pass@2" not in none


def test_evaluation_sampling_has_its_own_seeded_random_state():
    examples = [Example("q", "q", answer="1")]
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    first, second = ScriptedGenerator(["1"] * 4, "1"), ScriptedGenerator(["1"] * 4, "1")
    evaluate(first, examples, pass_k=[2], seed=7)
    assert torch.equal(torch.rand(4), expected)  # the caller's stream did not move
    evaluate(second, examples, pass_k=[2], seed=7)
    assert first.draws == second.draws  # same seed, same samples
    evaluate(second, examples, pass_k=[2], seed=8)
    assert second.draws[1] != second.draws[0]


@pytest.mark.slow
def test_pass_k_evaluation_leaves_training_unchanged(piped_run, tmp_path):
    baseline, plain_dir = piped_run("grpo")  # conftest: SMALL_RUN with an eval every iteration
    assert baseline.returncode == 0, baseline.stderr[-3000:]
    done = run_cli("train", "algo=grpo", *SMALL_RUN, "run.eval_every=1", "run.eval_pass_k=[1,4]",
                   f"hydra.run.dir={tmp_path / 'pass_k'}")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = {"plain": read_metrics(plain_dir), "pass_k": read_metrics(tmp_path / "pass_k")}
    assert "eval/maj@4" in runs["pass_k"][1] and "eval/maj@4" not in runs["plain"][1]
    for plain, with_pass_k in zip(runs["plain"][1:], runs["pass_k"][1:]):
        for key in ("reward/mean", "loss", "gold/accuracy", "eval/accuracy"):
            assert plain[key] == with_pass_k[key], key
