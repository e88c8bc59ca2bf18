"""Scoring throughput: verifiable rows/s on realistic completions, and PRM tokens/s on a tiny model.

Verifiable: GSM8K-style completions (worked steps with `<<a+b=c>>` calculator marks, `#### n`, some with
thousands separators) and MATH-style ones (`\\boxed{}` answers: fractions, roots, intervals, polynomials,
often written differently from the reference so math-verify decides), half right and half wrong.
rewardlab's `check` is timed against calling math-verify's parse/verify on every row directly.
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
MATH_CASES = [  # (reference, right answers written differently, wrong answers)
    ("\\frac{3}{4}", ["\\dfrac{3}{4}", "0.75", "\\frac{6}{8}"], ["\\frac{4}{3}", "0.7"]),
    ("\\frac{\\sqrt{2}}{2}", ["\\frac{1}{\\sqrt{2}}", "\\frac{\\sqrt 2}{2}"], ["\\sqrt{2}", "\\frac{1}{2}"]),
    ("(1, 3]", ["(1,3]"], ["[1, 3]", "(1, 3)"]),
    ("x^2 + 2x + 1", ["(x+1)^2", "x^2+2x+1"], ["x^2+1", "(x-1)^2"]),
    ("3\\pi", ["3 \\pi", "\\pi \\cdot 3"], ["3", "\\frac{3}{\\pi}"]),
    ("10\\%", ["10"], ["0.01"]),
    ("\\text{(B)}", ["B"], ["C"]),
    ("2\\sqrt{5}", ["\\sqrt{20}"], ["\\sqrt{10}"]),
]
NAMES = ["Natalia", "Weng", "Betty", "James", "Albert", "Mark"]


def verifiable_rows(n: int, seed: int = 0) -> tuple[list[str], list[str]]:
    rng = random.Random(seed)
    completions, references = [], []
    for i in range(n):
        right = i % 2 == 0
        if i % 4 < 2:  # GSM8K style
            a, b, c = rng.randint(2, 999), rng.randint(2, 999), rng.randint(1, 50)
            s, p, k = a + b, a * b, a * 1000
            values = dict(name=rng.choice(NAMES), a=a, b=b, c=c, s=s, d=s - c, p=p, k=k, t=k + b)
            template = rng.choice(GSM_TEMPLATES)
            truth = {0: s - c, 1: p, 2: k + b}[GSM_TEMPLATES.index(template)]
            shown = truth if right else truth + rng.randint(1, 9)
            values.update(ans=shown, ans_k=f"{shown:,}")
            completions.append("Let's think step by step.\n" + template.format(**values))
            references.append(str(truth))
        else:  # MATH style
            reference, rights, wrongs = rng.choice(MATH_CASES)
            answer = rng.choice(rights if right else wrongs)
            completions.append(f"We simplify the expression step by step, combining like terms and checking "
                               f"the domain.\nSo the final answer is $\\boxed{{{answer}}}$.")
            references.append(reference)
    return completions, references


def plain_math_verify(completions: list[str], references: list[str]) -> list[float]:
    from math_verify import parse, verify

    return [float(bool(verify(parse(r), parse(c)))) for c, r in zip(completions, references)]


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
    args = parser.parse_args()

    import torch

    from rewardlab.rewards.prm import PRMReward
    from rewardlab.rewards.verifiable import check
    from rewardlab.steps import StepSplit

    if args.threads:
        torch.set_num_threads(args.threads)
    completions, references = verifiable_rows(args.rows)
    ours, plain = [], []
    check(completions[:50], references[:50])  # warm the math-verify import and caches
    for _ in range(args.repeats):
        seconds, scores = time_it(check, completions, references)
        ours.append(len(completions) / seconds)
        seconds, _ = time_it(plain_math_verify, completions, references)
        plain.append(len(completions) / seconds)
    accuracy = sum(s == (i % 2 == 0) for i, s in enumerate(scores)) / len(scores)

    prm = PRMReward()  # the tiny arith PRM, math_shepherd format
    prompts, prm_completions = prm_rows(args.prm_rows)
    steps = [[s for s, _ in StepSplit().split(c)] for c in prm_completions]
    tokens = sum(len(prm._encode(p, s)[0]) for p, s in zip(prompts, steps))
    prm.step_scores(prompts[:64], steps[:64])
    prm_rates = []
    for _ in range(args.repeats):
        seconds, _ = time_it(prm.step_scores, prompts, steps)
        prm_rates.append(tokens / seconds)

    def summary(rates: list[float]) -> dict:
        return {"median": statistics.median(rates), "range": [min(rates), max(rates)]}

    out = {"torch_threads": torch.get_num_threads(), "rows": len(completions), "repeats": args.repeats,
           "verifiable_rows_per_s": summary(ours), "plain_math_verify_rows_per_s": summary(plain),
           "verifiable_label_accuracy": accuracy, "prm_rows": len(prompts), "prm_tokens": tokens,
           "prm_batch_size": prm.batch_size, "prm_tokens_per_s": summary(prm_rates)}
    print(f"verifiable: {out['verifiable_rows_per_s']}, plain math-verify: {out['plain_math_verify_rows_per_s']}, "
          f"labels right: {accuracy:.3f}; PRM: {out['prm_tokens_per_s']} tokens/s", file=sys.stderr)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
