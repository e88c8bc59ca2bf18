"""Pairwise win rate (Pref-GRPO) with deterministic rule judges, so the expected win rates are known."""

import math

import pytest
import torch

from rewardlab.algos.advantages import ESTIMATORS
from rewardlab.algos.pairs import dno
from rewardlab.errors import UserError
from rewardlab.rewards.judge import JudgeModel, LLMJudge
from rewardlab.rewards.pairwise import PairwiseJudgeReward
from rewardlab.rollout import Batch


def group_batch(groups: dict[str, list[str]]) -> Batch:
    rows = [(pid, c) for pid, cs in groups.items() for c in cs]
    return Batch(prompt_id=[p for p, _ in rows], prompt=[f"{p}=?\n" for p, _ in rows],
                 completion=[c for _, c in rows], prompt_ids=[[]] * len(rows), completion_ids=[[]] * len(rows),
                 finish_reason=["stop"] * len(rows), reference=["5"] * len(rows), solution=[None] * len(rows))


def test_win_rate_with_a_correctness_judge():
    reward = PairwiseJudgeReward(judge={"model": "rule:correct"})
    batch = group_batch({"p": ["#### 5", "#### 5", "#### 4", "#### 3"], "q": ["#### 5", "#### 1"]})
    reward.score(batch)
    # a correct answer: ties the other correct one (0.5) and beats both wrong ones -> (0.5+1+1)/3
    assert batch.reward == pytest.approx([5 / 6, 5 / 6, 1 / 6, 1 / 6, 1.0, 0.0])
    m = reward.metrics(batch)
    assert m["judge/order_agreement"] == 1.0 and m["judge/parse_failure_rate"] == 0.0 and m["judge/comparisons"] == 7
    assert batch.extra["group_index"] == [0, 1, 2, 3, 0, 1]
    assert batch.extra["pairwise_prefs"][0][2] == 1.0 and math.isnan(batch.extra["pairwise_prefs"][0][0])
    # usable by GRPO: group-normalized advantages rank correct above incorrect
    adv = ESTIMATORS["grpo"](torch.tensor(batch.reward[:4], dtype=torch.float64), torch.zeros(4, dtype=torch.long))
    assert adv[0] > 0 > adv[2]
    # and its verdicts label DPO pairs (DNO-style)
    pairs = dno(batch)
    assert [(p.chosen, p.rejected) for p in pairs.pairs] == [("#### 5", "#### 4"), ("#### 5", "#### 1")]


def test_asking_both_orders_cancels_position_bias():
    reward = PairwiseJudgeReward(judge={"model": "rule:first"})  # always prefers what it sees first
    batch = group_batch({"p": ["#### 5", "#### 4", "#### 3"]})
    reward.score(batch)
    assert batch.reward == [0.5, 0.5, 0.5]
    assert reward.metrics(batch)["judge/order_agreement"] == 0.0


class CannedPairwise(LLMJudge):
    def __init__(self, answers):
        super().__init__(JudgeModel(samples=1))
        self.answers = answers

    def ask(self, queries):
        return [[self.answers(q)] for q in queries]


def test_llm_verdicts_are_parsed_and_unparsable_comparisons_fall_back():
    def answers(query):  # prefers "#### 5" when it is response A; garbage whenever "#### 3" is involved
        if "#### 3" in query:
            return "I cannot decide :"
        return "[[A]]" if query.index("#### 5") < query.index("#### 4") else "[[B]]"

    reward = PairwiseJudgeReward(fallback="correct")
    reward.judge = CannedPairwise(answers)
    batch = group_batch({"p": ["#### 5", "#### 4", "#### 3"]})
    reward.score(batch)
    # 5 beats 4 by the judge (both orders agree); 3's comparisons fall back to correctness: 5 > 3, 4 ~ 3
    assert batch.reward == pytest.approx([1.0, 0.25, 0.25])
    m = reward.metrics(batch)
    assert m["judge/parse_failure_rate"] == pytest.approx(4 / 6) and m["judge/order_agreement"] == 1.0
    assert m["judge/fallback_rate"] == pytest.approx(2 / 3)


def test_no_parsable_verdict_stops_with_a_user_error():
    reward = PairwiseJudgeReward()
    reward.judge = CannedPairwise(lambda q: "[[D]]")
    with pytest.raises(UserError, match="pairwise judge outputs"):
        reward.score(group_batch({"p": ["#### 5", "#### 4"]}))


def test_pairwise_gold_agreement_counts_only_right_vs_wrong_comparisons_the_judge_decided():
    from rewardlab.rewards.pairwise import pairwise_gold_agreement

    gold = [1.0, 0.0, 0.0, 1.0, None]
    judged = {(0, 1): 0.9,  # right one wins: agrees
              (2, 3): 0.8,  # wrong one (2) wins: disagrees
              (0, 3): 0.1,  # both right: not counted
              (1, 2): 0.5,  # both wrong: not counted
              (3, 2): 0.5,  # a tie on right vs wrong: half
              (0, 2): float("nan"),  # no verdict: not counted
              (0, 4): 1.0}  # no gold: not counted
    out = pairwise_gold_agreement(judged, gold)
    assert out == {"judge/gold_agreement": pytest.approx(1.5 / 3), "judge/gold_comparisons": 3.0}
    assert pairwise_gold_agreement(judged, None) == {} and pairwise_gold_agreement({}, gold) == {}
