"""cProfile of a short `rewardlab train` (no evaluation), printing the functions with the most own time
and cumulative time: where the loop's time goes. Extra arguments are Hydra overrides.

    python bench/profile_run.py --iterations 20 [--out prof.pstats] [OVERRIDES...]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--out", default=None, help="also save the raw pstats here (for snakeviz etc.)")
    parser.add_argument("--top", type=int, default=25)
    args, overrides = parser.parse_known_args()

    from hydra import compose, initialize_config_module

    from rewardlab.config import register_schemas
    from rewardlab.run import train

    register_schemas()
    with initialize_config_module(config_module="rewardlab.conf", version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"run.iterations={args.iterations}", f"run.eval_every={10**6}", "run.eval_size=1", "logger=none",
            "run.save_rollouts=false", *overrides])
    profiler = cProfile.Profile()
    with tempfile.TemporaryDirectory() as out:
        profiler.enable()
        train(cfg, Path(out))
        profiler.disable()
    if args.out:
        profiler.dump_stats(args.out)
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)


if __name__ == "__main__":
    main()
