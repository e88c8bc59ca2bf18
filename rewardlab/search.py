"""Test-time search over any reward (METHODS.md §5), for `rewardlab eval search=...`: best-of-N, reward-weighted
majority, and PRM-guided step-level beam search. The selection functions (`top_pick`, `weighted_majority_pick`,
`majority_pick`) are the one home of how a pick is made; the best-of-N bench (rmlab/best_of_n.py) uses them too,
so its curve and the search pick alike.

`search=greedy` is no search: evaluation's greedy pass, as before. The beam search is written here because no
maintained library runs step-level search over an arbitrary generator and reward (HF's search-and-learn is a
recipe repository bound to vLLM). Steps are cut after generation, so any backend works: an expansion samples up
to `step_tokens` tokens, its text is cut at the first boundary of the reward's step splitter, and the next
expansion re-tokenizes prompt + partial solution. Tokens sampled past a boundary are spent and counted.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

from rewardlab.answers import answer_clusters, check, extract_answer, last_boxed
from rewardlab.config import schema
from rewardlab.data.base import Example
from rewardlab.errors import UserError
from rewardlab.rollout import Batch
from rewardlab.steps import StepSplit, step_token_ends


def _finite(score: float | None) -> bool:
    return score is not None and math.isfinite(score)


def top_pick(scores: Sequence[float | None]) -> int | None:
    """Index of the highest score (ties: the first); a non-finite score is never picked; None when none is finite."""
    best = None
    for i, score in enumerate(scores):
        if _finite(score) and (best is None or score > scores[best]):
            best = i
    return best


def weighted_majority_pick(answers: Sequence[str | None], scores: Sequence[float | None]) -> int | None:
    """Index of the best-scored row in the answer cluster whose scores sum highest (ties: the cluster seen first).

    Clusters are answers.answer_clusters' (mathematical equivalence, as maj@k and the majority-vote reward);
    rows without an answer or with a non-finite score do not vote. Scores are summed as given, so a reward on a
    signed scale (negative scores) counts against its cluster. None when no row votes.
    """
    best: list[int] | None = None
    best_weight = 0.0
    for cluster in answer_clusters(answers):
        voters = [i for i in cluster if _finite(scores[i])]
        weight = sum(scores[i] for i in voters)
        if voters and (best is None or weight > best_weight):
            best, best_weight = voters, weight
    return None if best is None else best[top_pick([scores[i] for i in best])]


def majority_pick(answers: Sequence[str | None]) -> int | None:
    """The first row of the largest cluster of equivalent answers (ties: the cluster seen first); None if none."""
    clusters = answer_clusters(answers)
    return max(clusters, key=len)[0] if clusters else None


def summarize(pool: Batch, picks: Sequence[int | None], answer_format: str, samples: int, tokens: int
              ) -> dict[str, float]:
    """Eval metrics of one pick per prompt (rows of `pool`, None: nothing picked, counted wrong), with the
    sequences and tokens the search generated, both per prompt."""
    chosen = [p for p in picks if p is not None]
    correct = check([pool.completion[p] for p in chosen], [pool.reference[p] for p in chosen], answer_format)
    rewards = [pool.reward[p] for p in chosen if _finite(pool.reward[p])]
    prompts = len(picks)
    return {"eval/accuracy": sum(c or 0.0 for c in correct) / prompts,
            "eval/length": sum(len(pool.completion_ids[p]) for p in chosen) / max(len(chosen), 1),
            "eval/truncated": sum(pool.finish_reason[p] == "length" for p in chosen) / max(len(chosen), 1),
            "eval/search/samples": samples / prompts, "eval/search/tokens": tokens / prompts,
            "eval/search/reward_mean": sum(rewards) / len(rewards) if rewards else float("nan")}


class SampledSearch(ABC):
    """Sample `n` completions per prompt in one generator call, score them all, keep one per prompt."""

    def __init__(self, name: str, n: int = 16) -> None:
        if n < 1:
            raise UserError(f"search.n={n} must be at least 1 (completions sampled per prompt)")
        self.name, self.n = name, n

    @abstractmethod
    def pick(self, answers: list[str | None], scores: list[float]) -> int | None:
        """Index of the kept completion among one prompt's samples, None when none can be picked."""

    def run(self, generator, reward, examples: Sequence[Example], answer_format: str) -> dict[str, float]:
        batch = generator.generate(examples, n=self.n)
        reward.score(batch)
        answers = [extract_answer(c, answer_format, r) for c, r in zip(batch.completion, batch.reference)]
        picks = []
        for start in range(0, len(batch), self.n):  # the generator groups rows by prompt, in order
            local = self.pick(answers[start: start + self.n], batch.reward[start: start + self.n])
            picks.append(None if local is None else start + local)
        return summarize(batch, picks, answer_format, len(batch), sum(map(len, batch.completion_ids)))


class BestOfN(SampledSearch):
    """Best-of-N: the completion the reward scores highest."""

    def __init__(self, name: str = "best_of_n", n: int = 16) -> None:
        super().__init__(name, n)

    def pick(self, answers: list[str | None], scores: list[float]) -> int | None:
        return top_pick(scores)


class WeightedMajority(SampledSearch):
    """Reward-weighted majority: the answer whose completions' rewards sum highest."""

    def __init__(self, name: str = "weighted_majority", n: int = 16) -> None:
        super().__init__(name, n)

    def pick(self, answers: list[str | None], scores: list[float]) -> int | None:
        return weighted_majority_pick(answers, scores)


@dataclass
class Beam:
    """A partial (or finished) solution of prompt `prompt`: its text and the generated ids it kept."""

    prompt: int
    text: str = ""
    ids: list[int] = field(default_factory=list)
    finish: str = ""  # "" while open; "stop" (EOS or a final answer), or "length" (max_steps or token budget)


def next_step_end(text: str, start: int, separator: re.Pattern) -> int | None:
    """Offset just past the separator closing the first step with text after `start`; None if none closes."""
    previous = 0
    for match in separator.finditer(text):
        if match.end() > start and text[max(previous, start): match.start()].strip():
            return match.end()
        previous = match.end()
    return None


def is_final(step: str, answer_format: str) -> bool:
    """Does this step state the final answer (`#### x` for hash, a box for boxed, either for auto)?"""
    hashed = answer_format in ("hash", "auto") and extract_answer(step, "hash") is not None
    return hashed or (answer_format in ("boxed", "auto") and last_boxed(step) is not None)


class BeamSearch:
    """PRM-guided step-level beam search: each open beam is expanded `expansions` times by one step (the root
    `beam_width * expansions` times), every candidate is scored by the process reward on its partial solution,
    and the `beam_width` best open ones per prompt go on. A candidate finishes on EOS,
    a final-answer step, `max_steps` steps or the generation's token budget; the finished compete on their
    score, which is the reward's own aggregate of the step scores (reward.aggregate)."""

    def __init__(self, name: str = "beam", beam_width: int = 4, expansions: int = 4, max_steps: int = 8,
                 step_tokens: int = 16) -> None:
        for key, value in (("beam_width", beam_width), ("expansions", expansions), ("max_steps", max_steps),
                           ("step_tokens", step_tokens)):
            if value < 1:
                raise UserError(f"search.{key}={value} must be at least 1")
        self.name, self.beam_width, self.expansions = name, beam_width, expansions
        self.max_steps, self.step_tokens = max_steps, step_tokens

    def run(self, generator, reward, examples: Sequence[Example], answer_format: str) -> dict[str, float]:
        if not getattr(reward, "process", False):
            raise UserError(f"search=beam scores partial solutions step by step and needs a process reward "
                            f"(reward=prm, reward=arith_steps); {type(reward).__name__} is not one")
        split = getattr(reward, "split", None) or StepSplit()
        separator, tokenizer = split.separator(), generator.policy.tokenizer
        budget = generator.sampling.max_new_tokens
        sampling = replace(generator.sampling, max_new_tokens=min(self.step_tokens, budget))
        prompt_ids = [tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] for ex in examples]
        open_beams = [Beam(i) for i in range(len(examples))]
        finished: list[Batch] = []
        samples = tokens = 0
        n = self.beam_width * self.expansions
        while open_beams:
            queries = [replace(examples[b.prompt], prompt=examples[b.prompt].prompt + b.text) for b in open_beams]
            out = generator.generate(queries, n=n, sampling=sampling)
            samples, tokens = samples + len(out), tokens + sum(map(len, out.completion_ids))
            candidates = [self._extend(open_beams[r // n], out.completion_ids[r], out.completion[r],
                                       out.finish_reason[r] == "stop", split, separator, tokenizer, budget,
                                       answer_format) for r in range(len(out))]
            scored = self._score(reward, candidates, examples, prompt_ids)
            finished.append(scored.select([i for i, c in enumerate(candidates) if c.finish]))
            open_beams = self._keep(candidates, scored.reward)
            n = self.expansions
        pool = Batch.concat(finished)
        rows_of: dict[int, list[int]] = {}
        for row, prompt in enumerate(pool.extra["search/prompt"]):
            rows_of.setdefault(prompt, []).append(row)
        picks = []
        for i in range(len(examples)):
            rows = rows_of.get(i, [])
            local = top_pick([pool.reward[r] for r in rows])
            picks.append(None if local is None else rows[local])
        return summarize(pool, picks, answer_format, samples, tokens)

    def _extend(self, beam: Beam, ids: list[int], text: str, eos: bool, split: StepSplit, separator: re.Pattern,
                tokenizer, budget: int, answer_format: str) -> Beam:
        """The beam with one more step: the sample cut at its first step boundary and at the token budget."""
        room = budget - len(beam.ids)
        if len(ids) > room:
            ids, eos = ids[:room], False
            text = tokenizer.decode(ids, skip_special_tokens=True)
        full = beam.text + text
        end = next_step_end(full, len(beam.text), separator)
        if end is not None:
            kept = step_token_ends(tokenizer, ids, [end - len(beam.text)])[0] + 1
            full, ids, eos = full[:end], ids[:kept], False
        steps = [s for s, _ in split.split(full)]
        if eos or (steps and is_final(steps[-1], answer_format)):
            finish = "stop"
        elif len(steps) >= self.max_steps or len(beam.ids) + len(ids) >= budget:
            finish = "length"
        else:
            finish = ""
        return Beam(beam.prompt, full, beam.ids + list(ids), finish)

    @staticmethod
    def _score(reward, beams: list[Beam], examples: Sequence[Example], prompt_ids: list[list[int]]) -> Batch:
        """The reward on every candidate's partial solution, as a Batch (one row per candidate)."""
        rows = [examples[b.prompt] for b in beams]
        batch = Batch(prompt_id=[ex.id for ex in rows], prompt=[ex.prompt for ex in rows],
                      completion=[b.text for b in beams], prompt_ids=[prompt_ids[b.prompt] for b in beams],
                      completion_ids=[b.ids for b in beams], finish_reason=[b.finish or "open" for b in beams],
                      reference=[ex.answer for ex in rows], solution=[ex.solution for ex in rows],
                      question=[ex.question for ex in rows], messages=[ex.messages for ex in rows])
        reward.score(batch)
        batch.extra["search/prompt"] = [b.prompt for b in beams]
        return batch

    def _keep(self, candidates: list[Beam], scores: list[float]) -> list[Beam]:
        """The `beam_width` best-scored open candidates of each prompt (ties: the first sampled). Identical
        texts each keep their slot, as in sampled beam search: a prefix sampled often is expanded more."""
        by_prompt: dict[int, list[int]] = {}
        for i, beam in enumerate(candidates):
            if not beam.finish:
                by_prompt.setdefault(beam.prompt, []).append(i)
        kept: list[Beam] = []
        for rows in by_prompt.values():
            order = sorted(rows, key=lambda i: scores[i] if _finite(scores[i]) else -math.inf, reverse=True)
            kept.extend(candidates[i] for i in order[: self.beam_width])
        return kept


@schema("search", "greedy")
class GreedyConfig:
    name: str = "greedy"  # no search: the greedy completion, as evaluation always does


@schema("search", "best_of_n")
class BestOfNConfig:
    _target_: str = "rewardlab.search.BestOfN"
    name: str = "best_of_n"
    n: int = 16  # completions sampled per prompt; the reward's top pick is kept


@schema("search", "weighted_majority")
class WeightedMajorityConfig:
    _target_: str = "rewardlab.search.WeightedMajority"
    name: str = "weighted_majority"
    n: int = 16  # completions sampled per prompt; the answer with the highest summed reward wins


@schema("search", "beam")
class BeamConfig:
    _target_: str = "rewardlab.search.BeamSearch"
    name: str = "beam"
    beam_width: int = 4  # open beams kept per prompt after each step
    expansions: int = 4  # one-step samples per open beam (the root gets beam_width * expansions)
    max_steps: int = 8  # a beam with this many steps is finished
    step_tokens: int = 16  # tokens sampled per expansion; a step longer than this continues in the next one


def configured(search: Any, has_reward: bool):
    """The search `search` (its config) describes, None for greedy; a search without a reward is a user mistake."""
    if search is None or search.name == "greedy":
        return None
    if not has_reward:
        raise UserError(f"search={search.name} picks among sampled completions by a reward: add reward=... "
                        f"(e.g. reward=prm or reward=arith_steps)")
    from hydra.utils import instantiate

    return instantiate(search)
