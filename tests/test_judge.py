"""LLM-as-a-judge: score parsing on crafted outputs, missing scores, k-sample averaging, fallback, and a
real judge generation with the tiny model (as the policy itself and loaded from a path)."""

import math

import pytest

from rewardlab.errors import UserError
from rewardlab.rewards.judge import JudgeModel, JudgeReward, LLMJudge, RuleJudge, parse_score, parse_verdict
from rewardlab.rollout import Batch


@pytest.mark.parametrize("text, expected", [
    ("The response is relevant... Score: 4", 4.0),
    ("Justification.\nScore: 3.5\n", 3.5),
    ("score: 2.", 2.0),
    ("Score: 0", 0.0),
    ("Score: 5\nScore: 5", 5.0),  # repeated but consistent
    ("Score: 7", None),  # out of range
    ("Score: -1", None),
    ("Score: 3 or 4", None),  # several numbers
    ("Score: 2\nScore: 4", None),  # conflicting score lines
    ("Score: 4/5", None),  # not the asked-for format
    ("I would give it 4 points.", None),  # a number, but not in the format
    ("", None),
    (":", None),
    ("Thought process:", None),
    ("Score:", None),
])
def test_parse_score(text, expected):
    assert parse_score(text) == expected


def test_parse_score_custom_format_and_range():
    assert parse_score("12+3=15\n#### 3", r"####\s*([^\n]*)", 1, 10) == 3.0
    assert parse_score("#### 15", r"####\s*([^\n]*)", 1, 10) is None


def test_parse_verdict():
    verdicts = {"A": 1.0, "B": 0.0, "C": 0.5}
    pattern = r"\[\[([ABC])\]\]"
    assert parse_verdict("A is more helpful. [[A]]", pattern, verdicts) == 1.0
    assert parse_verdict("[[B]]", pattern, verdicts) == 0.0
    assert parse_verdict("[[C]]", pattern, verdicts) == 0.5
    assert parse_verdict("[[A]] then [[B]]", pattern, verdicts) is None
    assert parse_verdict("A", pattern, verdicts) is None


def rows(completions, references):
    n = len(completions)
    return Batch(prompt_id=[f"p{i // 2}" for i in range(n)], prompt=["2+3=?\n"] * n, completion=list(completions),
                 prompt_ids=[[]] * n, completion_ids=[[]] * n, finish_reason=["stop"] * n,
                 reference=list(references), solution=[None] * n)


class CannedJudge(LLMJudge):
    """An LLM judge whose model outputs are given, to test parsing and aggregation without a model."""

    def __init__(self, outputs, samples):
        super().__init__(JudgeModel(samples=samples))
        self.outputs = outputs

    def ask(self, queries):
        assert len(queries) == len(self.outputs) and all("2+3=?" in q for q in queries)
        return self.outputs


def test_judge_reward_averages_samples_and_marks_missing_rows():
    reward = JudgeReward()
    reward.judge = CannedJudge([["Score: 4", "Score: 2"], ["Score: 5", "nonsense"], [":", "Thought process:"]], 2)
    batch = rows(["a", "b", "c"], ["5", "5", "5"])
    reward.score(batch)
    assert batch.reward[:2] == [3.0, 5.0] and math.isnan(batch.reward[2])  # missing, never 0 or 5
    m = reward.metrics(batch)
    assert m["judge/parse_failure_rate"] == pytest.approx(3 / 6) and m["judge/missing_rate"] == pytest.approx(1 / 3)


def test_judge_fallback_scores_only_missing_rows_and_is_reported():
    reward = JudgeReward(fallback="correct")
    reward.judge = CannedJudge([["Score: 2"], ["no score"], ["no score"]], 1)
    batch = rows(["#### 5", "#### 5", "#### 6"], ["5", "5", "5"])
    reward.score(batch)
    assert batch.reward == [2.0, 5.0, 0.0]
    assert math.isnan(batch.extra["judge_score"][1])
    assert reward.metrics(batch)["judge/fallback_rate"] == pytest.approx(2 / 3)


def test_judge_with_no_parsable_score_stops_with_a_user_error():
    reward = JudgeReward()
    reward.judge = CannedJudge([["Score: 9"], ["Score:"]], 1)
    with pytest.raises(UserError, match="none of the 2 judge outputs"):
        reward.score(rows(["a", "b"], ["5", "5"]))


def test_rule_judge_from_config():
    reward = JudgeReward(judge={"model": "rule:correct"})
    assert isinstance(reward.judge, RuleJudge)
    batch = rows(["#### 5", "#### 4", "#### 5"], ["5", "5", None])
    reward.score(batch)
    assert batch.reward[:2] == [5.0, 0.0] and math.isnan(batch.reward[2])
    with pytest.raises(UserError, match="not one of"):
        JudgeReward(judge={"model": "rule:vibes"})


def test_llm_judge_generates_k_samples_with_the_policy_and_from_a_path(tiny_policy):
    reward = JudgeReward(judge={"model": "self", "samples": 2, "max_new_tokens": 4, "temperature": 1.0},
                         fallback="correct")
    reward.bind(tiny_policy)
    assert reward.judge.generator.policy is tiny_policy
    batch = rows(["2+3=5\n#### 5", "#### 7"], ["5", "5"])
    outputs = reward.judge.ask([reward.template.format(prompt=p, response=c)
                                for p, c in zip(batch.prompt, batch.completion)])
    assert [len(o) for o in outputs] == [2, 2]
    assert reward.judge.truncated == 2  # the 5-point prompt is longer than the tiny model's 512 positions
    reward.score(batch)  # the tiny model cannot write "Score:": every row falls back to the rule
    m = reward.metrics(batch)
    assert m["judge/parse_failure_rate"] == 1.0 and m["judge/fallback_rate"] == 1.0 and batch.reward == [5.0, 0.0]
    by_path = JudgeReward(judge={"model": tiny_policy.source, "samples": 1, "max_new_tokens": 2})
    by_path.bind(tiny_policy)
    assert by_path.judge.generator.policy is not tiny_policy
    assert len(by_path.judge.ask(["1+1=?\n"])[0]) == 1


def test_judge_agreement_with_gold_uses_the_judges_own_scores_not_the_fallback():
    """judge/gold_agreement: the judge's verdict (score >= the middle of its range) against the gold label, over
    the rows the judge itself scored; rows the fallback rule filled, or without gold, do not count."""
    reward = JudgeReward(fallback="correct")
    reward.judge = CannedJudge([["Score: 4"], ["Score: 1"], ["Score: 3"], ["no score"], ["Score: 5"]], 1)
    batch = rows(["#### 5", "#### 5", "#### 6", "#### 6", "#### 5"], ["5", "5", "5", "5", None])
    reward.score(batch)
    batch.gold = [True, True, False, False, None]  # as the run loop sets it after scoring
    m = reward.metrics(batch)
    # scored with gold: rows 0 (4 -> right, gold right), 1 (1 -> wrong, gold right), 2 (3 -> right, gold wrong)
    assert m["judge/gold_agreement"] == pytest.approx(1 / 3)
    assert m["judge/score_correct_mean"] == pytest.approx(2.5) and m["judge/score_incorrect_mean"] == pytest.approx(3.0)
    batch.gold = None
    assert "judge/gold_agreement" not in reward.metrics(batch)  # no references: nothing to agree with
