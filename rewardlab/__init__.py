"""rewardlab: generate, score, filter and fine-tune LLM policies in iterations."""

__version__ = "0.1.0"
