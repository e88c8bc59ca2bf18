"""Test-time search (rewardlab/search.py) and the best-of-N bench curve: picks on hand-made answers and scores,
beam search on a toy whose best path is known, and `rewardlab eval search=...` end to end."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
from omegaconf import OmegaConf

from conftest import run_cli
from rewardlab.data.base import Example
from rewardlab.errors import UserError
from rewardlab.generation.hf import Sampling
from rewardlab.rmlab.best_of_n import curve, sizes
from rewardlab.rollout import Batch
from rewardlab.search import BeamSearch, majority_pick, top_pick, weighted_majority_pick
from rewardlab.steps import StepSplit

NAN = float("nan")


def test_top_pick_takes_the_first_of_tied_scores_and_never_a_non_finite_one():
    assert top_pick([0.2, 0.9, 0.9, 0.1]) == 1
    assert top_pick([NAN, 0.3, math.inf, 0.5]) == 3
    assert top_pick([NAN, None]) is None and top_pick([]) is None


def test_weighted_majority_sums_rewards_per_equivalent_answer():
    answers = ["1/2", "3", "0.5", None, "3"]
    # cluster {1/2, 0.5} weighs 0.4 + 0.4 = 0.8 > cluster {3} 0.3 + 0.3; the unanswered row's 5.0 does not vote
    assert weighted_majority_pick(answers, [0.4, 0.3, 0.4, 5.0, 0.3]) == 0
    # {3}: 0.2 + 0.9 = 1.1 beats 0.8; the pick is the cluster's best-scored row
    assert weighted_majority_pick(answers, [0.4, 0.2, 0.4, 0.0, 0.9]) == 4
    assert weighted_majority_pick(["7", "8"], [0.5, 0.5]) == 0  # a tie goes to the cluster seen first
    assert weighted_majority_pick(["7", "8"], [NAN, 0.1]) == 1  # a non-finite score does not vote
    assert weighted_majority_pick([None, None], [1.0, 1.0]) is None


def test_majority_pick_counts_votes_by_equivalence():
    assert majority_pick(["3", "1/2", "0.5", None, None]) == 1
    assert majority_pick(["3", "4"]) == 0 and majority_pick([None]) is None


def test_curve_on_hand_computed_samples():
    # one prompt, n = 4: answers 5 (right), 6, 6, None; the reward prefers the right one
    rows = curve([["5", "6", "6", None]], [[0.9, 0.2, 0.3, 0.1]], [[1.0, 0.0, 0.0, 0.0]], subsets=64)
    assert sizes(4) == [1, 2, 4] and sizes(6) == [1, 2, 4, 6] and [r["k"] for r in rows] == [1, 2, 4]
    at_n = rows[-1]  # every subset is all four samples
    assert at_n["best"] == 1.0 and at_n["majority"] == 0.0 and at_n["pass"] == 1.0
    assert at_n["weighted_majority"] == 1.0 and at_n["proxy"] == pytest.approx(0.9)  # 0.9 beats 0.2 + 0.3
    one = rows[0]  # k = 1: every method keeps the one sample, except majority when it has no answer
    assert one["pass"] == pytest.approx(0.25) and one["best"] == one["weighted_majority"] == one["majority"]


# ---- beam search on a toy whose best path is known --------------------------------------------------------
EOS = 0


class CharTokenizer:
    """One token per character; id 0 is EOS."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != EOS)


# continuations by partial solution; the first step "x" looks best, but only "y" leads to the right answer
TREE = {"": ["x\nzz", "y\nzz"], "x\n": ["#### 1"], "y\n": ["#### 2"]}
STEP_SCORES = {"x": 0.9, "y": 0.6, "#### 1": 0.1, "#### 2": 0.95}


@dataclass
class StubPolicy:
    tokenizer: CharTokenizer


class TreeGenerator:
    """Sample j of a prompt is the partial solution's j-th listed continuation (cyclically); a final answer
    ends with EOS, any other text runs past its step boundary (the search must cut it)."""

    def __init__(self, budget: int = 40) -> None:
        self.policy = StubPolicy(CharTokenizer())
        self.sampling = Sampling(max_new_tokens=budget)
        self.calls: list[int] = []

    def generate(self, prompts, n=1, sampling=None, greedy=False):
        rows, texts, ids, finish = [], [], [], []
        for ex in prompts:
            partial = ex.prompt[len("q\n"):]
            for j in range(n):
                text = TREE[partial][j % len(TREE[partial])][: sampling.max_new_tokens]
                stop = text.startswith("####")
                rows.append(ex)
                texts.append(text)
                ids.append([ord(c) for c in text] + ([EOS] if stop else []))
                finish.append("stop" if stop else "length")
        self.calls.append(len(rows))
        return Batch(prompt_id=[e.id for e in rows], prompt=[e.prompt for e in rows], completion=texts,
                     prompt_ids=[[] for _ in rows], completion_ids=ids, finish_reason=finish,
                     reference=[e.answer for e in rows], solution=[None] * len(rows),
                     question=[e.question for e in rows], messages=[None] * len(rows))


class StubPRM:
    """Each step's score from STEP_SCORES; the scalar is the last step's (reward.aggregate=last)."""

    name, process, split = "stub_prm", True, StepSplit()

    def __init__(self) -> None:
        self.scored: list[list[str]] = []

    def score(self, batch):
        batch.steps = [[s for s, _ in self.split.split(text)] for text in batch.completion]
        self.scored.extend(batch.steps)
        batch.step_rewards = [[STEP_SCORES.get(s, 0.0) for s in steps] for steps in batch.steps]
        batch.reward = [row[-1] for row in batch.step_rewards]
        batch.rewards[self.name] = list(batch.reward)


def test_beam_search_keeps_the_path_whose_first_step_looks_worse():
    example = [Example("toy", "q\n", answer="2", question="q")]
    wide = BeamSearch(beam_width=2, expansions=1, max_steps=4, step_tokens=8)
    generator, prm = TreeGenerator(), StubPRM()
    found = wide.run(generator, prm, example, "hash")
    assert found["eval/accuracy"] == 1.0 and found["eval/search/reward_mean"] == 0.95  # x -> #### 1 scores 0.1
    assert ["x"] in prm.scored and ["y"] in prm.scored  # the text after each step's newline was cut off
    assert ["y", "#### 2"] in prm.scored and ["x", "#### 1"] in prm.scored
    # root: beam_width * expansions = 2 samples of 4 tokens ("x\nzz"); then one expansion per beam, 6 + EOS each
    assert generator.calls == [2, 2] and found["eval/search/samples"] == 4
    assert found["eval/search/tokens"] == 2 * 4 + 2 * 7
    assert found["eval/length"] == len("y\n#### 2") + 1  # kept tokens: the step, its newline, the answer, EOS

    narrow = BeamSearch(beam_width=1, expansions=2, max_steps=4, step_tokens=8).run(
        TreeGenerator(), StubPRM(), example, "hash")
    assert narrow["eval/accuracy"] == 0.0 and narrow["eval/search/reward_mean"] == pytest.approx(0.1)


def test_beam_search_ends_open_beams_at_max_steps_and_the_token_budget():
    example = [Example("toy", "q\n", answer="2", question="q")]
    one_step = BeamSearch(beam_width=2, expansions=1, max_steps=1, step_tokens=8)
    found = one_step.run(TreeGenerator(), StubPRM(), example, "hash")
    assert found["eval/truncated"] == 1.0 and found["eval/accuracy"] == 0.0
    assert found["eval/search/reward_mean"] == 0.9  # the finished one-step beams compete: "x" scores best
    tight = BeamSearch(beam_width=2, expansions=1, max_steps=8, step_tokens=8)
    found = tight.run(TreeGenerator(budget=3), StubPRM(), example, "hash")  # "y\n" + one token of "#### 2"
    assert found["eval/truncated"] == 1.0 and found["eval/length"] == 3 and found["eval/accuracy"] == 0.0


def test_beam_search_needs_a_process_reward():
    class Outcome:
        name, process = "verifiable", False

    with pytest.raises(UserError, match="process reward"):
        BeamSearch().run(TreeGenerator(), Outcome(), [Example("toy", "q\n", answer="2")], "hash")
    with pytest.raises(UserError, match="beam_width"):
        BeamSearch(beam_width=0)


@pytest.mark.parametrize("choice", ["greedy", "best_of_n", "weighted_majority", "beam"])
def test_every_search_choice_composes_into_eval(choice):
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rewardlab.config import register_schemas
    from rewardlab.search import configured

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose("eval", overrides=[f"search={choice}", "reward=arith_steps"])
        assert compose("eval").search.name == "greedy" and compose("eval").reward is None  # today's eval
    search = configured(cfg.search, has_reward=True)
    assert (search is None) == (choice == "greedy") and (search is None or search.name == choice)


# ---- end to end with the tiny policy ------------------------------------------------------------------------
def test_eval_best_of_n_end_to_end(tmp_path):
    done = run_cli("eval", "search=best_of_n", "search.n=4", "reward=arith_steps", "run.eval_size=4",
                   "run.threads=1", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"run dir: {tmp_path}"
    out = json.loads((tmp_path / "eval.json").read_text())
    assert out["search"] == "best_of_n" and out["reward"] == "arith_steps" and out["eval/search/samples"] == 4
    assert 4 <= out["eval/search/tokens"] <= 4 * 40 and 0.0 <= out["eval/greedy_accuracy"] <= 1.0
    # the exact checker scores 1 only for a right solution, and it picks one whenever a sample has one
    assert out["eval/accuracy"] >= out["eval/search/reward_mean"]


def test_a_search_without_a_reward_is_one_line_and_exit_2(tmp_path):
    done = run_cli("eval", "search=weighted_majority", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: search=weighted_majority picks among sampled completions by a reward: add reward=... "
        "(e.g. reward=prm or reward=arith_steps)"]
    assert not (tmp_path / "eval.json").exists()


def test_best_of_n_bench_on_the_tiny_policy(tmp_path):
    from hydra import compose, initialize_config_module

    from rewardlab.config import register_schemas
    from rewardlab.rmlab.best_of_n import run

    register_schemas()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose("eval", overrides=["reward=arith_steps", "run.device=cpu"])
    OmegaConf.set_struct(cfg, False)  # the bench command's config arrives at merge: eval's fields plus `bench`
    cfg.bench = {"name": "best_of_n", "n": 4, "prompts": 4, "subsets": 2, "seed": 0}
    result = run(cfg, tmp_path)
    assert result["bench"] == "best_of_n" and [r["k"] for r in result["rows"]] == [1, 2, 4]
    assert (tmp_path / "best_of_n.png").stat().st_size > 1000
    metrics = result["metrics"]
    assert all(isinstance(v, float) for v in metrics.values()) and metrics["prompts"] == 4.0
    assert metrics["best@4"] <= metrics["pass@4"]  # at k = n the pick is among all samples
