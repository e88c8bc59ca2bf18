"""The judging tiny policy (`policy=tiny_judge`): the embedded tiny model, its vocabulary extended with
letters and brackets, given a second warm start on a mix of solving and judging rows, so that Self-Rewarding,
Temporal Self-Rewarding, Pref-GRPO and DNO run on the embedded default with the policy judging itself.

Judging rows come from the solving-only tiny model's own samples (temperature 1) on its warm-start problems,
labelled by the exact arith checker, never by hand. As a judge justifies before it scores, the tiny judge first
solves the problem itself (the reference solution is its target), then subtracts the answer it judges from its
own, then gives its verdict:
- pointwise: TINY_JUDGE_TEMPLATE (conf/reward/tiny_judge.yaml) answered "<solution>\n86-87=-1\nScore: 1":
  5 for the right answer, 1 for a wrong one, 0 for none ("no answer"). A score >= 3 means "right", so the judge
  reward's threshold for `judge/gold_agreement` (the middle of 0-5) separates the classes.
- pairwise: TINY_PAIRWISE_TEMPLATE (conf/reward/tiny_pairwise_judge.yaml) answered "<solution>\n86-86=0\n
  86-87=-1\n[[A]]": "[[A]]" / "[[B]]" when exactly one of the two is right, "[[C]]" when both are right or
  both wrong (as many tie rows as decisive ones).
Why this form: a judge trained to answer with the score alone, with the two answers quoted, or aligned digit by
digit with a mark per place, stayed at chance (its own solutions were right 80% of the time): comparing two
numbers is what this 1M-parameter model learns slowest, while computing is what it does best, so the check is a
subtraction, learnt first on short rows of the rationale's last lines alone (`judge_compare_steps`), then with
the full rows.
The mixed steps run as micro-batches of rows of similar length (`judge_batch_tokens`; 0.50 s a step on 2 threads
instead of 0.71 as one padded batch), 1200 of them. With 600 in one padded batch (the recipe until 2026-12-03),
pairwise skill depended on the solving model the judge starts from: 0.806 on the solving model built on 2 threads
(the one a 2-core machine builds), at chance (0.477) on one built on 1 thread, where the judge quoted answer A, the
first of the two answers in the prompt, right only 55% of the time (B: 88%; its own answers and subtractions were
mostly right). Twice the mixed steps learnt it on both; measured on those two solving models (pointwise / pairwise
agreement, held-out): 600 padded steps 0.914 / 0.806 and 0.798 / 0.477; 1200 padded steps (1-thread model only)
0.888 / 0.759; 1200 steps in micro-batches of 4096 tokens 0.970 / 0.896 and 0.912 / 0.730; of 2048 tokens (this
recipe) 0.939 / 0.838 and 0.942 / 0.822. Tried on the 1-thread model and not adopted: pairwise rows most of each batch
(28 of 56; 400 check + 700 mixed steps): 0.71 / 0.87 / 0.73 over three seeds on the 2-thread model but 0.40 on the
1-thread one; plus short rows that make the judge quote A and B from two solutions: 0.56 and 0.43.
Each query is rendered exactly as the judge reward sends it (rewardlab.rewards.judge.render_query). The judge
learns what a 1M-parameter model learns in two thousand steps: real, imperfect skill, measured at build time on
samples of held-out problems and written to `rewardlab_build.json` (`judge_skill`). The training loop is
tiny.py's plain supervised loop, for the reason given there.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import asdict, replace
from pathlib import Path

import torch

from rewardlab.answers import check, extract_answer
from rewardlab.data.arith import ArithTask
from rewardlab.data.base import Example
from rewardlab.policy.tiny import (TinyBuild, build_tokenizer, cached_build, ensure_tiny,
                                   save_char_tokenizer, supervised)

JUDGE_CHARS = list(string.ascii_letters + "[],")
TINY_JUDGE_TEMPLATE = "Judge the solution.\n{prompt}{response}\nScore 0-5:\n"
TINY_PAIRWISE_TEMPLATE = "Which is right?\n{prompt}A:\n{first}\nB:\n{second}\nVerdict:\n"
JUDGE_TOKENS = 80  # room for the judge's own solution and its verdict (the presets' reward.judge.max_new_tokens)
HELD_OUT = 200  # warm-start problems kept out of the judging rows, to measure the judge at build time


def judge_score(completion: str, reference: str) -> int:
    """The pointwise label of one completion: 5 for the right answer, 1 for a wrong one, 0 for none."""
    if check([completion], [reference])[0]:
        return 5
    return 0 if extract_answer(completion) is None else 1


def said(completion: str) -> str:
    """The final answer a completion gives as the judge quotes it ("none" without one)."""
    return extract_answer(completion) or "none"


def difference(own: str, quoted: str) -> str:
    """The judge's check line: its own answer minus the quoted one, computed ("no answer" without one)."""
    if quoted == "none":
        return "no answer"
    try:
        return f"{own}-{quoted}={int(own) - int(quoted)}"
    except ValueError:  # not an integer: nothing to subtract
        return f"{own}-{quoted}=?"


def same(own: str, quoted: str) -> bool:
    """Whether the grader counts the judged answer as the judge's own (so a judging row's verdict and the
    `judge/gold_agreement` label, judge_score, never disagree: "012" and "12.0" are 12)."""
    return quoted != "none" and check([quoted], [own])[0]


def pointwise_rationale(own: str, quoted: str) -> str:
    """The judge's last lines after its own solution: the check line, then the score."""
    score = 0 if quoted == "none" else 5 if same(own, quoted) else 1
    return f"{difference(own, quoted)}\nScore: {score}"


def pairwise_rationale(own: str, first: str, second: str) -> str:
    return f"{difference(own, first)}\n{difference(own, second)}\n{verdict(same(own, first), same(own, second))}"


def verdict(first_right: bool, second_right: bool) -> str:
    return "[[C]]" if first_right == second_right else "[[A]]" if first_right else "[[B]]"


def sample_solutions(directory: Path, examples: list[Example], n: int) -> list[list[str]]:
    """`n` temperature-1 samples per problem from the solving-only model saved in `directory`."""
    from rewardlab.generation.hf import HFGenerator, Sampling
    from rewardlab.policy import Policy, load_model, load_tokenizer

    policy = Policy(model=load_model(str(directory), torch.float32), tokenizer=load_tokenizer(str(directory)),
                    source=str(directory), device=torch.device("cpu"))
    batch = HFGenerator(policy, batch_size=512, sampling=Sampling(temperature=1.0, max_new_tokens=40)).generate(
        examples, n=n)
    return [batch.completion[i * n : (i + 1) * n] for i in range(len(examples))]


def judging_rows(tokenizer, examples: list[Example], samples: list[list[str]], rng: random.Random):
    """(query, answer) pointwise and pairwise rows for each problem's samples, queries rendered as the judge
    rewards render them. The answer is the judge's rationale, then its verdict: the reference solution (the
    judge solves the problem itself, as a judge justifies before it scores), its own answer minus each judged
    one, then the score or the verdict. Pairs: every ordered pair of distinct samples of
    a problem where exactly one is right, and as many ties."""
    from rewardlab.rewards.judge import render_query

    point, pair = [], []
    for ex, completions in zip(examples, samples):
        own, quoted = said(ex.solution), [said(c) for c in completions]
        for c, q in zip(completions, quoted):
            query = TINY_JUDGE_TEMPLATE.format(prompt=ex.prompt, response=c)
            point.append((render_query(tokenizer, query), f"{ex.solution}\n{pointwise_rationale(own, q)}"))
        for i, a in enumerate(completions):
            for j, b in enumerate(completions):
                if i != j:
                    query = TINY_PAIRWISE_TEMPLATE.format(prompt=ex.prompt, first=a, second=b)
                    pair.append((render_query(tokenizer, query),
                                 f"{ex.solution}\n{pairwise_rationale(own, quoted[i], quoted[j])}"))
    rng.shuffle(point)
    rng.shuffle(pair)
    decisive = [row for row in pair if not row[1].endswith("[[C]]")]
    ties = [row for row in pair if row[1].endswith("[[C]]")]
    return point, decisive + ties[: len(decisive)]  # as many ties as decisive pairs (ties are most pairs)


def comparison_rows(rng: random.Random, n: int, context: list[str] | None = None) -> list[tuple[str, str]]:
    """Short rows of the rationale's last lines alone: the judge's answer minus the quoted one -> difference and
    verdict. The full rows teach the check far too slowly (one verdict token after a long context); on these rows
    the subtraction is learnt in a few hundred steps. Half the quoted answers are the judge's; the rest near
    misses. With `context` (solutions), half the rows start with one of them, as in the full rows."""

    def near(x: int) -> str:
        kind = rng.random()
        if kind < 0.5:
            return str(x)
        if kind < 0.55:
            return "none"
        return str(max(0, x + rng.choice([-11, -10, -9, -2, -1, 1, 2, 9, 10, 11, rng.randint(-60, 60) or 1])))

    rows = []
    for _ in range(n):
        x = rng.randint(0, 150)
        if rng.random() < 0.5:
            text = pointwise_rationale(str(x), near(x))
        else:
            text = pairwise_rationale(str(x), near(x), near(x))
        first = text.split("\n", 1)[0]
        cut = text.index("=") + 1 if "=" in first else len(first) + 1
        prefix = rng.choice(context) + "\n" if context and rng.random() < 0.5 else ""
        rows.append((prefix + text[:cut], text[cut:]))
    return rows


def mixed_batch(rng: random.Random, solving, point, pair, context: list[str]) -> list[tuple[str, str]]:
    """One batch of the judge build's mixed steps: 8 solving, 20 pointwise, 20 pairwise and 16 comparison rows."""
    return rng.sample(solving, 8) + rng.sample(point, 20) + rng.sample(pair, 20) + comparison_rows(rng, 16, context)


@torch.inference_mode()
def judge_skill(model, tokenizer, point: list[tuple[str, str]], pair: list[tuple[str, str]]) -> dict[str, float]:
    """Greedy verdicts on held-out rows: parse rate, agreement with the label's side (right / wrong, or which is
    right) and the share of the majority class (what always answering it would agree)."""
    from rewardlab.generation.hf import HFGenerator, Sampling
    from rewardlab.policy import Policy
    from rewardlab.rewards.judge import SCORE_PATTERN, parse_score, parse_verdict
    from rewardlab.rewards.pairwise import VERDICT_PATTERN

    policy = Policy(model=model, tokenizer=tokenizer, source="", device=torch.device("cpu"))
    generator = HFGenerator(policy, batch_size=256, sampling=Sampling(max_new_tokens=JUDGE_TOKENS))

    def answers(rows):
        out = generator.generate([Example(id=str(i), prompt=q) for i, (q, _) in enumerate(rows)], greedy=True)
        return out.completion

    scores = [parse_score(text, SCORE_PATTERN) for text in answers(point)]
    truth = [parse_score(label, SCORE_PATTERN) >= 2.5 for _, label in point]
    parsed = [(s >= 2.5, t) for s, t in zip(scores, truth) if s is not None]
    sides = {"A": 1.0, "B": 0.0, "C": 0.5}
    decisive = [(q, label) for q, label in pair if not label.endswith("[[C]]")]
    picks = [parse_verdict(text, VERDICT_PATTERN, sides) for text in answers(decisive)]
    right_share = sum(truth) / max(1, len(truth))
    return {"point_rows": len(point), "point_parse_rate": len(parsed) / max(1, len(point)),
            "point_agreement": sum(p == t for p, t in parsed) / max(1, len(parsed)),
            "point_majority_share": max(right_share, 1 - right_share),
            "pair_rows": len(decisive), "pair_parse_rate": sum(p is not None for p in picks) / max(1, len(picks)),
            "pair_agreement": sum((p == 1.0) == label.endswith("[[A]]") for p, (_, label) in zip(picks, decisive)
                                  if p is not None and p != 0.5) / max(1, sum(p is not None for p in picks))}


def ensure_tiny_judge(spec: TinyBuild, log=print) -> Path:
    """The cached judging tiny model, built (once) from the cached solving-only one."""
    base = ensure_tiny(replace(spec, judge=False), log=log)

    def build(tmp: Path) -> None:
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            rng = random.Random(spec.seed)
            problems = ArithTask(seed=spec.seed + 1).train_examples()
            chosen = rng.sample(problems, spec.judge_prompts + HELD_OUT)
            log(f"tiny judge: sampling {spec.judge_samples} solutions for {len(chosen)} problems")
            samples = sample_solutions(base, chosen, spec.judge_samples)
            tokenizer = build_tokenizer(extra=JUDGE_CHARS)
            point, pair = judging_rows(tokenizer, chosen[HELD_OUT:], samples[HELD_OUT:], rng)
            held_point, held_pair = judging_rows(tokenizer, chosen[:HELD_OUT], samples[:HELD_OUT], rng)
            model = AutoModelForCausalLM.from_pretrained(base)
            model.resize_token_embeddings(len(tokenizer))
            solving = [(ex.prompt, ex.solution) for ex in problems]
            context = [c for row in samples[HELD_OUT:] for c in row]
            supervised(model, tokenizer, lambda: comparison_rows(rng, 64, context), spec.judge_compare_steps,
                       spec.judge_lr, log=log, what="tiny judge: comparing answers", batch_tokens=spec.judge_batch_tokens)

            supervised(model, tokenizer, lambda: mixed_batch(rng, solving, point, pair, context), spec.judge_steps,
                       spec.judge_lr, log=log, what="tiny judge warm start",
                       batch_tokens=spec.judge_batch_tokens)
            skill = judge_skill(model, tokenizer, held_point, held_pair[: 4 * HELD_OUT])
        log("tiny judge on held-out problems: " + ", ".join(f"{k} {v:.3g}" for k, v in skill.items()))
        model.save_pretrained(tmp)
        save_char_tokenizer(tokenizer, tmp)
        (tmp / "rewardlab_build.json").write_text(json.dumps({**asdict(spec), "judge_skill": skill}, indent=2))

    return cached_build(f"tiny-{spec.key()}", build, log=log)
