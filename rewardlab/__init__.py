"""rewardlab: generate, score, filter and fine-tune LLM policies in iterations."""

import importlib.util
import os

__version__ = "0.1.0"


def _deepspeed_on_cpu() -> None:
    """transformers imports DeepSpeed whenever it is installed (the ZeRO configs need it), and on a machine
    with no accelerator DeepSpeed then warns on stdout, in every process, that it fell back to the CPU.
    Naming the CPU (what it would pick anyway) keeps that line out; any accelerator it knows leaves it alone."""
    if "DS_ACCELERATOR" in os.environ or importlib.util.find_spec("deepspeed") is None:
        return
    if any(importlib.util.find_spec(m) is not None for m in
           ("intel_extension_for_pytorch", "torch_npu", "habana_frameworks", "torch_mlu", "torch_sdaa")):
        return
    import torch

    xpu = getattr(torch, "xpu", None)
    if torch.cuda.is_available() or torch.backends.mps.is_available() or (xpu is not None and xpu.is_available()):
        return
    os.environ["DS_ACCELERATOR"] = "cpu"


_deepspeed_on_cpu()
