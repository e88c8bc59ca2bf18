"""Generator backends with one interface: `generate(prompts, n, ...) -> Batch` and `sync(policy)`."""

from rewardlab.generation.hf import HFGenerator, Sampling

__all__ = ["HFGenerator", "Sampling"]
