"""Replay PRIME's implicit-PRM training offline on a finished run's saved rollouts, and print the PRM's
within-group AUC (`prime/auc`) by windows of iterations: the README's evidence for `algo.prime.buffer`.

The PRM starts as the run's initial policy, the reference is that policy, and the rollouts come from
<run dir>/rollouts/iter_*.parquet in order; each iteration the PRM scores that iteration's rollouts (the AUC,
before any step on them), then takes one AdamW step of PRIME's cross-entropy (rewardlab.algos.prime) on them
and one on each of the previous `--buffer - 1` iterations' rollouts, newest first, as `algo=prime` does.
Nothing optimizes against this PRM (the rollouts are fixed), so a replay on a GRPO run shows what the PRM's
training alone learns.

    .venv/bin/python scripts/prime_replay.py <run dir> [--buffer 8] [--beta 0.5] [--lr 5e-4] [--windows 6]
    .venv/bin/python scripts/prime_replay.py <run dir> --buffer 1 --beta 0.05    # PRIME's own setting

The last line is one JSON object (settings, per-iteration AUC, window means).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

from rewardlab.algos.losses import to_tensors, token_logprobs
from rewardlab.algos.prime import cross_entropy, group_auc


def read(path: Path) -> tuple:
    """One iteration's rollouts as (tensors, labels, groups)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(path, columns=["prompt_id", "prompt_ids", "completion_ids", "gold"]).to_pylist()
    batch = SimpleNamespace(prompt_ids=[r["prompt_ids"] for r in rows],
                            completion_ids=[r["completion_ids"] for r in rows])
    index: dict[str, int] = {}
    groups = torch.tensor([index.setdefault(r["prompt_id"], len(index)) for r in rows])
    return to_tensors(batch, 0, torch.device("cpu")), torch.tensor([float(r["gold"]) for r in rows]), groups


def logprobs(model, t, size: int = 64) -> torch.Tensor:
    return torch.cat([token_logprobs(model, t, slice(s, s + size), 1.0)[0] for s in range(0, t.input_ids.shape[0], size)])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--policy", help="the run's initial policy (default: its config's policy.path, else the default tiny policy)")
    parser.add_argument("--buffer", type=int, default=8)
    parser.add_argument("--beta", type=float, default=0.5)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-grad-norm", type=float, default=10.0)
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    files = sorted((args.run_dir / "rollouts").glob("iter_*.parquet"))
    if not files or args.buffer < 1:
        print(f"error: {args.run_dir} has no rollouts/iter_*.parquet" if not files else "error: --buffer must be >= 1",
              file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    source = args.policy
    if source is None:
        from omegaconf import OmegaConf

        from rewardlab.policy.tiny import TinyBuild, ensure_tiny

        path = OmegaConf.load(args.run_dir / "config.yaml").policy.get("path")
        source = str(path) if path else str(ensure_tiny(TinyBuild(), log=lambda *_: None))
    reference = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32).eval().requires_grad_(False)
    prm = AutoModelForCausalLM.from_pretrained(source, torch_dtype=torch.float32)
    optimizer = torch.optim.AdamW(prm.parameters(), lr=args.lr, weight_decay=0.0)
    history: collections.deque = collections.deque(maxlen=args.buffer)
    aucs: list[float | None] = []
    means: list[float] = []  # the mean r_phi per iteration (algo=prime logs it as prime/reward_mean)
    for path in files:
        t, labels, groups = read(path)
        with torch.no_grad():
            ref = logprobs(reference, t)
            prm.eval()
            scores = (args.beta * (logprobs(prm, t) - ref) * t.completion_mask).sum(-1)
        aucs.append(group_auc(scores, labels, groups))
        means.append(float(scores.mean()))
        history.append((t, ref, labels))
        prm.train()
        for bt, bref, blabels in reversed(history):  # this iteration's rollouts first, then older ones
            optimizer.zero_grad()
            cross_entropy(logprobs(prm, bt), bref, bt.completion_mask, blabels, args.beta).mean().backward()
            torch.nn.utils.clip_grad_norm_(prm.parameters(), args.max_grad_norm)
            optimizer.step()
        print(f"iteration {len(aucs)}: auc {aucs[-1] if aucs[-1] is None else round(aucs[-1], 3)}", file=sys.stderr)
    size = max(1, -(-len(aucs) // args.windows))
    windows = []
    for start in range(0, len(aucs), size):
        seen = [a for a in aucs[start:start + size] if a is not None]
        windows.append(round(sum(seen) / len(seen), 3) if seen else None)
    print(json.dumps({"run_dir": str(args.run_dir), "buffer": args.buffer, "beta": args.beta, "lr": args.lr,
                      "auc_by_window": windows, "window_iterations": size, "auc": aucs,
                      "reward_mean": means}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
