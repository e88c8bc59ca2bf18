"""Reward sources, one module per family; each writes its column(s) into the Batch."""

from rewardlab.rewards.base import Reward

__all__ = ["Reward"]
