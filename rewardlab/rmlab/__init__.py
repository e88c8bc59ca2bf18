"""The reward-model lab: label steps, train and benchmark reward models."""
