"""Composite rewards (`reward=composite`): a weighted sum of named components, each optionally an
ensemble of several reward models and shaped by a transform, every component's column kept.

Every component's `reward` (and every ensemble member) is an ordinary reward config, so any composite is
built from the command line by choosing rewards into it with Hydra's group@package form:
`+reward@reward.components.len.reward=length reward.components.len.weight=-0.1`, or for an ensemble
`+reward@reward.components.rm.members.a=orm +reward@reward.components.rm.members.b=orm`.

Per component, in order: score (ensemble: `mean`, worst-case `min`, or `uwo` = mean − λ·variance over
members); transform (`par`: sigmoid(r − r_ref) with r_ref the component's score of the row's reference
response; `clip`: each step reward becomes min(r − η, 0); `delta`: step k gets r_k − r_{k+1}, the last
step keeps r_K; for clip and delta the component's value is the sum of its transformed step rewards);
normalize (`batch` or `group`: (r − mean) / (std + 1e-6)); then `weight`. The weighted step rewards of
process components are summed into `batch.step_rewards`; `batch.reward` is the weighted sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.utils import instantiate

from rewardlab.config import schema
from rewardlab.errors import UserError
from rewardlab.rewards.base import Reward
from rewardlab.rollout import Batch

TRANSFORMS = ("none", "par", "clip", "delta")
NORMALIZE = ("none", "batch", "group")
ENSEMBLES = ("mean", "min", "uwo")


@dataclass
class ComponentConfig:
    reward: Any = None  # one reward config (with _target_), or
    members: Dict[str, Any] = field(default_factory=dict)  # several, by name, combined by `ensemble`
    ensemble: str = "mean"  # mean | min | uwo
    uwo_lambda: float = 0.5
    transform: str = "none"  # none | par | clip | delta
    eta: float = 0.0  # clip threshold
    normalize: str = "none"  # none | batch | group
    weight: float = 1.0


@schema("reward", "composite")
@dataclass
class CompositeConfig:
    _target_: str = "rewardlab.rewards.composite.CompositeReward"
    _recursive_: bool = False
    name: str = "composite"
    components: Dict[str, ComponentConfig] = field(default_factory=dict)


def _normalize(values: list[float], groups: list[list[int]]) -> list[float]:
    out = list(values)
    for rows in groups:
        mean = sum(values[i] for i in rows) / len(rows)
        std = math.sqrt(sum((values[i] - mean) ** 2 for i in rows) / len(rows))
        for i in rows:
            out[i] = (values[i] - mean) / (std + 1e-6)
    return out


def clip_steps(steps: list[float], eta: float) -> list[float]:
    """Gao et al. 2024 Clip: min(r − η, 0) per step, so repeating good-looking steps earns nothing."""
    return [min(r - eta, 0.0) for r in steps]


def delta_steps(steps: list[float]) -> list[float]:
    """Gao et al. 2024 Delta: r_k − r_{k+1}, the last step keeps r_K; the sum telescopes to r_1."""
    return [r - steps[k + 1] for k, r in enumerate(steps[:-1])] + steps[-1:]


class Component:
    """One named term of the sum: its reward model(s) and how their score is shaped."""

    def __init__(self, name: str, cfg: Any) -> None:
        self.name = name
        self.weight, self.eta, self.uwo_lambda = float(cfg.weight), float(cfg.eta), float(cfg.uwo_lambda)
        self.transform, self.normalize, self.ensemble = cfg.transform, cfg.normalize, cfg.ensemble
        for what, value, allowed in (("transform", self.transform, TRANSFORMS),
                                     ("normalize", self.normalize, NORMALIZE), ("ensemble", self.ensemble, ENSEMBLES)):
            if value not in allowed:
                raise UserError(f"reward.components.{name}.{what}={value!r} is not one of {', '.join(allowed)}")
        if cfg.members and cfg.reward is not None:
            raise UserError(f"reward.components.{name} sets both `reward` and `members`; keep one")
        configs = dict(cfg.members) or ({name: cfg.reward} if cfg.reward is not None else {})
        if not configs:
            raise UserError(f"reward.components.{name} names no reward; add one with "
                            f"+reward@reward.components.{name}.reward=<reward> (or its `members`)")
        single = len(configs) == 1
        self.members: list[Reward] = [instantiate(c, name=name if single else f"{name}/{k}")
                                      for k, c in configs.items()]

    def raw(self, batch: Batch) -> tuple[list[float], list[list[float]] | None]:
        """The (ensembled) score per row and, for a single process reward, its step rewards."""
        batch.step_rewards = None
        columns = []
        for member in self.members:
            member.score(batch)
            columns.append(batch.rewards[member.name])
        steps = batch.step_rewards if len(self.members) == 1 else None
        if len(columns) == 1:
            return columns[0], steps
        out = []
        for values in zip(*columns):
            mean = sum(values) / len(values)
            if self.ensemble == "mean":
                out.append(mean)
            elif self.ensemble == "min":
                out.append(min(values))
            else:
                out.append(mean - self.uwo_lambda * sum((v - mean) ** 2 for v in values) / len(values))
        return out, None

    def reference_scores(self, batch: Batch) -> list[float]:
        """This component's raw score of each row's reference response (for PAR)."""
        if any(s is None for s in batch.solution):
            raise UserError(f"reward.components.{self.name}.transform=par needs a reference response "
                            f"(`solution`) for every row")
        first = {pid: i for i, pid in reversed(list(enumerate(batch.prompt_id)))}
        refs = batch.select(sorted(first.values()))
        refs.completion = list(refs.solution)
        refs.completion_ids = [[] for _ in refs.completion]
        refs.rewards, refs.extra = {}, {}
        values, _ = self.raw(refs)
        by_prompt = dict(zip(refs.prompt_id, values))
        return [by_prompt[pid] for pid in batch.prompt_id]

    def score(self, batch: Batch) -> tuple[list[float], list[list[float]] | None]:
        """The shaped, weighted value per row and the weighted step rewards (None without steps)."""
        reference = self.reference_scores(batch) if self.transform == "par" else None
        values, steps = self.raw(batch)
        if self.transform == "par":
            values = [1.0 / (1.0 + math.exp(-(v - r))) for v, r in zip(values, reference)]
        elif self.transform in ("clip", "delta"):
            if steps is None:
                if self.transform == "delta":
                    raise UserError(f"reward.components.{self.name}.transform=delta needs a process reward "
                                    f"(one with step scores, e.g. prm)")
                values = [min(v - self.eta, 0.0) for v in values]
            else:
                steps = [clip_steps(s, self.eta) if self.transform == "clip" else delta_steps(s) for s in steps]
                values = [sum(s) for s in steps]
        if self.normalize != "none":
            groups = list(batch.groups().values()) if self.normalize == "group" else [list(range(len(batch)))]
            values = _normalize(values, groups)
        batch.rewards[self.name] = list(values)
        weighted_steps = None if steps is None else [[self.weight * r for r in s] for s in steps]
        return [self.weight * v for v in values], weighted_steps


class CompositeReward(Reward):
    """Σ_c weight_c · shaped_c(r); each component's (shaped, unweighted) column kept in `batch.rewards`."""

    def __init__(self, name: str = "composite", components: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(name)
        if not components:
            raise UserError("reward=composite needs at least one component: "
                            "+reward@reward.components.<name>.reward=<reward>")
        self.components = [Component(n, c) for n, c in components.items()]

    @property
    def process(self) -> bool:
        """Step rewards come through a component with a single process reward (ensembles give none)."""
        return any(len(c.members) == 1 and c.members[0].process for c in self.components)

    def bind(self, policy) -> None:
        for component in self.components:
            for member in component.members:
                member.bind(policy)

    def compute(self, batch: Batch) -> list[float]:
        total = [0.0] * len(batch)
        step_rewards: list[list[float]] | None = None
        for component in self.components:
            values, steps = component.score(batch)
            total = [t + v for t, v in zip(total, values)]
            if steps is not None:
                step_rewards = steps if step_rewards is None else [
                    [a + b for a, b in zip(x, y)] for x, y in zip(step_rewards, steps)]
        batch.step_rewards = step_rewards
        return total

    def metrics(self, batch: Batch) -> dict[str, float]:
        out: dict[str, float] = {}
        for component in self.components:
            for member in component.members:
                out.update(member.metrics(batch))
        return out
