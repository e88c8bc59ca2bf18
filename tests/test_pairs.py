"""Pair builders on constructed batches whose right pairs are known by hand."""

import math

import pytest

from rewardlab.algos.pairs import anchored_rejection, best_worst, cream, dno, kendall_tau, spin
from rewardlab.errors import UserError
from rewardlab.rollout import Batch


def make_batch(groups: dict[str, list[tuple[str, float]]], solutions: dict[str, str] | None = None) -> Batch:
    """One row per (completion, reward), grouped by prompt id."""
    rows = [(pid, text, reward) for pid, items in groups.items() for text, reward in items]
    return Batch(prompt_id=[r[0] for r in rows], prompt=[f"{r[0]}=?\n" for r in rows],
                 completion=[r[1] for r in rows], prompt_ids=[[] for _ in rows], completion_ids=[[] for _ in rows],
                 finish_reason=["stop"] * len(rows), reference=[None] * len(rows),
                 solution=[(solutions or {}).get(r[0]) for r in rows], reward=[r[2] for r in rows])


def test_best_worst_picks_extremes_and_skips_by_reason():
    batch = make_batch({
        "a": [("a1", 1.0), ("a2", 3.0), ("a3", 2.0)],  # pair a2 > a1, margin 2
        "tie": [("t1", 2.0), ("t2", 2.0)],
        "close": [("c1", 5.0), ("c2", 4.9)],  # margin 0.1 < 0.5
        "nan": [("n1", float("nan")), ("n2", 4.0)],  # one scored row only
        "same": [("x", 4.0), ("x", 1.0)],  # identical texts with different scores
    })
    out = best_worst(batch, min_margin=0.5)
    assert [(p.prompt_id, p.chosen, p.rejected) for p in out.pairs] == [("a", "a2", "a1")]
    assert out.pairs[0].prompt == "a=?\n" and out.pairs[0].label == 1.0
    assert dict(out.skipped) == {"tie": 1, "small_margin": 1, "too_few_scored": 1, "identical": 1}
    m = out.metrics()
    assert m["pairs/built"] == 1 and m["pairs/skipped"] == 4 and m["pairs/skipped/tie"] == 1
    assert m["pairs/chosen_reward"] == 3.0 and m["pairs/rejected_reward"] == 1.0 and m["pairs/reward_margin"] == 2.0


def test_best_worst_zero_margin_keeps_any_strict_gap():
    out = best_worst(make_batch({"c": [("c1", 5.0), ("c2", 4.9)]}), min_margin=0.0)
    assert [(p.chosen, p.rejected) for p in out.pairs] == [("c1", "c2")]


def test_anchored_rejection_rejects_the_initial_models_worst_sample():
    batch = make_batch({"p": [("new1", 4.0), ("new2", 5.0)], "q": [("q1", 1.0)], "r": [("r1", 3.0)]})
    anchors = make_batch({"p": [("old1", 2.0), ("old2", 0.0), ("old3", 1.0)], "q": [("q0", 2.0)]})
    out = anchored_rejection(batch, anchors)
    assert [(p.prompt_id, p.chosen, p.rejected, p.chosen_reward, p.rejected_reward) for p in out.pairs] == [
        ("p", "new2", "old2", 5.0, 0.0)]
    assert dict(out.skipped) == {"no_better": 1, "no_anchor": 1}  # q: 1.0 < anchor 2.0; r: no anchors


def test_spin_pairs_reference_response_against_own_sample():
    batch = make_batch({"p": [("1+2=3\n#### 3", 1.0), ("1+2=4\n#### 4", 0.0)], "q": [("#### 5", 1.0)],
                        "s": [("x", 0.0)]},
                       solutions={"p": "1+2=3\n#### 3", "q": "#### 5"})
    out = spin(batch)
    assert [(p.chosen, p.rejected, p.rejected_reward) for p in out.pairs] == [("1+2=3\n#### 3", "1+2=4\n#### 4", 0.0)]
    assert dict(out.skipped) == {"matches_reference": 1, "no_reference_response": 1}


def test_kendall_tau_b():
    assert kendall_tau([1, 2, 3, 4], [10, 20, 30, 40]) == 1.0
    assert kendall_tau([1, 2, 3, 4], [4, 3, 2, 1]) == -1.0
    assert kendall_tau([1, 2, 3], [1, 1, 2]) == pytest.approx(2 / math.sqrt(6))  # scipy's tau-b: 0.8165
    assert math.isnan(kendall_tau([1, 2, 3], [5, 5, 5]))


def test_cream_labels_follow_ranking_agreement():
    batch = make_batch({"agree": [("a1", 1.0), ("a2", 2.0), ("a3", 3.0)],
                        "reverse": [("r1", 1.0), ("r2", 2.0), ("r3", 3.0)],
                        "flat": [("f1", 1.0), ("f2", 2.0)]})
    previous = [0.1, 0.2, 0.3, 0.3, 0.2, 0.1, 7.0, 7.0]
    out = cream(batch, None, previous)  # cream_self: the run's reward ranks
    labels = {p.prompt_id: p.label for p in out.pairs}
    assert labels == {"agree": 1.0, "reverse": 0.0, "flat": 1.0}  # flat: agreement undefined -> plain DPO
    assert out.metrics()["pairs/cream_undefined"] == 1.0
    first = cream(batch, None, None)  # no previous model yet
    assert all(p.label == 1.0 for p in first.pairs) and first.undefined_agreement == 3


def test_cream_pairs_follow_the_current_ranking_and_lambda_its_agreement_with_the_previous():
    batch = make_batch({"g": [("y0", 0.0), ("y1", 5.0), ("y2", 1.0)]})  # the run's reward is not used
    current, previous = [3.0, 1.0, 2.0], [2.0, 1.0, 3.0]
    (pair,) = cream(batch, current, previous).pairs
    assert (pair.chosen, pair.rejected, pair.chosen_reward, pair.rejected_reward) == ("y0", "y1", 3.0, 1.0)
    # pairs (0,1) concordant, (0,2) discordant, (1,2) concordant: tau = (2 - 1) / 3, lambda = (tau + 1) / 2
    assert pair.label == pytest.approx(2 / 3)


def test_dno_keeps_pairs_the_direct_verdict_supports():
    batch = make_batch({"p": [("p1", 0.9), ("p2", 0.1), ("p3", 0.5)], "q": [("q1", 0.8), ("q2", 0.2)]})
    nan = float("nan")
    batch.extra["group_index"] = [0, 1, 2, 0, 1]
    batch.extra["pairwise_prefs"] = [[nan, 0.9, 0.9], [0.1, nan, 0.1], [0.1, 0.9, nan],
                                     [nan, 0.4], [0.6, nan]]  # q: the direct verdict prefers q2
    out = dno(batch)
    assert [(p.chosen, p.rejected) for p in out.pairs] == [("p1", "p2")]
    assert dict(out.skipped) == {"judge_disagrees": 1}
    with pytest.raises(UserError, match="reward=pairwise_judge"):
        dno(make_batch({"p": [("a", 1.0), ("b", 0.0)]}))
