"""The vLLM backend: an engine colocated with training on the same GPU, through TRL's `VLLMGeneration`.

TRL's class already does what colocation needs: sleep mode (the engine frees its GPU memory while
the update runs and wakes for generation), pushing the trained weights into the engine (merging
LoRA adapters first; FSDP and DeepSpeed aware), and log-probs after temperature scaling
(`processed_logprobs`, the same quantity the HF backend records). This wrapper turns its output
into the same `Batch` as the HF backend. It needs the `vllm` extra and a CUDA device.
"""

from __future__ import annotations

from dataclasses import field
from typing import Optional, Sequence

from rewardlab.config import schema
from rewardlab.data.base import Example
from rewardlab.errors import UserError
from rewardlab.generation.hf import Sampling, decode_completions
from rewardlab.policy import stop_token_ids
from rewardlab.rollout import Batch


@schema("generation", "vllm")
class VLLMConfig:
    _target_: str = "rewardlab.generation.vllm.VLLMGenerator"
    gpu_memory_utilization: float = 0.3  # share of the GPU for vLLM's weights and KV cache; training uses the rest
    sleep: bool = True  # free vLLM's GPU memory while the update runs, wake it to generate
    max_model_length: Optional[int] = None  # prompt + completion tokens; null: the model's context length
    sampling: Sampling = field(default_factory=Sampling)


class VLLMGenerator:
    """`generate` with a colocated vLLM engine; `sync(policy)` pushes the updated weights into it."""

    def __init__(self, policy, gpu_memory_utilization: float = 0.3, sleep: bool = True,
                 max_model_length: int | None = None, sampling: Sampling | dict | None = None) -> None:
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("generation=vllm needs vLLM: pip install 'rewardlab[vllm]' on a CUDA machine; "
                            "or use generation=hf") from None
        if policy.device.type != "cuda":
            raise UserError(f"generation=vllm needs the policy on a CUDA device (it is on {policy.device}); "
                            f"set run.device=cuda, or use generation=hf")
        from accelerate import Accelerator
        from trl.generation.vllm_generation import VLLMGeneration

        self.policy = policy
        self.sampling = sampling if isinstance(sampling, Sampling) else Sampling(**(sampling or {}))
        self.engine = VLLMGeneration(
            model=policy.model, accelerator=Accelerator(), processing_class=policy.tokenizer, mode="colocate",
            gpu_memory_utilization=gpu_memory_utilization, max_model_length=max_model_length,
            enable_sleep_mode=sleep, max_completion_length=self.sampling.max_new_tokens,
            generation_kwargs={"stop_token_ids": list(stop_token_ids(policy.model, policy.tokenizer))})  # every EOS

    def sync(self, policy) -> None:
        """Load the policy's current weights (adapters merged) into the engine."""
        self.policy = policy
        self.engine.model = policy.model
        self.engine.sync_weights()

    def generate(self, prompts: Sequence[Example], n: int = 1, sampling: Sampling | None = None,
                 greedy: bool = False) -> Batch:
        """`n` completions per prompt, rows grouped by prompt; greedy decoding when `greedy`."""
        sampling = sampling or self.sampling
        tokenizer = self.policy.tokenizer
        rows = [ex for ex in prompts for _ in range(n)]
        encoded = [tokenizer(ex.prompt, add_special_tokens=False)["input_ids"] for ex in prompts]
        row_ids = [ids for ids in encoded for _ in range(n)]
        engine = self.engine  # its sampling settings are read on every call
        engine.temperature = 0.0 if greedy else sampling.temperature
        engine.top_p, engine.top_k = (1.0, 0) if greedy else (sampling.top_p, sampling.top_k)
        engine.max_completion_length = sampling.max_new_tokens
        engine.logprobs = None if greedy else 0
        _, completion_ids, logprobs, _ = engine.generate(prompts=row_ids, images=None, num_generations=n)
        completion_ids = [list(ids) for ids in completion_ids]
        stops = set(stop_token_ids(self.policy.model, self.policy.tokenizer))
        finish = ["stop" if ids and ids[-1] in stops else "length" for ids in completion_ids]
        return Batch(
            prompt_id=[ex.id for ex in rows], prompt=[ex.prompt for ex in rows],
            completion=decode_completions(tokenizer, completion_ids, finish),
            prompt_ids=row_ids, completion_ids=completion_ids, finish_reason=finish,
            reference=[ex.answer for ex in rows], solution=[ex.solution for ex in rows],
            question=[ex.question for ex in rows], messages=[ex.messages for ex in rows],
            sample_logprobs=None if greedy else [[float(lp[0]) for lp in row] for row in logprobs],
        )
