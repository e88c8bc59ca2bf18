"""Peak memory of one policy-gradient update on a model with a large vocabulary: `head`, the LM head projected
and log-softmaxed a block of tokens at a time (rewardlab.algos.losses.HeadLogSoftmax, its path off CUDA from a
32,768-word vocabulary on); TRL's fused LM head (rewardlab's path on CUDA; forced onto the CPU here); the
chunked selective log-softmax over the model's logits (`chunked`, the CPU path before `head`); and the
full-vocabulary fp32 log_softmax they all replaced.

A Llama of tiny depth (1 layer, hidden 64) with Qwen2.5's vocabulary (151,936) and random weights, so the
logits dominate; one `PolicyGradient.update` (defaults: one micro-batch of every row, beta 0) on random
completions. Each measurement runs in a fresh process and reads its peak RSS (`getrusage`: torch's
allocations are invisible to tracemalloc); `update` is the peak during the update minus the peak before it
(model, AdamW state and batch built).

    python bench/loss_memory.py [--rows 32] [--completion 64] [--vocab 151936] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def full_formula(logits, targets, temperature: float = 1.0, with_entropy: bool = False):
    """The formula before chunking: log_softmax over the whole vocabulary in fp32, gather, entropy."""
    import torch

    logp_all = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)
    logps = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = None
    if with_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logps, entropy


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def measure(formula: str, rows: int, completion: int, vocab: int, hidden: int, dtype: str) -> dict:
    """One update in this process; the figures as a dict."""
    import types

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rewardlab.algos import AlgoContext, losses
    from rewardlab.algos.pg import PolicyGradient
    from rewardlab.policy import Policy
    from rewardlab.rollout import Batch

    torch.manual_seed(0)
    if formula == "fused":  # TRL's fused head (on CPU too, where rewardlab does not use it by default)
        losses.FUSED_HEAD_DEVICES = ("cuda", "cpu")
    elif formula != "head":  # the logits path, at any vocabulary ("head": rewardlab's default on CPU)
        losses.FUSED_HEAD_MIN_VOCAB = 1 << 62
    if formula == "full":
        losses.selective_logprobs = full_formula
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    policy = Policy(model=model, tokenizer=types.SimpleNamespace(pad_token_id=0), source="bench",
                    device=torch.device("cpu"))
    prompt = 16
    ids = torch.randint(1, vocab, (rows, prompt + completion)).tolist()
    batch = Batch(prompt_id=[str(i // 8) for i in range(rows)], prompt=[""] * rows, completion=[""] * rows,
                  prompt_ids=[r[:prompt] for r in ids], completion_ids=[r[prompt:] for r in ids],
                  finish_reason=["length"] * rows, reference=[None] * rows, solution=[None] * rows,
                  reward=[float(i % 2) for i in range(rows)])
    algo = PolicyGradient(AlgoContext(temperature=1.0, max_new_tokens=completion), micro_batch_size=64,
                          minibatch_size=0)
    algo.setup(policy)
    for p in model.parameters():  # AdamW's moments exist before the measured update, as in a running loop
        algo.optimizer.state[p] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(p),
                                   "exp_avg_sq": torch.zeros_like(p)}
    before = peak_mb()
    start = time.perf_counter()
    out = algo.update(policy, batch)
    seconds = time.perf_counter() - start
    after = peak_mb()
    return {"formula": formula, "dtype": dtype, "rows": rows, "completion": completion, "vocab": vocab,
            "logits_mb": rows * (completion + 1) * vocab * torch.finfo(model.dtype).bits / 8 / 2**20,
            "peak_before_update_mb": round(before), "peak_mb": round(after), "update_mb": round(after - before),
            "update_s": round(seconds, 2), "loss": out["loss"], "entropy": out["entropy"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--completion", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.rows, args.completion, args.vocab, args.hidden, args.dtype)))
        return
    results = []
    for formula in ("full", "chunked", "head", "fused"):
        cmd = [sys.executable, __file__, "--child", formula, "--rows", str(args.rows), "--completion",
               str(args.completion), "--vocab", str(args.vocab), "--hidden", str(args.hidden), "--dtype", args.dtype]
        line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(line, flush=True)
    full = results[0]
    for other in results[1:]:
        assert abs(full["loss"] - other["loss"]) < 1e-4 and abs(full["entropy"] - other["entropy"]) < 1e-3
    print(json.dumps({**{f"update_mb_{r['formula']}": r["update_mb"] for r in results},
                      **{f"peak_mb_{r['formula']}": r["peak_mb"] for r in results},
                      **{f"update_s_{r['formula']}": r["update_s"] for r in results}}))


if __name__ == "__main__":
    main()
