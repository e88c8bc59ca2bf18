"""The tiny learned arith PRM that `reward=prm` uses when no model is named.

A Qwen2.5-Math-PRM-format model (token classifier, `<extra_0>` after each step) whose backbone is the
tiny policy, trained on exact step labels from the arith step checker over the tiny policy's own
samples plus perturbed reference solutions. Being learned, it is imperfect on purpose: its
disagreements with the exact checker are what reward-hacking experiments study. Built once, cached
by its settings like the tiny policy (same lock and atomic rename).
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rewardlab.data.arith import ArithTask
from rewardlab.policy.tiny import TinyBuild, cached_build, ensure_tiny, save_char_tokenizer

SEPARATOR = "<extra_0>"
BUILD_VERSION = 1  # bump when the recipe changes
# torch threads of the tiny PRM's build: the documented tiny PRM (README, docs/experiments.md) was built on one thread,
# inside runs with run.threads=1; a 2-thread build of the same recipe gives other weights (checked 2026-12-03)
PRM_BUILD_THREADS = 1
_LINE = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
_FINAL = re.compile(r"^\s*####\s*(-?\d+)\s*$")


def check_arith_steps(steps: list[str]) -> list[float]:
    """Exact per-step labels: `a op b = c` is 1 when c is right, `#### x` when x is the last result."""
    labels: list[float] = []
    last: int | None = None
    for step in steps:
        line, final = _LINE.match(step), _FINAL.match(step)
        if line:
            a, op, b, c = int(line[1]), line[2], int(line[3]), int(line[4])
            value = a + b if op == "+" else a - b if op == "-" else a * b
            labels.append(float(value == c))
            last = c
        elif final:
            labels.append(float(last is not None and int(final[1]) == last))
        else:
            labels.append(0.0)
    return labels


@dataclass
class TinyPRMBuild:
    """What determines the tiny PRM's weights; its hash is the cache key."""

    prompts: int = 128  # arith train prompts the tiny policy samples for
    samples_per_prompt: int = 2
    perturbed: int = 256  # reference solutions with one step's result changed
    train_steps: int = 200
    batch_size: int = 32
    lr: float = 2e-3
    temperature: float = 1.0
    seed: int = 0
    policy: TinyBuild = field(default_factory=TinyBuild)

    def __post_init__(self) -> None:
        if not isinstance(self.policy, TinyBuild):  # a mapping, as Hydra passes nested settings
            self.policy = TinyBuild(**self.policy)

    def key(self) -> str:
        fields = asdict(self)
        if not self.policy.judge:  # as TinyBuild.key: the judge settings do not touch a solving-only policy
            fields["policy"] = {k: v for k, v in fields["policy"].items() if not k.startswith("judge")}
        blob = json.dumps({"v": BUILD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def perturb(solution: str, rng: random.Random) -> list[str]:
    """The solution's steps with one step's result (or the final answer) off by 1..9."""
    steps = solution.split("\n")
    k = rng.randrange(len(steps))
    found = _LINE.match(steps[k]) or _FINAL.match(steps[k])
    wrong = int(found[found.lastindex]) + rng.choice([-1, 1]) * rng.randint(1, 9)
    steps[k] = steps[k][: found.start(found.lastindex)] + str(wrong)
    return steps


def training_rows(spec: TinyPRMBuild, policy_dir: Path) -> list[tuple[str, list[str], list[float]]]:
    """(prompt, steps, exact labels) from the tiny policy's samples and perturbed solutions."""
    from rewardlab.generation.hf import HFGenerator, Sampling
    from rewardlab.policy import load_policy
    from rewardlab.steps import split_steps

    rng = random.Random(spec.seed)
    examples = rng.sample(ArithTask(seed=spec.seed + 7).train_examples(), spec.prompts + spec.perturbed)
    sampled, perturbed = examples[: spec.prompts], examples[spec.prompts :]
    policy = load_policy(path=str(policy_dir), device="cpu")
    generator = HFGenerator(policy, sampling=Sampling(temperature=spec.temperature, max_new_tokens=40))
    batch = generator.generate(sampled, n=spec.samples_per_prompt)
    rows = [(p, split_steps(c), check_arith_steps(split_steps(c))) for p, c in zip(batch.prompt, batch.completion)]
    for ex in perturbed:
        steps = perturb(ex.solution, rng)
        rows.append((ex.prompt, steps, check_arith_steps(steps)))
    return [r for r in rows if r[1]]


def train_prm(model, tokenizer, rows: list, spec: TinyPRMBuild, log=print) -> None:
    """Step-level binary classification at each separator (cross-entropy, other tokens ignored)."""
    separator = tokenizer.convert_tokens_to_ids(SEPARATOR)
    encoded = []
    for prompt, steps, labels in rows:
        ids = tokenizer.encode(prompt + "".join(s + SEPARATOR for s in steps), add_special_tokens=False)
        marks = iter(labels)
        encoded.append((ids, [int(next(marks)) if t == separator else -100 for t in ids]))
    rng = random.Random(spec.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr)
    model.train()
    began = time.time()
    for step in range(spec.train_steps):
        chunk = rng.sample(encoded, min(spec.batch_size, len(encoded)))
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.tensor([i + [tokenizer.pad_token_id] * (width - len(i)) for i, _ in chunk])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in chunk])
        mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk])
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            log(f"tiny PRM: step {step + 1}/{spec.train_steps} loss {loss.item():.3f} ({time.time() - began:.0f}s)")
    model.eval()


def ensure_tiny_prm(spec: TinyPRMBuild, log=print) -> Path:
    """Return the cached tiny PRM directory, building it first if needed."""

    def build(tmp: Path) -> None:
        from transformers import AutoModelForTokenClassification, AutoTokenizer

        policy_dir = ensure_tiny(spec.policy, log=log)
        with torch.random.fork_rng(devices=[]):  # the caller's seeded RNG stream is left as it was
            torch.manual_seed(spec.seed)
            rows = training_rows(spec, policy_dir)
            tokenizer = AutoTokenizer.from_pretrained(policy_dir)
            tokenizer.add_special_tokens({"additional_special_tokens": [SEPARATOR]})
            model = AutoModelForTokenClassification.from_pretrained(policy_dir, num_labels=2)
            model.resize_token_embeddings(len(tokenizer))
            model.config.pad_token_id = tokenizer.pad_token_id
            train_prm(model, tokenizer, rows, spec, log=log)
        model.save_pretrained(tmp)
        save_char_tokenizer(tokenizer, tmp)
        (tmp / "rewardlab_build.json").write_text(json.dumps(asdict(spec), indent=2))

    return cached_build(f"tiny-prm-{spec.key()}", build, log=log, threads=PRM_BUILD_THREADS)
