"""Where GRPO's time goes on the embedded model: one decoding iteration and one update step, timed and profiled.

Decoding: the default generator (native engine) on 16 prompts x 8 samples, 40 new tokens, temperature 1, as in a
default iteration. Update step: rewardlab's own log-prob path (`token_logprobs`, packed as by default) on 32 of
those completions (one default minibatch), a sequence-mean loss of the log-probs, backward. Eager, then with
`--compile` the decoder layers under `torch.compile(dynamic=True)` (compilation time reported apart). The top
operators of each come from `torch.profiler` (CPU time, self). The last printed line is one JSON object.

    python bench/profile_step.py [--steps 30] [--compile]

`bench/profile_run.py` is the other view: a cProfile of a whole short run, by Python function.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rewardlab.algos.losses import to_tensors, token_logprobs
from rewardlab.data.arith import ArithTask
from rewardlab.data.base import PromptSampler
from rewardlab.generation.hf import HFGenerator
from rewardlab.policy import load_policy


def top_ops(prof, n: int = 6) -> dict[str, float]:
    """Share of self CPU time of the `n` costliest operators."""
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    ranked = sorted(events, key=lambda e: -e.self_cpu_time_total)[:n]
    return {e.key: round(e.self_cpu_time_total / total, 3) for e in ranked}


def timed(fn, repeats: int) -> float:
    began = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - began) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="repeats of each timed piece")
    parser.add_argument("--compile", action="store_true", help="also time the update step under torch.compile")
    args = parser.parse_args()
    torch.manual_seed(0)
    policy = load_policy(device="cpu", log=lambda *_: None)
    prompts = PromptSampler(ArithTask().train_examples(), seed=0).sample(16)
    generator = HFGenerator(policy, sampling={"max_new_tokens": 40, "temperature": 1.0})
    decode = lambda: generator.generate(prompts, n=8)  # noqa: E731
    batch = decode()
    out: dict = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                 "decode_s_per_iteration": timed(decode, max(1, args.steps // 3))}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode()
    out["decode_top_ops"] = top_ops(prof)

    model = policy.model.train()
    t = to_tensors(batch, policy.tokenizer.pad_token_id, policy.device)
    rows = torch.arange(32)
    out["update_tokens"] = int(t.attention_mask[rows].sum())

    def step(m=model) -> None:
        logps, _ = token_logprobs(m, t, rows, 1.0, with_entropy=True, packed=True)
        loss = -(logps * t.completion_mask[rows]).sum(-1).div(t.completion_mask[rows].sum(-1)).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    out["update_step_ms"] = 1000 * timed(step, args.steps)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    out["update_top_ops"] = top_ops(prof)
    if args.compile:
        layers = model.model.layers
        eager = [layer.forward for layer in layers]
        for layer in layers:
            layer.forward = torch.compile(layer.forward, dynamic=True)
        began = time.perf_counter()
        step()
        step()
        out["compile_s"] = time.perf_counter() - began
        out["update_step_ms_compiled"] = 1000 * timed(step, args.steps)
        for layer, forward in zip(layers, eager):
            layer.forward = forward
    print(json.dumps(out))


if __name__ == "__main__":
    main()
