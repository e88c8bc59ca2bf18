"""rewardlab: generate, score, filter and fine-tune LLM policies in iterations.

Importing the package imports no torch: the CLI answers `--help`, `configs` and argument errors at once, and
each command imports torch, transformers and TRL only where it uses them."""

import importlib.abc
import importlib.util
import os
import sys

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


class _BeforeDeepSpeed(importlib.abc.MetaPathFinder):
    """Runs `_deepspeed_on_cpu` when something first looks for DeepSpeed, rather than at import: deciding
    needs torch (is there a GPU?), and importing torch here would cost every command, `--help` too, ~1 s."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 (importlib's signature)
        if name == "deepspeed":
            sys.meta_path.remove(self)
            _deepspeed_on_cpu()
        return None  # the ordinary finders import it


if "deepspeed" not in sys.modules:
    sys.meta_path.insert(0, _BeforeDeepSpeed())
