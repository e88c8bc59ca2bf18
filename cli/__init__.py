"""The Typer front end, installed as `rewardlab.cli`: parse, hand overrides to Hydra, call rewardlab."""
