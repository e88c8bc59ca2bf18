"""GRPO at real scale without a real model: rewardlab against TRL's GRPOTrainer on a random model of real shape.

A Llama-class model with a real model's dimensions and vocabulary (Qwen2.5-0.5B's by default; random weights)
and the tiny policy's character tokenizer is built once into the model cache (Llama, not Qwen2: transformers 5
forces Qwen2Tokenizer on Qwen2 configs, see rewardlab/policy/tiny.py). Then each system does the same GRPO work
in its own process, alternately: `rewardlab train policy.path=<model>` (one process per generation engine) and
TRL's GRPOTrainer with the same prompts, group size, completion length, learning rate and temperature, beta 0,
one optimizer step per iteration, fp32 on CPU and bf16 on CUDA. Random weights almost never emit EOS, so both
sides decode to the full length; the completion token counts are printed and checked. Both recompute the
layers' activations in the backward pass (activation checkpointing: GRPOConfig's default, rewardlab's
`policy.gradient_checkpointing=true`), which at this size decides most of the update's memory; a comparison
with it on one side only would not be the same work. The reward on both sides
is the verifiable arith reward plus `coin` (a 0/1 hash of the completion's token ids): random weights never
solve a problem, and with every reward 0 rewardlab rightly skips the update (no gradient) while TRL runs it.

Per run: seconds per iteration (generation + scoring + update; model load and evaluation excluded), generation
tokens/s, the process's peak resident memory (its own ru_maxrss, from wait4) and on CUDA its peak allocated
GPU memory. The last printed line is one JSON object.

    python bench/real_shape.py --shape small --iterations 2 --max-new-tokens 32    # smoke test (~1 min on CPU)
    python bench/real_shape.py --iterations 3 --repeats 2                           # Qwen2.5-0.5B's shape
    python bench/real_shape.py --device cuda --engines native,generate              # on a GPU (bench/gpu_check.sh)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import zlib
from importlib.metadata import version
from pathlib import Path

VOCAB = 151_936  # Qwen2.5's vocabulary: the logits' size, which dominates memory at this scale
SHAPES = {  # Qwen2.5's published dimensions; `small` keeps the vocabulary for a quick check
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2),
    "1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2),
    "small": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
}
SCRIPT = str(Path(__file__).resolve())
BUILD_VERSION = 1  # bump when the build changes, so old caches are not reused

# Runs the rewardlab CLI in this process and, at exit, writes its peak allocated CUDA memory (if it used CUDA).
CLI_WITH_PEAK = """
import atexit, os, sys
def _peak():
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        with open(os.environ["BENCH_CUDA_PEAK"], "w") as f:
            f.write(str(torch.cuda.max_memory_allocated()))
atexit.register(_peak)
from rewardlab.cli.main import app
app(prog_name="rewardlab")
"""


def coin(token_ids) -> float:
    """0 or 1 from a hash of a completion's token ids: gives groups of random completions unequal rewards, so
    their advantages are not all 0 and both systems do the whole update."""
    return float(zlib.crc32(",".join(map(str, token_ids)).encode()) & 1)


def coin_reward(**settings):
    """rewardlab's side of the reward (`reward._target_=real_shape.coin_reward`): verifiable + `coin`."""
    from rewardlab.rewards.verifiable import VerifiableReward

    class VerifiablePlusCoin(VerifiableReward):
        def compute(self, batch) -> list[float]:
            return [v + coin(ids) for v, ids in zip(super().compute(batch), batch.completion_ids)]

    return VerifiablePlusCoin(**settings)


# ---- children: each runs in its own process --------------------------------------------------------------
def build_child(shape: str, result: Path) -> None:
    """Build (or find) the cached model of `shape`; write its directory to `result`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rewardlab.policy.tiny import build_tokenizer, cached_build, save_char_tokenizer

    dims = SHAPES[shape]
    key = hashlib.sha256(json.dumps({"v": BUILD_VERSION, "vocab": VOCAB, **dims}, sort_keys=True).encode())

    def build(tmp: Path) -> None:
        tokenizer = build_tokenizer()
        config = LlamaConfig(
            vocab_size=VOCAB, **dims, tie_word_embeddings=True, max_position_embeddings=32768, rope_theta=1e6,
            rms_norm_eps=1e-6, attention_bias=True,  # Qwen2 has q/k/v biases (Llama's flag adds o_proj's too)
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)  # stored in bf16 (half the disk); runs load their dtype
        model.save_pretrained(tmp)
        save_char_tokenizer(tokenizer, tmp)

    directory = cached_build(f"real-{shape}-{key.hexdigest()[:10]}", build)
    result.write_text(str(directory))


def trl_child(args: argparse.Namespace, model_dir: str, seed: int, result: Path) -> None:
    """TRL's GRPOTrainer on the run's work; writes per-step times, completion lengths and the CUDA peak."""
    import time

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rewardlab.answers import check
    from rewardlab.data.arith import ArithTask
    from rewardlab.data.base import PromptSampler
    from rewardlab.policy import load_tokenizer

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    task = ArithTask()  # rewardlab's dataset=arith; its sampler draws the same prompts in the same order
    prompts = PromptSampler(task.train_examples(), seed=seed).sample(args.iterations * args.prompts)
    data = Dataset.from_dict({"prompt": [e.prompt for e in prompts], "answer": [e.answer for e in prompts]})
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16 if cuda else torch.float32)
    times: dict[str, list[float]] = {"step": [], "generate": []}
    logged: list[dict] = []  # TRL's per-step logs that carry completion lengths

    generate = model.generate

    def timed_generate(*a, **k):
        sync()
        began = time.perf_counter()
        out = generate(*a, **k)
        sync()
        times["generate"].append(time.perf_counter() - began)
        return out

    model.generate = timed_generate  # what TRL's unwrap_model_for_generation hands back on one process

    class StepClock(TrainerCallback):
        def on_step_begin(self, *_, **__):
            sync()
            self.began = time.perf_counter()

        def on_step_end(self, *_, **__):
            sync()
            times["step"].append(time.perf_counter() - self.began)

        def on_log(self, *_, logs=None, **__):
            if logs and "completions/mean_length" in logs:
                logged.append(dict(logs))

    def correctness_plus_coin(completions, answer, completion_ids, **_):
        return [v + coin(ids) for v, ids in zip(check(list(completions), list(answer), task.answer_format),
                                                completion_ids)]

    batch = args.prompts * args.group
    accumulate = batch // args.micro_batch  # micro-batches per optimizer step; one generation per optimizer step
    with tempfile.TemporaryDirectory() as out:
        config = GRPOConfig(
            output_dir=out, per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=accumulate,
            steps_per_generation=accumulate, num_generations=args.group, max_completion_length=args.max_new_tokens,
            temperature=args.temperature, learning_rate=args.lr, lr_scheduler_type="constant", beta=0.0,
            max_grad_norm=1.0, loss_type="grpo", max_steps=args.iterations, use_cpu=not cuda, bf16=cuda,
            report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=seed,
            shuffle_dataset=False, gradient_checkpointing=True)  # GRPOConfig's default, stated: rewardlab matches it
        trainer = GRPOTrainer(model=model, reward_funcs=[correctness_plus_coin], args=config, train_dataset=data,
                              processing_class=load_tokenizer(model_dir), callbacks=[StepClock()])
        trainer.train()
    result.write_text(json.dumps({
        "step_s": times["step"], "generate_s": times["generate"],
        "completion_tokens": [round(row["completions/mean_length"] * batch) for row in logged],
        "truncated": [row.get("completions/clipped_ratio") for row in logged],
        "optimizer_steps": trainer.state.global_step,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None}))


# ---- the parent: launches, measures, reports ---------------------------------------------------------------
def measured(what: str, cmd: list[str], env: dict, log: Path) -> float:
    """Run `cmd` to completion in the log's folder (not the repository, whose rewardlab/ lacks cli/ and conf/);
    return that one process's peak resident memory in MB (wait4's ru_maxrss)."""
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise SystemExit(f"{what} exited with {proc.returncode}; its log ({log}) ends:\n{tail}")
    return usage.ru_maxrss / 1024  # Linux reports kilobytes


def child_env(**extra: str) -> dict:
    return {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            **extra}


def rewardlab_overrides(args: argparse.Namespace, model_dir: str, engine: str, seed: int, run_dir: Path) -> list[str]:
    dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return [f"hydra.run.dir={run_dir}", f"policy.path={model_dir}", f"policy.dtype={dtype}",
            f"run.device={args.device}", f"run.iterations={args.iterations}",
            f"run.prompts_per_iteration={args.prompts}", f"algo.samples_per_prompt={args.group}",
            f"algo.lr={args.lr}", "algo.beta=0", "algo.minibatch_size=0",  # one optimizer step per iteration
            f"algo.micro_batch_size={args.micro_batch}", f"generation.engine={engine}",
            f"generation.sampling.max_new_tokens={args.max_new_tokens}",
            f"generation.sampling.temperature={args.temperature}", f"run.eval_size={args.eval_size}",
            f"run.eval_every={10**6}", "run.checkpoint_every=0", "run.save_rollouts=false", f"run.seed={seed}",
            "logger=none", "reward=verifiable", "reward._target_=real_shape.coin_reward",
            "policy.gradient_checkpointing=true"]  # as TRL's GRPOConfig does by default (trl_child sets it too)


def run_rewardlab(args: argparse.Namespace, model_dir: str, engine: str, seed: int, tmp: Path) -> dict:
    run_dir, peak = tmp / "run", tmp / "cuda_peak"
    cmd = [sys.executable, "-c", CLI_WITH_PEAK, "train", *rewardlab_overrides(args, model_dir, engine, seed, run_dir)]
    path = os.pathsep.join(filter(None, [str(Path(SCRIPT).parent), os.environ.get("PYTHONPATH")]))
    rss = measured(f"rewardlab train ({engine})", cmd, child_env(BENCH_CUDA_PEAK=str(peak), PYTHONPATH=path),
                   tmp / "log.txt")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_s": [r["time/generate"] + r["time/score"] + r["time/update"] for r in rows],
            "generate_s": [r["time/generate"] for r in rows],
            "completion_tokens": [round(r["length/mean"] * r["rollouts"]) for r in rows],
            "truncated": [r["length/truncated"] for r in rows],
            "optimizer_steps": int(sum(r.get("update/steps", 0) for r in rows)),
            "cuda_peak_mb": int(peak.read_text()) / 2**20 if peak.exists() else None, "peak_rss_mb": rss}


def run_trl(args: argparse.Namespace, model_dir: str, seed: int, tmp: Path) -> dict:
    result = tmp / "result.json"
    cmd = [sys.executable, SCRIPT, *sys.argv[1:], "--child", "trl", "--model-dir", model_dir, "--seed", str(seed),
           "--result", str(result)]
    rss = measured("TRL", cmd, child_env(), tmp / "log.txt")
    return {**json.loads(result.read_text()), "peak_rss_mb": rss}


def summarize(raw: dict) -> dict:
    """Per-run figures from per-iteration lists; the first iteration (warm-up) is kept in the mean and
    left out of `s_per_iter_after_first`."""
    steps, gen = raw["step_s"], raw["generate_s"]
    return {"s_per_iter": statistics.mean(steps),
            "s_per_iter_after_first": statistics.mean(steps[1:]) if len(steps) > 1 else steps[0],
            "generate_tokens_per_s": sum(raw["completion_tokens"]) / sum(gen),
            "score_update_s_per_iter": (sum(steps) - sum(gen)) / len(steps),
            "completion_tokens": sum(raw["completion_tokens"]), "peak_rss_mb": raw["peak_rss_mb"],
            "cuda_peak_mb": raw["cuda_peak_mb"], "optimizer_steps": raw["optimizer_steps"],
            "iterations": len(steps)}


COLUMNS = [("s_per_iter", "s/iter", ".2f"), ("s_per_iter_after_first", "s/iter after 1st", ".2f"),
           ("generate_tokens_per_s", "gen tok/s", ".0f"), ("score_update_s_per_iter", "score+update s/iter", ".2f"),
           ("peak_rss_mb", "peak RSS MB", ".0f"), ("cuda_peak_mb", "CUDA peak MB", ".0f"),
           ("completion_tokens", "completion tokens", "d"), ("optimizer_steps", "opt. steps", "d")]


def print_table(rows: list[tuple[str, int, dict]]) -> None:
    header = ["system", "repeat"] + [title for _, title, _ in COLUMNS]
    cells = [[name, str(repeat)] + ["-" if r[key] is None else format(r[key], fmt) for key, _, fmt in COLUMNS]
             for name, repeat, r in rows]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, *cells]:
        print("  ".join(cell.rjust(width) for cell, width in zip(row, widths)))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="0.5b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--engines", default="native", help="rewardlab generation engines, comma separated: "
                        "native, generate")
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8,
                        help="completions per forward/backward on both sides (gradient accumulation)")
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--eval-size", type=int, default=1, help="rewardlab's evaluations (untimed) use this many")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--child", choices=["build", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.prompts * args.group) % args.micro_batch:
        parser.error(f"--micro-batch {args.micro_batch} must divide prompts x group = {args.prompts * args.group}")
    if bad := set(args.engines.split(",")) - {"native", "generate"}:
        parser.error(f"unknown engine(s) {sorted(bad)}: use native, generate")
    return args


def main() -> None:
    args = parse_args()
    if args.child == "build":
        return build_child(args.shape, args.result)
    if args.child == "trl":
        return trl_child(args, args.model_dir, args.seed, args.result)
    with tempfile.TemporaryDirectory(prefix="real-shape-") as tmp:
        built = Path(tmp) / "model_dir"
        measured("the model build", [sys.executable, SCRIPT, "--shape", args.shape, "--child", "build",
                 "--result", str(built)], child_env(), Path(tmp) / "build.log")
        model_dir = built.read_text()
        systems = [f"rewardlab:{engine}" for engine in args.engines.split(",")] + ["trl"]
        rows: list[tuple[str, int, dict]] = []
        for repeat in range(args.repeats):
            for name in systems if repeat % 2 == 0 else systems[::-1]:  # alternate who goes first
                work = Path(tempfile.mkdtemp(dir=tmp))
                raw = run_trl(args, model_dir, repeat, work) if name == "trl" else \
                    run_rewardlab(args, model_dir, name.split(":")[1], repeat, work)
                rows.append((name, repeat, summarize(raw)))
                print(f"repeat {repeat} {name}: {json.dumps({**rows[-1][2], 'raw': raw})}", file=sys.stderr,
                      flush=True)
    print_table(rows)
    full = args.iterations * args.prompts * args.group * args.max_new_tokens
    tokens = {name: sorted({r["completion_tokens"] for n, _, r in rows if n == name}) for name in systems}
    print(f"completion tokens per run: {tokens} (full length: {full})")
    summary = {"model_dir": model_dir, "vocab_size": VOCAB, **SHAPES[args.shape],
               "torch": version("torch"), "transformers": version("transformers"), "trl": version("trl"),
               **{k: v for k, v in vars(args).items() if k not in ("child", "model_dir", "seed", "result")},
               "completion_tokens_equal": len({t for ts in tokens.values() for t in ts}) == 1,
               "completion_tokens_full_length": full}
    for name in systems:
        runs = [r for n, _, r in rows if n == name]
        for key, _, _ in COLUMNS[:6]:
            values = [r[key] for r in runs if r[key] is not None]
            summary[f"{name}/{key}"] = statistics.median(values) if values else None
        summary[f"{name}/s_per_iter_range"] = [min(r["s_per_iter"] for r in runs), max(r["s_per_iter"] for r in runs)]
    for engine in args.engines.split(","):
        summary[f"trl_over_rewardlab:{engine}_s_per_iter"] = summary["trl/s_per_iter"] / \
            summary[f"rewardlab:{engine}/s_per_iter"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
