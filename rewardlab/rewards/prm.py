"""Process reward models (`reward=prm`): one score per step from a model, aggregated to one number.

Formats (`format`), each loaded through `from_pretrained` from a local directory or a hub id, each fed the
raw question (never the policy's rendered prompt) in its authors' layout:
- `math_shepherd`: a causal LM; `question + " " + "step ки\n"...` encoded as its reference code does, with
  the tokenizer's own BOS (Mistral's `<s>`); the step's score is P(good) among the (good, bad) candidate
  tokens at the tag (Math-Shepherd: tag `ки`, candidates `+`/`-`).
- `qwen_prm`: a token classifier (Qwen2.5-Math-PRM); its own chat template over (its system prompt, the
  question, the steps each followed by `<extra_0>`), score = P(positive class) at the separators.
- `token_classification`: TRL's PRM data format (PRMTrainer.tokenize_row): BOS (when the tokenizer has
  one), the question, then each step followed by the step separator (`step_tag`, default "\n"); the
  score is read where TRL puts the label, the separator's last token (sigmoid of one logit, or P(class 1)).
- `next_token`: a causal LM read as `math_shepherd` is (P(good) among the (good, bad) candidate tokens), but
  over TRL's layout above: the text exactly as the policy writes it (question, each step and its separator),
  the score read at the separator's last token. `rewardlab train-rm` trains it by default and saves the
  format in the model's config (`prm_format`), so `auto` picks it: the backbone reads its own format, where
  its arithmetic is (the Math-Shepherd layout's inserted " :" tags cost F1 on arith: README "The reward-model lab").
- `auto`: the format saved in the model's config by `rewardlab train-rm`, else chosen from the architecture
  and tokenizer.
`scale=signed` maps each step probability p to 2p - 1 (PURE's positive-minus-negative score, the scale
its min-form temperature is set on); `algo=pure` selects it by default through `algo.prm_scale`.
With no model named, the tiny learned arith PRM is built once and cached (rewards/tiny_prm.py).
Written here because no maintained library scores PRMs across these formats (TRL only trains them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rewards.tiny_prm import TinyPRMBuild, ensure_tiny_prm
from rewardlab.rollout import Batch
from rewardlab.steps import StepSplit, aggregate_steps

FORMATS = ("math_shepherd", "qwen_prm", "token_classification", "next_token")
LM_FORMATS = ("math_shepherd", "next_token")  # scored by the LM head's (good, bad) next-token candidates
DEFAULT_TAGS = {"math_shepherd": "ки", "qwen_prm": "<extra_0>", "token_classification": "\n", "next_token": "\n"}
SCALES = ("prob", "signed")
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


AGGREGATES = ("min", "last", "prod", "mean")


@schema("reward", "prm")
@dataclass
class PRMConfig:
    _target_: str = "rewardlab.rewards.prm.PRMReward"
    name: str = "prm"
    model: Optional[str] = None  # local directory or hub id; none: the tiny learned arith PRM
    format: str = "auto"  # auto | math_shepherd | qwen_prm | token_classification | next_token
    aggregate: str = "min"  # min | last | prod | mean
    scale: str = "${oc.select:algo.prm_scale,prob}"  # prob (p) | signed (2p - 1, PURE); default: the algo's
    step_tag: Optional[str] = None  # none: the model config's step_separator, else ки / <extra_0> / \n by format
    good_token: str = "+"
    bad_token: str = "-"
    batch_size: int = 32
    device: str = "auto"
    dtype: str = "float32"
    trust_remote_code: bool = False
    split: StepSplit = field(default_factory=StepSplit)  # how completions are cut into steps
    tiny: TinyPRMBuild = field(default_factory=TinyPRMBuild)


def _config(source: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"reward.model={source} cannot be loaded ({str(exc).splitlines()[0]}); "
                        f"give a local model directory or a hub id") from exc


def token_classification_ids(tokenizer, question: str, steps: list[str], separator: str
                             ) -> tuple[list[int], list[int]]:
    """TRL's PRM layout (PRMTrainer.tokenize_row): BOS when the tokenizer has one, the question, each step
    followed by `separator`; returns the ids and each step's labelled position (its separator's last token).
    `rewardlab train-rm` trains at exactly these positions and scoring reads them."""
    tail = tokenizer.encode(separator, add_special_tokens=False)
    ids = ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []) + tokenizer.encode(
        question, add_special_tokens=False)
    positions = []
    for step in steps:
        ids += tokenizer.encode(step, add_special_tokens=False) + tail
        positions.append(len(ids) - 1)
    return ids, positions


def math_shepherd_ids(tokenizer, question: str, steps: list[str], tag: str) -> tuple[list[int], list[int]]:
    """Math-Shepherd's layout, as its reference code encodes it (`tokenizer.encode(f"{question} {output}")`,
    each step followed by " <tag>\n"); returns the ids and each step's scored position (its tag's last token,
    the last len(steps) occurrences). `rewardlab train-rm rm.format=math_shepherd` trains at these positions."""
    ids = tokenizer.encode(question + " " + "".join(f"{step} {tag}\n" for step in steps))
    tag_id = tokenizer.encode(tag, add_special_tokens=False)[-1]
    positions = [i for i, t in enumerate(ids) if t == tag_id][-len(steps):] if steps else []
    return ids, positions


def detect_format(architectures: list[str], tokenizer, saved: str | None = None) -> str:
    """The format `rewardlab train-rm` saved in the model's config (`saved`), else the one implied by the
    architecture (and, for token classifiers, a separator token)."""
    if saved in FORMATS:
        return saved
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
                 aggregate: str = "min", scale: str = "prob", step_tag: str | None = None, good_token: str = "+",
                 bad_token: str = "-", batch_size: int = 32, device: str = "auto", dtype: str = "float32",
                 trust_remote_code: bool = False, split: StepSplit | dict | None = None,
                 tiny: TinyPRMBuild | dict | None = None) -> None:
        from transformers import AutoTokenizer

        from rewardlab.policy import _DTYPES, resolve_device

        super().__init__(name)
        if format not in ("auto", *FORMATS):
            raise UserError(f"reward.format={format!r} is not a known PRM format; use auto or one of "
                            f"{', '.join(FORMATS)}")
        if aggregate not in AGGREGATES:
            raise UserError(f"reward.aggregate={aggregate!r} is not one of {', '.join(AGGREGATES)}")
        if scale not in SCALES:
            raise UserError(f"reward.scale={scale!r} is not one of {', '.join(SCALES)}")
        self.scale = scale
        if dtype not in _DTYPES:
            raise UserError(f"reward.dtype={dtype!r} is not one of {sorted(_DTYPES)}")
        self.aggregate, self.batch_size = aggregate, batch_size
        self.split = split if isinstance(split, StepSplit) else StepSplit(**(split or {}))
        if model is None:
            build = tiny if isinstance(tiny, TinyPRMBuild) else TinyPRMBuild(**(tiny or {}))
            model = str(ensure_tiny_prm(build))
        self.source = model
        config = _config(model, trust_remote_code)
        architectures = list(getattr(config, "architectures", None) or [])
        self.tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
        self.format = (detect_format(architectures, self.tokenizer, getattr(config, "prm_format", None))
                       if format == "auto" else format)
        self.device = resolve_device(device)
        self.model = self._load(model, architectures, _DTYPES[dtype], trust_remote_code).to(self.device).eval()
        saved_tag = getattr(self.model.config, "step_separator", None)  # written by `rewardlab train-rm`
        self.tag = step_tag if step_tag is not None else saved_tag or DEFAULT_TAGS[self.format]
        self.tag_id = self._token_id(self.tag, "step_tag")
        self.head = None
        if self.format in LM_FORMATS:
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

        if self.format in LM_FORMATS:
            loader = AutoModelForCausalLM
        elif self.format == "qwen_prm" and not any(a.endswith("ForTokenClassification") for a in architectures):
            loader = AutoModel  # Qwen2.5-Math-PRM ships its own head class (trust_remote_code)
        else:
            loader = AutoModelForTokenClassification
        return loader.from_pretrained(source, dtype=dtype, trust_remote_code=trust_remote_code)

    # ---- encoding: token ids and the positions where each step is scored ----------------------
    def _encode(self, question: str, steps: list[str]) -> tuple[list[int], list[int]]:
        """The PRM's input for a raw question and its steps, and the token index where each step is scored."""
        tok = self.tokenizer
        if self.format in ("token_classification", "next_token"):
            return token_classification_ids(tok, question, steps, self.tag)
        if self.format == "math_shepherd":
            return math_shepherd_ids(tok, question, steps, self.tag)
        if tok.chat_template:
            messages = [{"role": "system", "content": QWEN_SYSTEM}, {"role": "user", "content": question},
                        {"role": "assistant", "content": "".join(s + self.tag for s in steps)}]
            text, specials = tok.apply_chat_template(messages, tokenize=False), False
        else:
            text, specials = question + "".join(s + self.tag for s in steps), True
        ids = tok.encode(text, add_special_tokens=specials)
        positions = [i for i, t in enumerate(ids) if t == self.tag_id][-len(steps):] if steps else []
        return ids, positions

    def _step_probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """(positions, classes) logits -> (positions,) step scores in [0, 1]; for math_shepherd the classes
        are the (good, bad) candidate tokens."""
        logits = logits.float()
        if self.format in LM_FORMATS:
            return logits.softmax(-1)[:, 0]
        if logits.shape[-1] == 1:
            return logits[:, 0].sigmoid()
        return logits.softmax(-1)[:, 1]

    @torch.inference_mode()
    def step_scores(self, questions: list[str], steps: list[list[str]]) -> list[list[float]]:
        """Each row's step probabilities (raw questions in). Rows are batched by length (`batch_size` right-padded sequences of similar
        length, so little compute goes to padding) and the scores returned in the input order."""
        encoded = [self._encode(q, s) for q, s in zip(questions, steps)]
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
        """(positions, classes) logits at (row `which`, token `where`); for an LM format only the (good, bad)
        candidates' columns. A causal LM's vocabulary head is applied only there and only to
        those two rows, not to every token x the whole vocabulary (for a 150k-vocabulary PRM that is most of
        a full forward's memory)."""
        if self.format in LM_FORMATS and self.head is not None:
            hidden = self.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
            picked = hidden[which.to(hidden.device), where.to(hidden.device)]
            bias = None if self.head.bias is None else self.head.bias[self.candidates]
            return torch.nn.functional.linear(picked, self.head.weight[self.candidates], bias)
        result = self.model(input_ids=ids, attention_mask=mask)
        logits = result.logits if hasattr(result, "logits") else result[0]
        logits = logits[which.to(logits.device), where.to(logits.device)]
        return logits[:, self.candidates] if self.format in LM_FORMATS else logits

    def compute(self, batch: Batch) -> list[float]:
        steps = [[s for s, _ in self.split.split(text)] for text in batch.completion]
        probabilities = self.step_scores([batch.raw_question(i) for i in range(len(batch))], steps)
        scores = probabilities if self.scale == "prob" else [[2.0 * p - 1.0 for p in row] for row in probabilities]
        batch.steps = steps
        batch.step_rewards = scores
        batch.extra[f"{self.name}/step_scores"] = [list(p) for p in probabilities]  # the model's probabilities
        return [aggregate_steps(s, self.aggregate) for s in scores]
