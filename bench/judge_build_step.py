"""Seconds per mixed step of the judging tiny policy's build (`policy=tiny_judge`), by micro-batch size.

    python bench/judge_build_step.py [--steps 30] [--sizes 0 4096 2048 1024]

Rows drawn as the build draws them (8 solving, 20 pointwise, 20 pairwise, 16 check rows; judging rows from the
cached solving model's samples of 300 problems), on BUILD_THREADS threads, from the cached tiny model (built first
if missing). Size 0 is one padded batch. The last printed line is one JSON object: mean seconds per step by size.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 4096, 2048, 1024])
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    import rewardlab.policy.tiny_judge as tj
    from rewardlab.data.arith import ArithTask
    from rewardlab.policy.tiny import TinyBuild, build_threads, build_tokenizer, ensure_tiny, supervised

    base = ensure_tiny(TinyBuild())
    rng = random.Random(0)
    problems = ArithTask(seed=1).train_examples()
    with build_threads():
        chosen = rng.sample(problems, 300)
        samples = tj.sample_solutions(base, chosen, 4)
        tokenizer = build_tokenizer(extra=tj.JUDGE_CHARS)
        point, pair = tj.judging_rows(tokenizer, chosen, samples, rng)
        solving = [(ex.prompt, ex.solution) for ex in problems]
        context = [c for row in samples for c in row]

        seconds = {}
        for size in args.sizes:
            model = AutoModelForCausalLM.from_pretrained(base)
            model.resize_token_embeddings(len(tokenizer))
            began = time.perf_counter()
            supervised(model, tokenizer, lambda: tj.mixed_batch(rng, solving, point, pair, context), args.steps,
                       1e-3, log=lambda _: None, batch_tokens=size or None)
            seconds[str(size)] = round((time.perf_counter() - began) / args.steps, 3)
            print(f"micro-batch tokens {size or 'one padded batch'}: {seconds[str(size)]} s/step", flush=True)
    print(json.dumps({"seconds_per_step": seconds}))


if __name__ == "__main__":
    main()
