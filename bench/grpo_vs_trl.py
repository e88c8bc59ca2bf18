"""GRPO throughput and accuracy: rewardlab's native loop vs TRL's GRPOTrainer on the same work.

Same tiny starting policy, prompts per step, group size, completion length, learning rate, temperature,
number of steps (so the same number of completions); the two are run alternately in one process to share
the machine's noise. Throughput counts generation + scoring + update time (evaluation excluded for both).
The last printed line is one JSON object.

    python bench/grpo_vs_trl.py --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def rewardlab_run(args, seed: int) -> dict:
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from rewardlab.config import register_schemas
    from rewardlab.run import train

    register_schemas()
    GlobalHydra.instance().clear()
    overrides = [f"run.iterations={args.steps}", f"run.prompts_per_iteration={args.prompts}",
                 f"algo.samples_per_prompt={args.group}", f"algo.lr={args.lr}",
                 f"generation.sampling.max_new_tokens={args.max_new_tokens}",
                 f"generation.sampling.temperature={args.temperature}", f"run.eval_every={10**6}",
                 f"run.eval_size={args.eval_size}", f"run.seed={seed}", f"run.device={args.device}",
                 "run.save_rollouts=false", "logger=none", f"algo.loss_agg={args.loss_agg}",
                 f"algo.minibatch_size={args.minibatch}"]
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with tempfile.TemporaryDirectory() as out:
        train(cfg, Path(out))
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    work = sum(r["time/iteration"] - r.get("time/eval", 0.0) for r in rows[1:])
    generate = sum(r.get("time/generate", 0.0) for r in rows[1:])
    update = sum(r.get("time/update", 0.0) for r in rows[1:])
    completions = sum(r["rollouts"] for r in rows[1:])
    return {"seconds": work, "generate_seconds": generate, "update_seconds": update, "completions": completions,
            "eval_accuracy": rows[-1]["eval/accuracy"],
            "optimizer_steps": int(sum(r.get("update/steps", 0) for r in rows[1:])),
            "start_accuracy": rows[0]["eval/accuracy"]}


def trl_run(args, seed: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rewardlab.data.arith import ArithTask
    from rewardlab.data.base import PromptSampler
    from rewardlab.evaluation import evaluate
    from rewardlab.generation.hf import HFGenerator
    from rewardlab.policy import load_policy
    from rewardlab.answers import check

    torch.manual_seed(seed)
    task = ArithTask()
    prompts = PromptSampler(task.train_examples(), seed=seed).sample(args.steps * args.prompts)
    data = Dataset.from_dict({"prompt": [e.prompt for e in prompts], "answer": [e.answer for e in prompts]})
    policy = load_policy(device=args.device, log=lambda *_: None)

    def correctness(completions, answer, **_):
        return check(list(completions), list(answer), task.answer_format)

    batch = args.prompts * args.group
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            # one generation batch of prompts x group completions per `steps_per_generation` optimizer steps of
            # `minibatch` completions each: the same optimizer steps as rewardlab's algo.minibatch_size
            output_dir=out, per_device_train_batch_size=args.minibatch or batch, num_generations=args.group,
            steps_per_generation=batch // (args.minibatch or batch), gradient_accumulation_steps=1,
            max_completion_length=args.max_new_tokens, temperature=args.temperature, learning_rate=args.lr,
            lr_scheduler_type="constant", beta=0.0, max_grad_norm=1.0, loss_type={"sequence_mean": "grpo", "token_mean": "dapo",
            "constant": "dr_grpo"}[args.loss_agg], max_steps=args.steps * batch // (args.minibatch or batch), use_cpu=args.device == "cpu",
            report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=seed,
            shuffle_dataset=False, bf16=False,
            # GRPOConfig defaults to activation checkpointing (the forward recomputed in backward); rewardlab's
            # policy.gradient_checkpointing is off, so TRL's is too: the same work (before 2026-12-02 TRL recomputed)
            gradient_checkpointing=False)
        trainer = GRPOTrainer(model=policy.model, reward_funcs=[correctness], args=config, train_dataset=data,
                              processing_class=policy.tokenizer)
        generate, generating = policy.model.generate, [0.0]

        def timed_generate(*a, **k):  # where TRL's time goes: decoding vs the rest (scoring, old log-probs, update)
            began = time.perf_counter()
            try:
                return generate(*a, **k)
            finally:
                generating[0] += time.perf_counter() - began

        policy.model.generate = timed_generate
        began = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - began
    policy.model.eval()
    test = task.test_examples()[: args.eval_size]
    accuracy = evaluate(HFGenerator(policy), test, task.answer_format)["eval/accuracy"]
    del policy.model.generate
    return {"seconds": seconds, "generate_seconds": generating[0], "completions": args.steps * args.prompts * args.group,
            "eval_accuracy": accuracy,
            "optimizer_steps": trainer.state.global_step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--minibatch", type=int, default=32,
                        help="completions per optimizer step (rewardlab's default); 0: one step per batch")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss-agg", default="sequence_mean", choices=["sequence_mean", "token_mean", "constant"])
    parser.add_argument("--eval-size", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results: dict[str, list[dict]] = {"rewardlab": [], "trl": []}
    for repeat in range(args.repeats):
        for name, fn in (("rewardlab", rewardlab_run), ("trl", trl_run)) if repeat % 2 == 0 else \
                (("trl", trl_run), ("rewardlab", rewardlab_run)):
            out = fn(args, seed=repeat)
            out["completions_per_s"] = out["completions"] / out["seconds"]
            results[name].append(out)
            print(f"repeat {repeat} {name}: {json.dumps(out)}", file=sys.stderr, flush=True)
    summary = {"machine_threads": torch.get_num_threads(), "torch": torch.__version__, **vars(args)}
    for name, runs in results.items():
        rates = [r["completions_per_s"] for r in runs]
        accs = [r["eval_accuracy"] for r in runs]
        summary[f"{name}_completions_per_s"] = statistics.median(rates)
        summary[f"{name}_completions_per_s_range"] = [min(rates), max(rates)]
        summary[f"{name}_eval_accuracy"] = statistics.median(accs)
        summary[f"{name}_eval_accuracy_all"] = accs
        summary[f"{name}_generate_share"] = statistics.median(r["generate_seconds"] / r["seconds"] for r in runs)
    summary["start_eval_accuracy"] = results["rewardlab"][0]["start_accuracy"]
    summary["speedup"] = summary["rewardlab_completions_per_s"] / summary["trl_completions_per_s"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
