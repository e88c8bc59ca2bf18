"""LLM-as-a-judge (pointwise): a prompt asks a model for a score, which is parsed and averaged over
`k` judge samples. Default prompt: the additive 5-point prompt of Self-Rewarding Language Models.

Judges share one small interface so a deterministic rule can stand in for a model (tests, fallbacks):
`scores(prompts, responses, references)` and `preferences(prompts, firsts, seconds, references)` each
return, per item, one verdict per judge sample, None where the judge's output had no parsable verdict.
A score is read only from the format the prompt asks for ("Score: <points>"); a row with no parsable
score is missing (NaN, dropped by the non-finite filter and counted), never scored 0 or 5.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional, Protocol, Sequence

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.answers import check
from rewardlab.rollout import Batch

Verdicts = list[list[Optional[float]]]

SELF_REWARDING_TEMPLATE = """Review the user's question and the corresponding response using the additive 5-point \
scoring system described below. Points are accumulated based on the satisfaction of each criterion:
- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if \
it is incomplete or contains some irrelevant content.
- Add another point if the response addresses a substantial portion of the user's question, but does not \
completely resolve the query or provide a direct answer.
- Award a third point if the response answers the basic elements of the user's question in a useful way, \
regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in \
blogs or search results.
- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the \
user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for \
improvement in clarity, conciseness or focus.
- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, \
without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and \
insightful answer.

User: {prompt}
<response>{response}</response>

After examining the user's instruction and the response:
- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"
Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary. To evaluate \
the response in alignment with this additive scoring model, we'll systematically attribute points based on the \
outlined criteria.
"""

SCORE_PATTERN = r"(?i)score:[ \t]*([^\n]*)"
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def parse_score(text: str, pattern: str = SCORE_PATTERN, low: float = 0.0, high: float = 5.0) -> float | None:
    """The score written in the asked-for format, or None: no match, a match that is not exactly one
    number ("3 or 4", "4/5", empty), matches that disagree, or a number outside [low, high]."""
    values = set()
    for raw in re.findall(pattern, text):
        raw = raw.strip().rstrip(".").strip()
        if not _NUMBER.fullmatch(raw):
            return None
        values.add(float(raw))
    if len(values) != 1:
        return None
    value = values.pop()
    return value if low <= value <= high else None


def parse_verdict(text: str, pattern: str, verdicts: dict[str, float]) -> float | None:
    """P(first response wins) from a verdict token (e.g. "[[A]]" -> 1.0); None when absent or conflicting."""
    found = {raw.strip() for raw in re.findall(pattern, text)}
    if len(found) != 1:
        return None
    return verdicts.get(found.pop())


class Judge(Protocol):
    """What a judge answers; `samples` verdicts per item, None for an unparsable one."""

    def scores(self, prompts: Sequence[str], responses: Sequence[str],
               references: Sequence[str | None]) -> Verdicts: ...

    def preferences(self, prompts: Sequence[str], firsts: Sequence[str], seconds: Sequence[str],
                    references: Sequence[str | None]) -> Verdicts: ...


class RuleJudge:
    """A deterministic judge. `correct`: verifiable correctness (max score if the final answer equals the
    reference, min otherwise; a correct response beats an incorrect one, else a tie; None without a
    reference). `first`: always prefers the response shown first (pure position bias, for tests)."""

    RULES = ("correct", "first")

    def __init__(self, rule: str, low: float = 0.0, high: float = 5.0, answer_format: str = "auto") -> None:
        if rule not in self.RULES:
            raise UserError(f"judge rule {rule!r} is not one of {', '.join(self.RULES)} (use judge.model=rule:<name>)")
        self.rule, self.low, self.high, self.answer_format = rule, low, high, answer_format

    def _correct(self, responses: Sequence[str], references: Sequence[str | None]) -> list[float | None]:
        return check(list(responses), list(references), self.answer_format)

    def scores(self, prompts, responses, references) -> Verdicts:
        if self.rule != "correct":
            raise UserError(f"judge rule {self.rule!r} only compares pairs; use rule:correct for scores")
        return [[None if ok is None else (self.high if ok else self.low)]
                for ok in self._correct(responses, references)]

    def preferences(self, prompts, firsts, seconds, references) -> Verdicts:
        if self.rule == "first":
            return [[1.0] for _ in firsts]
        a, b = self._correct(firsts, references), self._correct(seconds, references)
        return [[None if x is None or y is None else 0.5 + 0.5 * (x - y)] for x, y in zip(a, b)]


@dataclass
class JudgeModel:
    """Which model judges and how it samples: `self` (the policy being trained), a local causal LM
    directory, or `rule:<name>` (a RuleJudge)."""

    model: str = "self"
    samples: int = 3  # judge samples per item; parsable verdicts are averaged
    temperature: float = 0.7  # 0 = greedy (then samples must be 1)
    max_new_tokens: int = 256
    batch_size: int = 64


class LLMJudge:
    """Asks a causal LM (the policy itself or a local path) with a template and parses its answers."""

    def __init__(self, spec: JudgeModel) -> None:
        if spec.samples < 1 or (spec.temperature == 0 and spec.samples != 1):
            raise UserError("judge.samples must be >= 1, and 1 when judge.temperature=0 (greedy)")
        self.spec = spec
        self.generator = None
        self.truncated = 0  # queries of the last `ask` cut to fit the judge's context window

    def bind(self, policy) -> None:
        """Use the live policy (`model=self`), or load the judge model from its path once."""
        from rewardlab.generation.hf import HFGenerator, Sampling
        from rewardlab.policy import load_policy

        if self.spec.model != "self" and self.generator is not None:
            return
        if self.spec.model == "self":
            judge_policy = policy
        else:
            judge_policy = load_policy(path=self.spec.model, device=policy.device, key="reward.judge.model")
        sampling = Sampling(temperature=self.spec.temperature or 1.0, max_new_tokens=self.spec.max_new_tokens)
        self.generator = HFGenerator(judge_policy, batch_size=self.spec.batch_size, sampling=sampling)

    def ask(self, queries: Sequence[str]) -> list[list[str]]:
        """`samples` judge outputs per query, each query sent as one user turn through the judge model's own
        chat template (plain text after its BOS when it has none). A query longer than the judge model's
        context window (less the answer budget) keeps its end, where the response and the answer format
        are; `truncated` counts those."""
        from rewardlab.data.base import Example

        if self.generator is None:
            raise UserError("the judge has no model: the run must bind the policy before scoring (reward.bind)")
        policy = self.generator.policy
        window = getattr(policy.model.config, "max_position_embeddings", None)
        budget = None if window is None else max(1, window - self.spec.max_new_tokens)
        examples = []
        self.truncated = 0
        for i, query in enumerate(queries):
            tokenizer = policy.tokenizer
            prompt = render_query(tokenizer, query)
            excess = 0 if budget is None else len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) - budget
            if excess > 0:
                ids = tokenizer(query, add_special_tokens=False)["input_ids"]
                prompt = render_query(tokenizer, tokenizer.decode(ids[min(excess, len(ids) - 1):]))
                self.truncated += 1
            examples.append(Example(id=str(i), prompt=prompt))
        n = self.spec.samples
        out = self.generator.generate(examples, n=n, greedy=self.spec.temperature == 0)
        return [out.completion[i * n : (i + 1) * n] for i in range(len(queries))]


def render_query(tokenizer, query: str) -> str:
    """A judge query as the judge model reads it: one user turn in its chat template, or BOS + plain text."""
    from rewardlab.data.templates import bos_text

    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": query}], tokenize=False,
                                             add_generation_prompt=True)
    return bos_text(tokenizer) + query


def make_judge(spec: JudgeModel, low: float, high: float, answer_format: str = "auto"):
    """A RuleJudge for `rule:<name>`, else an LLMJudge."""
    if spec.model.startswith("rule:"):
        return RuleJudge(spec.model.split(":", 1)[1], low, high, answer_format)
    return LLMJudge(spec)


def mean_or_nan(values: Sequence[float | None]) -> float:
    parsed = [v for v in values if v is not None]
    return sum(parsed) / len(parsed) if parsed else float("nan")


@schema("reward", "judge")
@dataclass
class JudgeRewardConfig:
    _target_: str = "rewardlab.rewards.judge.JudgeReward"
    name: str = "judge"
    judge: JudgeModel = field(default_factory=JudgeModel)
    template: str = SELF_REWARDING_TEMPLATE  # fields: {prompt} (the raw question) {response}
    pattern: str = SCORE_PATTERN  # regex whose group 1 holds the score, as the template asks for it
    min_score: float = 0.0
    max_score: float = 5.0
    fallback: Optional[str] = None  # a rule (correct) scoring rows the judge leaves unscored; null: leave missing
    answer_format: str = "auto"  # for the `correct` rule


class JudgeReward(Reward):
    """Mean parsable judge score per row; NaN (missing) when no judge sample parsed and no fallback."""

    def __init__(self, name: str = "judge", judge: JudgeModel | dict | None = None,
                 template: str = SELF_REWARDING_TEMPLATE, pattern: str = SCORE_PATTERN, min_score: float = 0.0,
                 max_score: float = 5.0, fallback: str | None = None, answer_format: str = "auto") -> None:
        super().__init__(name)
        spec = judge if isinstance(judge, JudgeModel) else JudgeModel(**(judge or {}))
        self.template, self.pattern, self.low, self.high = template, pattern, min_score, max_score
        self.judge = make_judge(spec, min_score, max_score, answer_format)
        self.fallback = None if fallback is None else RuleJudge(fallback, min_score, max_score, answer_format)
        self.stats: dict[str, float] = {}

    def bind(self, policy) -> None:
        if isinstance(self.judge, LLMJudge):
            self.judge.bind(policy)

    def verdicts(self, batch: Batch) -> Verdicts:
        if isinstance(self.judge, LLMJudge):
            queries = [self.template.format(prompt=batch.raw_question(i), response=c)
                       for i, c in enumerate(batch.completion)]
            return [[parse_score(text, self.pattern, self.low, self.high) for text in outputs]
                    for outputs in self.judge.ask(queries)]
        return self.judge.scores(batch.prompt, batch.completion, batch.reference)

    def compute(self, batch: Batch) -> list[float]:
        verdicts = self.verdicts(batch)
        scores = [mean_or_nan(v) for v in verdicts]
        batch.extra[f"{self.name}_score"] = list(scores)
        missing = [i for i, s in enumerate(scores) if math.isnan(s)]
        fell_back = 0
        if self.fallback is not None and missing:
            rows = batch.select(missing)
            for i, v in zip(missing, self.fallback.scores(rows.prompt, rows.completion, rows.reference)):
                if v[0] is not None:
                    scores[i] = v[0]
                    fell_back += 1
        samples = [v for row in verdicts for v in row]
        self.stats = {"judge/parse_failure_rate": sum(v is None for v in samples) / max(1, len(samples)),
                      "judge/missing_rate": len(missing) / max(1, len(batch)),
                      "judge/score_mean": mean_or_nan([v for v in samples if v is not None])}
        if isinstance(self.judge, LLMJudge):
            self.stats["judge/truncated_rate"] = self.judge.truncated / max(1, len(batch))
        if self.fallback is not None:
            self.stats["judge/fallback_rate"] = fell_back / max(1, len(batch))
        if batch and all(math.isnan(s) for s in scores):
            raise UserError(f"reward={self.name}: none of the {len(samples)} judge outputs this iteration had a "
                            f"score in the format the prompt asks for (pattern {self.pattern!r}, range "
                            f"{self.low:g}-{self.high:g}); use a stronger reward.judge.model or set "
                            "reward.fallback=correct")
        return scores

    def metrics(self, batch: Batch) -> dict[str, float]:
        out = {k: v for k, v in self.stats.items() if not math.isnan(v)}
        out.update(gold_agreement(batch.extra.get(f"{self.name}_score"), batch.gold, (self.low + self.high) / 2))
        return out


def gold_agreement(scores: list[float] | None, gold: list | None, threshold: float) -> dict[str, float]:
    """How the judge's own scores (before any fallback) side with the gold label, over the rows it scored that
    have one: `judge/gold_agreement`, the share whose verdict (score >= threshold: right) matches gold (chance is
    the share of the majority class), and its mean score on right and on wrong rows. Empty without gold."""
    if scores is None or gold is None:
        return {}
    rows = [(s, bool(g)) for s, g in zip(scores, gold) if g is not None and not math.isnan(s)]
    if not rows:
        return {}
    out = {"judge/gold_agreement": sum((s >= threshold) == g for s, g in rows) / len(rows)}
    for key, right in (("judge/score_correct_mean", True), ("judge/score_incorrect_mean", False)):
        values = [s for s, g in rows if g == right]
        if values:
            out[key] = sum(values) / len(values)
    return out
