"""The reward-model lab: step labels, reward-model training, benchmarks and search with reward models."""
