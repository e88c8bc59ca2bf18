"""Pairwise win rate (Pref-GRPO): a judge compares every pair in a group, asked in both orders to
cancel position bias; r_i = mean over j != i of P(o_i > o_j). Usable as the reward for GRPO, and its
per-pair verdicts (kept in `extra["pairwise_prefs"]`) label DPO pairs with `algo.pairs=dno`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

from rewardlab.config import schema
from rewardlab.rewards.base import Reward
from rewardlab.rewards.judge import JudgeModel, LLMJudge, RuleJudge, make_judge, mean_or_nan, parse_verdict
from rewardlab.errors import UserError
from rewardlab.rollout import Batch

PAIRWISE_TEMPLATE = """Please act as an impartial judge and evaluate the quality of the two responses to the user \
question shown below. Choose the response that follows the user's instructions and answers the question better, \
considering helpfulness, relevance, accuracy, depth and level of detail. Do not let the order in which the \
responses are presented, their length or their style influence your decision. Explain your comparison briefly, \
then output your final verdict strictly in this format: "[[A]]" if response A is better, "[[B]]" if response B \
is better, and "[[C]]" for a tie.

[User Question]
{prompt}

[The Start of Response A]
{first}
[The End of Response A]

[The Start of Response B]
{second}
[The End of Response B]
"""

VERDICT_PATTERN = r"\[\[([ABC])\]\]"


@schema("reward", "pairwise_judge")
@dataclass
class PairwiseJudgeConfig:
    _target_: str = "rewardlab.rewards.pairwise.PairwiseJudgeReward"
    name: str = "pairwise_judge"
    judge: JudgeModel = field(default_factory=lambda: JudgeModel(samples=1))
    template: str = PAIRWISE_TEMPLATE  # fields: {prompt} (the raw question) {first} {second}
    pattern: str = VERDICT_PATTERN  # regex whose group 1 is a key of `verdicts`
    verdicts: Dict[str, float] = field(default_factory=lambda: {"A": 1.0, "B": 0.0, "C": 0.5})
    fallback: Optional[str] = None  # a rule (correct) deciding comparisons with no parsable verdict
    answer_format: str = "auto"


class PairwiseJudgeReward(Reward):
    """Win rate of each completion within its group under a pairwise judge asked in both orders."""

    def __init__(self, name: str = "pairwise_judge", judge: JudgeModel | dict | None = None,
                 template: str = PAIRWISE_TEMPLATE, pattern: str = VERDICT_PATTERN,
                 verdicts: dict[str, float] | None = None, fallback: str | None = None,
                 answer_format: str = "auto") -> None:
        super().__init__(name)
        spec = judge if isinstance(judge, JudgeModel) else JudgeModel(**(judge or {"samples": 1}))
        self.template, self.pattern = template, pattern
        self.verdicts = dict(verdicts or {"A": 1.0, "B": 0.0, "C": 0.5})
        if any(not 0.0 <= v <= 1.0 for v in self.verdicts.values()):
            raise UserError(f"reward.verdicts must map to probabilities in [0, 1], got {self.verdicts}")
        self.judge = make_judge(spec, 0.0, 1.0, answer_format)
        self.fallback = None if fallback is None else RuleJudge(fallback, 0.0, 1.0, answer_format)
        self.stats: dict[str, float] = {}
        self.judged: dict[tuple[int, int], float] = {}

    def bind(self, policy) -> None:
        if isinstance(self.judge, LLMJudge):
            self.judge.bind(policy)

    def ask(self, prompts: list[str], firsts: list[str], seconds: list[str], references: list) -> list:
        """P(first > second) verdicts, one per judge sample, for each comparison."""
        if isinstance(self.judge, LLMJudge):
            queries = [self.template.format(prompt=p, first=a, second=b) for p, a, b in zip(prompts, firsts, seconds)]
            return [[parse_verdict(text, self.pattern, self.verdicts) for text in outputs]
                    for outputs in self.judge.ask(queries)]
        return self.judge.preferences(prompts, firsts, seconds, references)

    def compute(self, batch: Batch) -> list[float]:
        comparisons = [(i, j) for rows in batch.groups().values() for a, i in enumerate(rows) for j in rows[a + 1:]]
        both = comparisons + [(j, i) for i, j in comparisons]  # every pair in both orders
        verdicts = self.ask([batch.raw_question(i) for i, _ in both], [batch.completion[i] for i, _ in both],
                            [batch.completion[j] for _, j in both], [batch.reference[i] for i, _ in both])
        half = len(comparisons)
        prob: dict[tuple[int, int], float] = {}
        agree = decided = fell_back = 0
        judged: dict[tuple[int, int], float] = {}  # the judge's own P(i > j), before any fallback
        for n, (i, j) in enumerate(comparisons):
            forward = [v for v in verdicts[n] if v is not None]
            backward = [1.0 - v for v in verdicts[n + half] if v is not None]  # asked as (j, i)
            if forward and backward:
                decided += 1
                agree += _side(mean_or_nan(forward)) == _side(mean_or_nan(backward))
            p = mean_or_nan(forward + backward)
            judged[(i, j)] = p
            if math.isnan(p) and self.fallback is not None:
                rule = self.fallback.preferences([batch.prompt[i]], [batch.completion[i]], [batch.completion[j]],
                                                 [batch.reference[i]])[0][0]
                if rule is not None:
                    p, fell_back = rule, fell_back + 1
            prob[(i, j)], prob[(j, i)] = p, 1.0 - p
        groups = batch.groups()
        index = {i: a for rows in groups.values() for a, i in enumerate(rows)}
        prefs = [[prob.get((i, j), float("nan")) for j in groups[batch.prompt_id[i]]] for i in range(len(batch))]
        batch.extra["pairwise_prefs"], batch.extra["group_index"] = prefs, [index[i] for i in range(len(batch))]
        rates = [mean_or_nan([p for p in row if not math.isnan(p)]) for row in prefs]
        samples = [v for row in verdicts for v in row]
        self.judged = judged
        self.stats = {"judge/parse_failure_rate": sum(v is None for v in samples) / max(1, len(samples)),
                      "judge/comparisons": float(len(comparisons))}
        if isinstance(self.judge, LLMJudge):
            self.stats["judge/truncated_rate"] = self.judge.truncated / max(1, len(both))
        if decided:
            self.stats["judge/order_agreement"] = agree / decided
        if self.fallback is not None:
            self.stats["judge/fallback_rate"] = fell_back / max(1, len(comparisons))
        if comparisons and all(math.isnan(p) for p in prob.values()):
            raise UserError(f"reward={self.name}: none of the {len(samples)} pairwise judge outputs this iteration "
                            f"had a verdict in the format the prompt asks for (pattern {self.pattern!r}); use a "
                            "stronger reward.judge.model or set reward.fallback=correct")
        return rates

    def metrics(self, batch: Batch) -> dict[str, float]:
        return {**self.stats, **pairwise_gold_agreement(self.judged, batch.gold)}


def pairwise_gold_agreement(judged: dict[tuple[int, int], float], gold: list | None) -> dict[str, float]:
    """How the judge's own verdicts (before any fallback) side with the gold label on the comparisons of one
    right and one wrong completion: `judge/gold_agreement`, the share won by the right one (a tie counts half;
    chance 0.5), and `judge/gold_comparisons`, how many such comparisons it decided. Empty without gold."""
    if gold is None:
        return {}
    wins = [p if gold[i] else 1.0 - p for (i, j), p in judged.items()
            if gold[i] is not None and gold[j] is not None and bool(gold[i]) != bool(gold[j]) and not math.isnan(p)]
    if not wins:
        return {}
    return {"judge/gold_agreement": sum(1.0 if w > 0.5 else 0.5 if w == 0.5 else 0.0 for w in wins) / len(wins),
            "judge/gold_comparisons": float(len(wins))}


def _side(p: float) -> int:
    """Which response a probability favours: 1 first, -1 second, 0 tie."""
    return (p > 0.5) - (p < 0.5)
