"""Evaluation on a task's test split: greedy accuracy, and pass@k / maj@k from sampled completions."""

from __future__ import annotations

from collections import Counter
from math import comb
from typing import Sequence

from rewardlab.data.base import Example
from rewardlab.rewards.verifiable import answers_equal, check, extract_answer


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: Sequence[str | None], reference: str) -> float:
    """1.0 if the most common extracted answer (None excluded) equals the reference."""
    votes = Counter(a for a in answers if a is not None)
    if not votes:
        return 0.0
    return float(answers_equal(votes.most_common(1)[0][0], reference))


def evaluate(generator, examples: Sequence[Example], answer_format: str = "auto",
             pass_k: Sequence[int] = (), samples: int = 0) -> dict[str, float]:
    """Greedy accuracy and mean completion length; with `pass_k`, pass@k and maj@k for each k."""
    greedy = generator.generate(examples, n=1, greedy=True)
    correct = check(greedy.completion, greedy.reference, answer_format)
    metrics = {
        "eval/accuracy": sum(correct) / len(correct),
        "eval/length": sum(map(len, greedy.completion_ids)) / len(greedy),
        "eval/truncated": sum(f == "length" for f in greedy.finish_reason) / len(greedy),
    }
    if pass_k:
        n = samples or max(pass_k)
        sampled = generator.generate(examples, n=n)
        ok = check(sampled.completion, sampled.reference, answer_format)
        for k in pass_k:
            per_prompt, majority = [], []
            for ex, rows in zip(examples, sampled.groups().values()):
                per_prompt.append(pass_at_k(n, int(sum(ok[i] for i in rows)), k))
                answers = [extract_answer(sampled.completion[i], answer_format) for i in rows[:k]]
                majority.append(majority_correct(answers, ex.answer))
            metrics[f"eval/pass@{k}"] = sum(per_prompt) / len(per_prompt)
            metrics[f"eval/maj@{k}"] = sum(majority) / len(majority)
    return metrics
