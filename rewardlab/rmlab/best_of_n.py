"""`bench=best_of_n`: the test-time over-optimization curve (Gao et al. at test time; METHODS.md §5).

The policy samples `n` completions per test prompt once; the reward scores them all. For k = 1, 2, 4 ... n,
averaged over `subsets` random subsets of k of those samples per prompt: gold accuracy of the reward's top pick,
of the reward-weighted majority and of the plain majority, pass@k (unbiased, from all n), and the mean proxy
score of the top pick. The proxy rising with k while gold accuracy does not is the reward being over-optimized.
Picks are made by rewardlab/search.py's selection functions, the same ones `rewardlab eval search=...` uses.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from rewardlab.config import schema
from rewardlab.errors import UserError


@schema("bench", "best_of_n")
@dataclass
class BestOfNBench:
    name: str = "best_of_n"
    n: int = 64  # completions sampled per test prompt
    prompts: int = 100  # test prompts (the first of the data set's test split)
    subsets: int = 32  # random subsets of size k averaged per prompt and k
    seed: int = 0  # sampling and subset draws


def sizes(n: int) -> list[int]:
    """k = 1, 2, 4 ... up to n, and n itself."""
    out = [1 << i for i in range(n.bit_length()) if 1 << i <= n]
    return out if out[-1] == n else out + [n]


def curve(answers: Sequence[Sequence[str | None]], scores: Sequence[Sequence[float]],
          gold: Sequence[Sequence[float]], subsets: int, seed: int = 0) -> list[dict[str, Any]]:
    """One row per k from per-prompt samples (each prompt the same n): accuracy of the top pick (`best`), the
    reward-weighted majority (`weighted_majority`) and the plain majority (`majority`), `pass` (pass@k) and
    `proxy` (mean score of the top pick), each averaged over min(subsets, C(n, k)) random subsets per prompt."""
    from rewardlab.evaluation import pass_at_k
    from rewardlab.search import majority_pick, top_pick, weighted_majority_pick

    n = len(answers[0])
    rng = random.Random(seed)
    rows = []
    for k in sizes(n):
        draws = min(subsets, math.comb(n, k))
        totals = {"best": 0.0, "weighted_majority": 0.0, "majority": 0.0}
        proxy, proxied, passed = 0.0, 0, 0.0
        for a, s, g in zip(answers, scores, gold):
            passed += pass_at_k(n, int(sum(x or 0.0 for x in g)), k)
            for _ in range(draws):
                rows_k = rng.sample(range(n), k)
                sub_a, sub_s = [a[i] for i in rows_k], [s[i] for i in rows_k]
                picks = {"best": top_pick(sub_s), "weighted_majority": weighted_majority_pick(sub_a, sub_s),
                         "majority": majority_pick(sub_a)}
                for key, pick in picks.items():
                    totals[key] += 0.0 if pick is None else (g[rows_k[pick]] or 0.0)
                if picks["best"] is not None:
                    proxy, proxied = proxy + sub_s[picks["best"]], proxied + 1
        count = len(answers) * draws
        rows.append({"k": k, **{key: value / count for key, value in totals.items()},
                     "pass": passed / len(answers), "proxy": proxy / proxied if proxied else float("nan")})
    return rows


def plot(rows: list[dict[str, Any]], greedy: float, path: Path, title: str) -> None:
    """Gold accuracy per k (left) and the top pick's proxy score (right) as one PNG, written atomically."""
    import matplotlib  # here, not at import: registering the schemas needs no plotting library

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = [r["k"] for r in rows]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("best", "reward's top pick"), ("weighted_majority", "reward-weighted majority"),
                       ("majority", "majority"), ("pass", "pass@k")):
        left.plot(ks, [r[key] for r in rows], marker="o", label=label)
    left.axhline(greedy, color="grey", linestyle="--", label="greedy")
    right.plot(ks, [r["proxy"] for r in rows], marker="o", color="tab:red")
    for axis, label in ((left, "gold accuracy"), (right, "proxy score of the top pick")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("k (samples per prompt)")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
    left.legend(fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        figure.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(figure)
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(cfg: Any, run_dir: Path) -> dict[str, Any]:
    """Sample, score and draw the best-of-n curve for `cfg.policy` on `cfg.dataset`'s test split with
    `cfg.reward`; returns {"bench", "metrics" (flat), "rows" (one per k)} and writes best_of_n.png to run_dir."""
    import torch
    from hydra.utils import instantiate

    from rewardlab.answers import check, extract_answer
    from rewardlab.run import evaluation_dataset

    bench = cfg.bench
    for key in ("n", "prompts", "subsets"):
        if bench[key] < 1:
            raise UserError(f"bench.{key}={bench[key]} must be at least 1")
    task = instantiate(evaluation_dataset(cfg.dataset))
    policy = instantiate(cfg.policy, device=cfg.run.get("device", "auto"), log=lambda *_: None)
    task.prepare(policy.tokenizer)
    generator = instantiate(cfg.generation, policy=policy)
    reward = instantiate(cfg.reward)
    reward.bind(policy)
    test = list(task.test_examples())[: bench.prompts]
    if not test:
        raise UserError("the data set's test split is empty; bench=best_of_n needs test prompts")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(bench.seed)
        greedy = generator.generate(test, n=1, greedy=True)
        batch = generator.generate(test, n=bench.n)
    reward.score(batch)
    gold = check(batch.completion, batch.reference, task.answer_format)
    answers = [extract_answer(c, task.answer_format, r) for c, r in zip(batch.completion, batch.reference)]
    n = bench.n
    groups = [range(i, i + n) for i in range(0, len(batch), n)]  # the generator keeps each prompt's rows together
    rows = curve([[answers[i] for i in g] for g in groups], [[batch.reward[i] for i in g] for g in groups],
                 [[gold[i] for i in g] for g in groups], bench.subsets, bench.seed)
    greedy_accuracy = sum(c or 0.0 for c in check(greedy.completion, greedy.reference, task.answer_format)) / len(test)
    metrics = {"greedy/accuracy": greedy_accuracy, "prompts": float(len(test)), "n": float(n)}
    for row in rows:
        k = row["k"]
        metrics.update({f"best@{k}": row["best"], f"weighted_majority@{k}": row["weighted_majority"],
                        f"majority@{k}": row["majority"], f"pass@{k}": row["pass"], f"proxy@{k}": row["proxy"]})
    run_dir.mkdir(parents=True, exist_ok=True)
    plot(rows, greedy_accuracy, run_dir / "best_of_n.png", f"best-of-n: reward={reward.name}, {len(test)} prompts")
    return {"bench": "best_of_n", "metrics": metrics, "rows": rows}
