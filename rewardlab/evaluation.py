"""Evaluation on a task's test split: greedy accuracy, pass@k / maj@k from sampled completions, and the
accuracy under a test-time search (rewardlab/search.py) when one is given.

Sampling here runs under its own seeded torch generator state (`torch.random.fork_rng`), so evaluating
never moves the training random stream: a run with and without `run.eval_pass_k` trains identically.
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import torch

from rewardlab.answers import answers_equal, check, extract_answer, majority_answer
from rewardlab.data.base import Example


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: Sequence[str | None], reference: str) -> float:
    """1.0 if the largest cluster of equivalent answers (None excluded; ties: first seen) matches the
    reference: `1/2`, `0.5` and `\\frac12` are one vote, as in the majority-vote reward."""
    return float(answers_equal(majority_answer(answers), reference))


def eval_seed(run_seed: int, iteration: int) -> int:
    """The seed of one evaluation's sampling: fixed by the run's seed and the iteration, apart from training's."""
    return (run_seed * 1_000_003 + iteration * 7919 + 12_345) % (2**63)


def evaluate(generator, examples: Sequence[Example], answer_format: str = "auto",
             pass_k: Sequence[int] = (), samples: int = 0, seed: int = 0, search=None,
             reward=None) -> dict[str, float]:
    """Greedy accuracy and mean completion length; with `pass_k`, pass@k and maj@k for each k.

    pass@k is the unbiased estimate over all n samples per prompt (n = `samples` or max(pass_k));
    maj@k votes over the first k of those samples. Sampling is seeded with `seed` inside a forked RNG.
    With a `search` (rewardlab/search.py) scoring with `reward`, eval/accuracy, eval/length and eval/truncated
    are its picks' and eval/search/* what it spent; the greedy accuracy stays as eval/greedy_accuracy.
    """
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        metrics = _evaluate(generator, examples, answer_format, pass_k, samples)
        if search is not None:
            metrics["eval/greedy_accuracy"] = metrics["eval/accuracy"]
            metrics.update(search.run(generator, reward, examples, answer_format))
        return metrics


def _evaluate(generator, examples: Sequence[Example], answer_format: str, pass_k: Sequence[int],
              samples: int) -> dict[str, float]:
    greedy = generator.generate(examples, n=1, greedy=True)
    correct = [c for c in check(greedy.completion, greedy.reference, answer_format) if c is not None]
    metrics = {
        "eval/length": sum(map(len, greedy.completion_ids)) / len(greedy),
        "eval/truncated": sum(f == "length" for f in greedy.finish_reason) / len(greedy),
    }
    if len(correct) < len(greedy):
        metrics["eval/with_reference"] = float(len(correct))
    if correct:  # accuracy over the problems that have a reference answer; none (a label-free set): no accuracy
        metrics["eval/accuracy"] = sum(correct) / len(correct)
    if pass_k and correct:
        n = samples or max(pass_k)
        sampled = generator.generate(examples, n=n)
        ok = check(sampled.completion, sampled.reference, answer_format)
        answers = [extract_answer(c, answer_format) for c in sampled.completion]
        for k in pass_k:
            per_prompt, majority = [], []
            for ex, rows in zip(examples, sampled.groups().values()):
                if ex.answer is None:
                    continue
                per_prompt.append(pass_at_k(n, int(sum(ok[i] for i in rows)), k))
                majority.append(majority_correct([answers[i] for i in rows[:k]], ex.answer))
            metrics[f"eval/pass@{k}"] = sum(per_prompt) / len(per_prompt)
            metrics[f"eval/maj@{k}"] = sum(majority) / len(majority)
    return metrics
