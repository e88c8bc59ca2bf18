"""Process reward models (`reward=prm`): one score per step from a model, aggregated to one number.

Formats (`format`), each loaded through `from_pretrained` from a local directory or a hub id:
- `math_shepherd`: a causal LM; a step tag token follows each step and the step's score is P(good)
  among the (good, bad) candidate tokens at the tag (Math-Shepherd: tag `ки`, candidates `+`/`-`).
- `qwen_prm`: a token classifier (Qwen2.5-Math-PRM); a separator token (`<extra_0>`) follows each
  step, score = P(positive class) at the separator; the chat template is applied when there is one.
- `token_classification`: a generic step head, score at each step's last token (sigmoid of one
  logit, or P(class 1) of two).
- `auto`: chosen from the model's architecture and tokenizer.
With no model named, the tiny learned arith PRM is built once and cached (rewards/tiny_prm.py).
Written here because no maintained library scores PRMs across these formats (TRL only trains them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rewards.tiny_prm import TinyPRMBuild, ensure_tiny_prm
from rewardlab.rollout import Batch
from rewardlab.steps import StepSplit

FORMATS = ("math_shepherd", "qwen_prm", "token_classification")
DEFAULT_TAGS = {"math_shepherd": "ки", "qwen_prm": "<extra_0>"}
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def aggregate_steps(scores: list[float], how: str) -> float:
    """One number from step scores: `min`, `last`, `prod` or `mean` (0.0 when there are no steps)."""
    if how not in ("min", "last", "prod", "mean"):
        raise UserError(f"reward.aggregate={how!r} is not one of min, last, prod, mean")
    if not scores:
        return 0.0
    if how == "min":
        return min(scores)
    if how == "last":
        return scores[-1]
    if how == "prod":
        return math.prod(scores)
    return sum(scores) / len(scores)


@schema("reward", "prm")
@dataclass
class PRMConfig:
    _target_: str = "rewardlab.rewards.prm.PRMReward"
    name: str = "prm"
    model: Optional[str] = None  # local directory or hub id; none: the tiny learned arith PRM
    format: str = "auto"  # auto | math_shepherd | qwen_prm | token_classification
    aggregate: str = "min"  # min | last | prod | mean
    step_tag: Optional[str] = None  # math_shepherd: ки, qwen_prm: <extra_0> unless set
    good_token: str = "+"
    bad_token: str = "-"
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False
    split: StepSplit = field(default_factory=StepSplit)  # how completions are cut into steps
    tiny: TinyPRMBuild = field(default_factory=TinyPRMBuild)


def _architectures(source: str, trust_remote_code: bool) -> list[str]:
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"reward.model={source} cannot be loaded ({str(exc).splitlines()[0]}); "
                        f"give a local model directory or a hub id") from exc
    return list(getattr(config, "architectures", None) or [])


def detect_format(architectures: list[str], tokenizer) -> str:
    """The PRM format implied by the architecture (and, for token classifiers, a separator token)."""
    if any(a.endswith("ForCausalLM") for a in architectures):
        return "math_shepherd"
    if any("ProcessRewardModel" in a for a in architectures):
        return "qwen_prm"
    if any(a.endswith("ForTokenClassification") for a in architectures):
        has_separator = DEFAULT_TAGS["qwen_prm"] in tokenizer.get_vocab()
        return "qwen_prm" if has_separator else "token_classification"
    raise UserError(f"cannot tell the PRM format of a model with architectures {architectures}; "
                    f"set reward.format to one of {', '.join(FORMATS)}")


class PRMReward(Reward):
    """Step scores from a process reward model into `batch.step_rewards`; the aggregate into the reward."""

    process = True

    def __init__(self, name: str = "prm", model: str | None = None, format: str = "auto",
                 aggregate: str = "min", step_tag: str | None = None, good_token: str = "+",
                 bad_token: str = "-", batch_size: int = 32, device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, split: StepSplit | dict | None = None,
                 tiny: TinyPRMBuild | dict | None = None) -> None:
        from transformers import AutoTokenizer

        from rewardlab.policy import _DTYPES, resolve_device

        super().__init__(name)
        if format not in ("auto", *FORMATS):
            raise UserError(f"reward.format={format!r} is not a known PRM format; use auto or one of "
                            f"{', '.join(FORMATS)}")
        aggregate_steps([], aggregate)
        if dtype not in _DTYPES:
            raise UserError(f"reward.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        self.aggregate, self.batch_size = aggregate, batch_size
        self.split = split if isinstance(split, StepSplit) else StepSplit(**(split or {}))
        if model is None:
            build = tiny if isinstance(tiny, TinyPRMBuild) else TinyPRMBuild(**(tiny or {}))
            model = str(ensure_tiny_prm(build))
        self.source = model
        architectures = _architectures(model, trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.format = detect_format(architectures, self.tokenizer) if format == "auto" else format
        self.device = resolve_device(device)
        self.model = self._load(model, architectures, _DTYPES[dtype], trust_remote_code).to(self.device).eval()
        self.tag_id = None
        if self.format in DEFAULT_TAGS:
            tag = DEFAULT_TAGS[self.format] if step_tag is None else step_tag
            self.tag_id = self._token_id(tag, "step_tag")
            self.tag = tag
        self.head = None
        if self.format == "math_shepherd":
            self.candidates = [self._token_id(good_token, "good_token"), self._token_id(bad_token, "bad_token")]
            self.head = self._plain_head()

    def _plain_head(self):
        """The causal LM's output layer when its logits are a plain linear map of the base model's last hidden
        state (Llama, Mistral, Qwen, GPT-2...), so scoring can apply it to two rows; None otherwise (a final
        soft-cap or scaling), and then the full forward is used."""
        head = self.model.get_output_embeddings()
        config = self.model.config
        plain = (isinstance(head, torch.nn.Linear) and hasattr(self.model, "base_model")
                 and self.model.base_model is not self.model
                 and not getattr(config, "final_logit_softcapping", None)
                 and getattr(config, "logit_scale", None) in (None, 1.0))
        return head if plain else None

    def _token_id(self, text: str, what: str) -> int:
        """The id of `text`'s last token, as Math-Shepherd's reference code picks its tag and candidates."""
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        if not ids:
            raise UserError(f"reward.{what}={text!r} encodes to no token with {self.source}'s tokenizer; "
                            f"set reward.{what} to the model's own token")
        return ids[-1]

    def _load(self, source: str, architectures: list[str], dtype: torch.dtype, trust_remote_code: bool):
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForTokenClassification

        if self.format == "math_shepherd":
            loader = AutoModelForCausalLM
        elif self.format == "qwen_prm" and not any(a.endswith("ForTokenClassification") for a in architectures):
            loader = AutoModel  # Qwen2.5-Math-PRM ships its own head class (trust_remote_code)
        else:
            loader = AutoModelForTokenClassification
        return loader.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)

    # ---- encoding: token ids and the positions where each step is scored ----------------------
    def _encode(self, prompt: str, steps: list[str]) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if self.format == "token_classification":
            ids, positions = tok.encode(prompt, add_special_tokens=False), []
            for k, step in enumerate(steps):
                ids += tok.encode(("\n" if k else "") + step, add_special_tokens=False)
                positions.append(len(ids) - 1)
            return ids, positions
        if self.format == "math_shepherd":
            text = prompt + " " + "".join(f"{step} {self.tag}\n" for step in steps)
        elif tok.chat_template:
            messages = [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": prompt},
                        {"role": "assistant", "content": "".join(s + self.tag for s in steps)}]
            text = tok.apply_chat_template(messages, tokenize=False)
        else:
            text = prompt + "".join(s + self.tag for s in steps)
        ids = tok.encode(text, add_special_tokens=False)
        positions = [i for i, t in enumerate(ids) if t == self.tag_id][-len(steps):] if steps else []
        return ids, positions

    def _step_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(positions, classes) logits -> (positions,) step scores in [0, 1]; for math_shepherd the classes
        are the (good, bad) candidate tokens."""
        logits = logits.float()
        if self.format == "math_shepherd":
            return logits.softmax(-1)[:, 0]
        if logits.shape[-1] == 1:
            return logits[:, 0].sigmoid()
        return logits.softmax(-1)[:, 1]

    @torch.inference_mode()
    def step_scores(self, prompts: list[str], steps: list[list[str]]) -> list[list[float]]:
        """Each row's step scores. Rows are batched by length (`batch_size` right-padded sequences of similar
        length, so little compute goes to padding) and the scores returned in the input order."""
        encoded = [self._encode(p, s) for p, s in zip(prompts, steps)]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        out: list[list[float]] = [[] for _ in encoded]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]))
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            chunk = [encoded[i] for i in rows]
            width = max(1, max(len(ids) for ids, _ in chunk))
            ids = torch.tensor([i + [pad] * (width - len(i)) for i, _ in chunk], device=self.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i, _ in chunk], device=self.device)
            which = torch.tensor([r for r, (_, positions) in enumerate(chunk) for _ in positions], dtype=torch.long)
            where = torch.tensor([p for _, positions in chunk for p in positions], dtype=torch.long)
            probs = self._step_probabilities(self._logits_at(ids, mask, which, where)).tolist()
            taken = 0
            for row, (_, positions) in zip(rows, chunk):
                out[row] = [float(p) for p in probs[taken : taken + len(positions)]]
                taken += len(positions)
        return out

    def _logits_at(self, ids: torch.Tensor, mask: torch.Tensor, which: torch.Tensor, where: torch.Tensor
                   ) -> torch.Tensor:
        """(positions, classes) logits at (row `which`, token `where`); for math_shepherd only the (good, bad)
        candidates' columns. A math_shepherd causal LM's vocabulary head is applied only there and only to
        those two rows, not to every token x the whole vocabulary (for a 150k-vocabulary PRM that is most of
        a full forward's memory)."""
        if self.format == "math_shepherd" and self.head is not None:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            picked = hidden[which.to(hidden.device), where.to(hidden.device)]
            bias = None if self.head.bias is None else self.head.bias[self.candidates]
            return torch.nn.functional.linear(picked, self.head.weight[self.candidates], bias)
        result = self.model(input_ids=ids, attention_mask=mask)
        logits = result.logits if hasattr(result, "logits") else result[0]
        logits = logits[which.to(logits.device), where.to(logits.device)]
        return logits[:, self.candidates] if self.format == "math_shepherd" else logits

    def compute(self, batch: Batch) -> list[float]:
        steps = [[s for s, _ in self.split.split(text)] for text in batch.completion]
        scores = self.step_scores(batch.prompt, steps)
        batch.steps = steps
        batch.step_rewards = scores
        batch.extra[f"{self.name}/step_scores"] = [list(s) for s in scores]
        return [aggregate_steps(s, self.aggregate) for s in scores]
