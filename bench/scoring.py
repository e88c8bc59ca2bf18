"""Scoring throughput: verifiable rows/s on realistic completions, and PRM tokens/s on a tiny model.

Verifiable: GSM8K-style completions (worked steps with `<<a+b=c>>` calculator marks, `#### n`, some with
thousands separators) and MATH-style ones (`\\boxed{}` answers: fractions, roots, intervals, polynomials,
often written differently from the reference so math-verify decides), in GRPO's shape: 8 completions per
problem sharing its reference, each right or wrong at random. rewardlab's `check` is timed (caches cleared
before each repeat) against calling math-verify's parse/verify on every row directly, and both are graded
against the known labels.
PRM: the auto-built tiny arith PRM (math_shepherd format) scoring arith completions of mixed lengths;
tokens/s counts the tokens the PRM reads (prompt + steps + tags). The last printed line is one JSON object.

    python bench/scoring.py [--rows 2000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time

GSM_TEMPLATES = [
    "{name} has {a} apples. She buys {b} more, so she has {a}+{b} = <<{a}+{b}={s}>>{s} apples.\n"
    "She gives away {c}, leaving {s}-{c} = <<{s}-{c}={d}>>{d} apples.\n#### {ans}",
    "Each box holds {a} pens and there are {b} boxes, so there are {a}*{b} = <<{a}*{b}={p}>>{p} pens.\n"
    "The store sells them for $1 each, so it makes ${p}.\nThe answer is {p}.\n#### {ans}",
    "First, {a} * 1000 = <<{a}*1000={k}>>{k} grams.\nThen the total is {k} + {b} = {t} grams.\n#### {ans_k}",
]
NAMES = ["Natalia", "Weng", "Betty", "James", "Albert", "Mark"]


def math_case(rng: random.Random) -> tuple[str, list[str], list[str]]:
    """A MATH-style reference with answers written differently but equal, and wrong ones."""
    a, b, c = rng.randint(2, 9), rng.randint(10, 16), rng.randint(2, 7)  # no a = b or a = 1: wrongs stay wrong
    kind = rng.randrange(6)
    if kind == 0:
        return (f"\\frac{{{a}}}{{{b}}}", [f"\\dfrac{{{a}}}{{{b}}}", f"\\frac{{{a * c}}}{{{b * c}}}"],
                [f"\\frac{{{b}}}{{{a}}}", f"\\frac{{{a + 1}}}{{{b}}}"])
    if kind == 1:
        return (f"\\frac{{\\sqrt{{{b}}}}}{{{c}}}", [f"\\dfrac{{\\sqrt{{{b}}}}}{{{c}}}", f"\\sqrt{{{b}}}/{c}"],
                [f"\\sqrt{{{b}}}", f"\\frac{{{b}}}{{{c}}}"])
    if kind == 2:
        return (f"({a}, {a + b}]", [f"({a},{a + b}]"], [f"[{a}, {a + b}]", f"({a}, {a + b})"])
    if kind == 3:
        return (f"x^2 + {2 * a}x + {a * a}", [f"(x+{a})^2", f"x^2+{2 * a}x+{a * a}"],
                [f"(x-{a})^2", f"x^2+{a * a}"])
    if kind == 4:
        return (f"{a}\\pi", [f"{a} \\pi", f"\\pi \\cdot {a}"], [f"{a}", f"\\frac{{{a}}}{{\\pi}}"])
    return (f"{a}\\sqrt{{{c}}}", [f"\\sqrt{{{a * a * c}}}"], [f"\\sqrt{{{a * c}}}", f"{a + 1}\\sqrt{{{c}}}"])


def verifiable_rows(n: int, group: int = 8, seed: int = 0) -> tuple[list[str], list[str], list[bool]]:
    """`n` rows in GRPO's shape: `group` completions per problem, same reference, answers that repeat."""
    rng = random.Random(seed)
    completions, references, truth = [], [], []
    for problem in range(0, n, group):
        if problem // group % 2 == 0:  # GSM8K style
            a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(1, 50)
            s, p, k = a + b, a * b, a * 1000
            index = rng.randrange(len(GSM_TEMPLATES))
            right_answer = {0: s - c, 1: p, 2: k + b}[index]
            for _ in range(min(group, n - problem)):
                right = rng.random() < 0.5
                shown = right_answer if right else right_answer + rng.randint(1, 3)
                values = dict(name=rng.choice(NAMES), a=a, b=b, c=c, s=s, d=s - c, p=p, k=k, t=k + b,
                              ans=shown, ans_k=f"{shown:,}")
                completions.append("Let's think step by step.\n" + GSM_TEMPLATES[index].format(**values))
                references.append(str(right_answer))
                truth.append(right)
        else:  # MATH style
            reference, rights, wrongs = math_case(rng)
            for _ in range(min(group, n - problem)):
                right = rng.random() < 0.5
                answer = rng.choice(rights if right else wrongs)
                completions.append(f"We simplify the expression step by step, combining like terms and "
                                   f"checking the domain.\nSo the final answer is $\\boxed{{{answer}}}$.")
                references.append(reference)
                truth.append(right)
    return completions, references, truth


def plain_math_verify(completions: list[str], references: list[str]) -> list[float]:
    from math_verify import parse, verify

    return [float(bool(verify(parse(r), parse(c)))) for c, r in zip(completions, references)]


def clear_caches() -> None:
    from rewardlab import answers

    answers.clear_cache()


def time_it(fn, *args) -> tuple[float, object]:
    began = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - began, out


def prm_rows(n: int, seed: int = 0):
    from rewardlab.data.arith import ArithTask

    rng = random.Random(seed)
    examples = ArithTask(max_operands=4).train_examples()[:n]
    prompts, completions = [], []
    for ex in examples:
        lines = ex.solution.split("\n")
        if rng.random() < 0.5:  # a wrong step somewhere
            k = rng.randrange(len(lines) - 1) if len(lines) > 1 else 0
            lines[k] = lines[k] + "1"
        prompts.append(ex.prompt)
        completions.append("\n".join(lines))
    return prompts, completions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--prm-rows", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--only", choices=["verifiable", "prm"], default=None)
    args = parser.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"torch_threads": torch.get_num_threads(), "repeats": args.repeats}
    if args.only in (None, "verifiable"):
        out.update(bench_verifiable(args))
        print(f"verifiable: {out['verifiable_rows_per_s']} rows/s, plain math-verify: "
              f"{out['plain_math_verify_rows_per_s']}; labels right: {out['verifiable_label_accuracy']:.3f} "
              f"(plain {out['plain_math_verify_label_accuracy']:.3f})", file=sys.stderr)
    if args.only in (None, "prm"):
        out.update(bench_prm(args))
        print(f"PRM: {out['prm_tokens_per_s']} tokens/s", file=sys.stderr)
    print(json.dumps(out))


def summary(rates: list[float]) -> dict:
    return {"median": statistics.median(rates), "range": [min(rates), max(rates)]}


def bench_verifiable(args) -> dict:
    from rewardlab.answers import check

    completions, references, truth = verifiable_rows(args.rows)
    ours, plain = [], []
    check(completions[:50], references[:50])  # warm the math-verify import
    for _ in range(args.repeats):
        clear_caches()  # every repeat starts cold, as a new iteration's batch would
        seconds, scores = time_it(check, completions, references)
        ours.append(len(completions) / seconds)
        seconds, plain_scores = time_it(plain_math_verify, completions, references)
        plain.append(len(completions) / seconds)
    return {"rows": len(completions), "verifiable_rows_per_s": summary(ours),
            "plain_math_verify_rows_per_s": summary(plain),
            "verifiable_label_accuracy": sum(bool(s) == t for s, t in zip(scores, truth)) / len(truth),
            "plain_math_verify_label_accuracy": sum(bool(s) == t for s, t in zip(plain_scores, truth)) / len(truth)}


def bench_prm(args) -> dict:
    from rewardlab.rewards.prm import PRMReward
    from rewardlab.steps import StepSplit

    prm = PRMReward()  # the tiny arith PRM, math_shepherd format
    prompts, completions = prm_rows(args.prm_rows)
    steps = [[s for s, _ in StepSplit().split(c)] for c in completions]
    tokens = sum(len(prm._encode(p, s)[0]) for p, s in zip(prompts, steps))
    prm.step_scores(prompts[:64], steps[:64])
    rates = []
    for _ in range(args.repeats):
        seconds, _ = time_it(prm.step_scores, prompts, steps)
        rates.append(tokens / seconds)
    return {"prm_rows": len(prompts), "prm_tokens": tokens, "prm_batch_size": prm.batch_size,
            "prm_tokens_per_s": summary(rates)}


if __name__ == "__main__":
    main()
