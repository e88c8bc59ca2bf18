"""DAPO's filters: the overlong penalty's values, dynamic sampling's refill loop and its cap, filter order."""

import pytest

from rewardlab.errors import UserError
from rewardlab.filters import DropNonFinite, DynamicSampling, OverlongPenalty
from rewardlab.rollout import Batch
from rewardlab.sampling import collect


def group_batch(pid: str, rewards, lengths=None, gold=None) -> Batch:
    """One prompt's group; its gold column is `gold`, by default the rewards themselves."""
    n = len(rewards)
    lengths = lengths or [3] * n
    return Batch(prompt_id=[pid] * n, prompt=[pid] * n, completion=["x" * k for k in lengths], prompt_ids=[[1]] * n,
                 completion_ids=[[5] * k for k in lengths], finish_reason=["stop"] * n, reference=[None] * n,
                 solution=[None] * n, reward=list(rewards), rewards={"r": list(rewards)},
                 gold=list(rewards if gold is None else gold))


def test_overlong_penalty_values():
    f = OverlongPenalty(max_length=10, cache=4)
    assert [f.penalty(k) for k in (3, 6, 7, 8, 10, 11)] == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0]
    batch = f(group_batch("a", [1.0, 1.0], lengths=[6, 8]))
    assert batch.reward == [1.0, 0.5] and batch.rewards["overlong"] == [0.0, -0.5]
    assert f.last_metrics["filter/overlong/penalized"] == 0.5
    with pytest.raises(UserError):
        OverlongPenalty(max_length=4, cache=8)


def test_dynamic_sampling_refills_until_the_batch_is_full():
    fresh = iter([Batch.concat([group_batch("c", [1, 1]), group_batch("d", [0, 1])]),
                  Batch.concat([group_batch("e", [0, 1]), group_batch("f", [2, 2])])])
    asked = []

    def more(n):
        asked.append(n)
        return next(fresh)

    first = Batch.concat([group_batch("a", [0, 0]), group_batch("b", [1, 0])])
    scored, kept, metrics = collect(first, [DropNonFinite(), DynamicSampling(max_rounds=5)], more, groups=3)
    assert asked == [2, 1]  # the shortfall each time
    assert list(kept.groups()) == ["b", "d", "e"] and len(scored) == 12
    assert metrics["sampling/rounds"] == 3 and metrics["filter/dynamic_sampling/dropped"] == 6
    assert metrics["filter/kept_fraction"] == 0.5


def test_dynamic_sampling_stops_at_its_cap_and_cuts_extra_groups():
    calls = []

    def more(n):
        calls.append(n)
        return Batch.concat([group_batch(f"z{len(calls)}", [1, 1])])

    scored, kept, metrics = collect(group_batch("a", [0, 1]), [DynamicSampling(max_rounds=2)], more, groups=3)
    assert calls == [2] and list(kept.groups()) == ["a"] and metrics["sampling/rounds"] == 2
    many = Batch.concat([group_batch(p, [0, 1]) for p in "abcd"])
    _, kept, _ = collect(many, [DynamicSampling()], more, groups=2)
    assert list(kept.groups()) == ["a", "b"]


def test_without_dynamic_sampling_nothing_is_resampled():
    _, kept, metrics = collect(group_batch("a", [1, 1]), [DropNonFinite()], lambda n: pytest.fail("resampled"), 4)
    assert len(kept) == 2 and "sampling/rounds" not in metrics


def test_dynamic_sampling_decides_on_correctness_before_the_overlong_penalty():
    # all correct, different lengths: the penalty makes the final rewards differ, yet the group has no
    # correctness signal (DAPO keeps a group only when 0 < correct < G), whatever the config order
    filters = [DynamicSampling(max_rounds=1), OverlongPenalty(max_length=10, cache=4)]
    for metric in ("gold", "reward", "r"):
        filters[0].metric = metric
        _, kept, metrics = collect(group_batch("a", [1.0, 1.0], lengths=[2, 10]), filters, lambda n: None, groups=1)
        assert len(kept) == 0 and metrics["filter/dynamic_sampling/dropped"] == 2
    mixed = group_batch("b", [1.0, 0.0], lengths=[2, 10])
    _, kept, _ = collect(mixed, filters, lambda n: pytest.fail("resampled"), groups=1)
    assert kept.reward == [1.0, -1.0] and kept.rewards["overlong"] == [0.0, -1.0]


def test_dynamic_sampling_metric_chooses_the_column():
    # reward says all equal (a proxy scored both 0.5), gold says one of two is right: gold keeps the group
    batch = group_batch("a", [0.5, 0.5], gold=[1.0, 0.0])
    assert DynamicSampling().keep(batch) == [0, 1] and DynamicSampling(metric="reward").keep(batch) == []
    no_gold = group_batch("a", [0.0, 1.0])
    no_gold.gold = None
    with pytest.raises(UserError, match="metric=gold needs reference answers"):
        DynamicSampling().keep(no_gold)
    with pytest.raises(UserError, match="'prm' is not gold, reward or a reward column of this run \\(r\\)"):
        DynamicSampling(metric="prm").keep(batch)
