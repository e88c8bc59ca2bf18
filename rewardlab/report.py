"""`rewardlab report <dir>`: PNG plots of metrics.jsonl (matplotlib, Agg) and a short report.md.

A run directory gets one curve per metric; a multirun directory gets every job's curves overlaid,
labelled by the overrides that differ between jobs. A multirun that repeats settings over seeds (`run.seed=0,1,2`
beside other overrides) gets one curve per setting instead: the mean over its seeds, with a band from the lowest to
the highest seed, and the table gives each end value as mean ± standard deviation over seeds (`--seeds each`
overlays every job as before). Panels whose metrics a run never logged (KL with
algo.beta=0, say) are listed as absent in the markdown instead of drawn empty. KL goes on a symlog axis
when it spans more than three decades.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rewardlab.errors import UserError
from rewardlab.io import write_text_atomic
from rewardlab.sweep import job_dirs, read_rows, varying_overrides

STAGES = ("time/generate", "time/score", "time/update", "time/eval")


@dataclass
class Run:
    label: str
    rows: list[dict[str, Any]]  # a group of seeds: the per-iteration mean over its members
    members: list[list[dict[str, Any]]] = field(default_factory=list)  # each seed's own rows (groups only)


@dataclass(frozen=True)
class Panel:
    name: str
    title: str
    ylabel: str
    keys: Callable[[set[str]], list[str]]


def _reward_keys(keys: set[str]) -> list[str]:
    components = sorted(k for k in keys if k.startswith("reward/") and k.endswith("/mean") and k != "reward/mean")
    return ["reward/mean", *components] if "reward/mean" in keys else components


def _fixed(*names: str) -> Callable[[set[str]], list[str]]:
    return lambda keys: [n for n in names if n in keys]


def _eval_keys(keys: set[str]) -> list[str]:
    return ["eval/accuracy"] * ("eval/accuracy" in keys) + sorted(
        k for k in keys if k.startswith(("eval/pass@", "eval/maj@")))


PANELS = (
    Panel("reward", "Reward per component (training rollouts)", "mean reward", _reward_keys),
    Panel("gold_vs_proxy", "Gold accuracy vs proxy reward (training rollouts)", "value",  # needs references
          lambda keys: ["reward/mean", "gold/accuracy"] if {"reward/mean", "gold/accuracy"} <= keys else []),
    Panel("eval_accuracy", "Evaluation on the test split", "accuracy", _eval_keys),
    Panel("kl", "KL to the reference policy", "KL (k3, per token)", _fixed("kl")),
    Panel("length", "Completion length", "tokens", _fixed("length/mean", "length/max", "eval/length")),
    Panel("time", "Seconds per stage", "seconds", _fixed(*STAGES)),
    Panel("judge", "The policy as its own judge: agreement of its verdicts with the gold label", "agreement",
          _fixed("judge/gold_agreement")),
    Panel("pairs", "Preference pairs: reward of the chosen and the rejected side, and their gap", "reward",
          _fixed("pairs/reward_margin", "pairs/chosen_reward", "pairs/rejected_reward")),
    Panel("proxy_gold_vs_kl", "Proxy reward and gold accuracy against sqrt(KL) from the start (Gao et al.)",
          "proxy reward", lambda keys: ["reward/mean", "gold/accuracy"] if {"reward/mean", "gold/accuracy", "kl"} <= keys
          else []),
)


SEED = "run.seed="


def load_runs(path: Path, seeds: str = "mean") -> tuple[list[Run], bool]:
    """The runs under `path` and whether it is a multirun directory. With `seeds="mean"`, jobs whose
    overrides differ only in run.seed are one Run (the mean over them) when some setting has several seeds."""
    if seeds not in ("mean", "each"):
        raise UserError(f"--seeds {seeds}: use mean (one curve per setting, averaged over its seeds) or each")
    if (path / "metrics.jsonl").exists():
        return [Run(path.name, read_rows(path))], False
    jobs = [j for j in job_dirs(path) if (j / "metrics.jsonl").exists()]
    if not jobs:
        raise UserError(f"{path} has no metrics.jsonl (a run dir) nor job dirs with one (a multirun dir); "
                        f"pass the directory `rewardlab train` printed as `run dir:`")
    labels = varying_overrides(jobs)
    groups: dict[tuple[str, ...], list[Path]] = {}
    for job in jobs:
        groups.setdefault(tuple(o for o in labels[job] if not o.startswith(SEED)), []).append(job)
    if seeds == "each" or all(len(members) == 1 for members in groups.values()):
        return [Run(f"{j.name}: {' '.join(labels[j]) or j.name}", read_rows(j)) for j in jobs], True
    return [seed_mean(" ".join(setting) or "all jobs", [read_rows(j) for j in members])
            for setting, members in groups.items()], True


def seed_mean(setting: str, members: list[list[dict[str, Any]]]) -> Run:
    """One Run for a setting's seeds: at each iteration, the mean of every numeric metric over the seeds that
    logged it there (a seed that stopped early leaves the later means to the others)."""
    by_iteration: dict[int, dict[str, list[float]]] = {}
    for rows in members:
        for row in rows:
            slot = by_iteration.setdefault(row["iteration"], {})
            for key, value in row.items():
                if key != "iteration" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    slot.setdefault(key, []).append(float(value))
    rows = [{"iteration": it, **{k: statistics.fmean(v) for k, v in slot.items()}}
            for it, slot in sorted(by_iteration.items())]
    return Run(f"{setting} ({len(members)} seeds)", rows, members)


def band(run: Run, key: str) -> tuple[list[int], list[float], list[float]]:
    """(iterations, lowest, highest) of one metric over a group's seeds, at the iterations every seed logged."""
    per_seed = [dict(zip(*series(rows, key))) for rows in run.members]
    common = sorted(set.intersection(*(set(s) for s in per_seed))) if per_seed else []
    return common, [min(s[i] for s in per_seed) for i in common], [max(s[i] for s in per_seed) for i in common]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(iterations, values) of one metric, skipping rows that did not log it."""
    pairs = [(r["iteration"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def y_scale(values: list[float]) -> dict[str, Any]:
    """`ax.set_yscale` arguments for non-negative values (KL): linear, unless the largest is over 1000x the
    smallest positive one (a collapsed run's spike would flatten the others to a line at zero); then
    symlog, linear below the smallest positive value, so zeros (a policy equal to its reference) stay."""
    positive = [v for v in values if v > 0]
    if not positive or max(positive) <= 1000 * min(positive):
        return {"value": "linear"}
    return {"value": "symlog", "linthresh": min(positive)}


def _plot_time_bars(ax, run: Run, keys: list[str]) -> None:
    """One run: stacked bars, one segment per stage, so each iteration's total is visible too."""
    bottom: dict[int, float] = {}
    for key in keys:
        xs, ys = series(run.rows, key)
        ax.bar(xs, ys, bottom=[bottom.get(x, 0.0) for x in xs], label=key.removeprefix("time/"))
        for x, y in zip(xs, ys):
            bottom[x] = bottom.get(x, 0.0) + y


def _proxy_and_gold_axes(ax, right, legend: dict[str, Any]) -> None:
    """Label the proxy (left) and gold accuracy (right, in [0, 1]) axes, with one legend for both."""
    right.set_ylim(-0.03, 1.03)
    right.set_ylabel("gold accuracy (verifiable)")
    ax.set_ylabel("proxy reward (training reward)")
    handles = [h for a in (ax, right) for h in a.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], **legend)


def draw_panel(panel: Panel, runs: list[Run], out: Path) -> list[str] | None:
    """Draw one panel to `out` (PNG); returns the metrics drawn, or None when no run logged any."""
    import matplotlib  # here, not at import: a run registers every module's schema and needs no plotting

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = panel.keys(set().union(*(k for r in runs for k in r.rows)))
    if not keys:
        return None
    fig, ax = plt.subplots(figsize=(7 if len(runs) == 1 else 10, 4.2), dpi=110)
    legend = dict(fontsize=7, loc="best") if len(runs) == 1 else dict(  # overlays: legend beside the axes
        fontsize=7, loc="upper left", bbox_to_anchor=(1.1 if panel.name in ("gold_vs_proxy", "proxy_gold_vs_kl")
                                                      else 1.01, 1))
    styles = ("-", "--", ":", "-.")
    if panel.name == "time" and len(runs) == 1 and not runs[0].members:
        _plot_time_bars(ax, runs[0], keys)
    elif panel.name == "proxy_gold_vs_kl":  # x: sqrt of the per-token KL to the reference, iteration by iteration
        right = ax.twinx()
        for i, run in enumerate(runs):
            kl = dict(zip(*series(run.rows, "kl")))
            for axis, key, marker in ((ax, "reward/mean", "o"), (right, "gold/accuracy", "s")):
                pairs = [(max(kl[x], 0.0) ** 0.5, y) for x, y in zip(*series(run.rows, key)) if x in kl]
                if pairs:  # points, not a line: an iteration's KL estimate is noisy, so x does not grow steadily
                    axis.plot(*zip(*pairs), linestyle="none", color=f"C{i}" if len(runs) > 1 else ("C0" if marker == "o" else "C3"),
                              marker=marker, ms=4, mfc="none" if marker == "s" else None,
                              label=f"{run.label} · {key}" if len(runs) > 1 else key)
        _proxy_and_gold_axes(ax, right, legend)
    elif panel.name == "gold_vs_proxy":
        right = ax.twinx()  # the proxy reward may live on any scale; gold accuracy is in [0, 1]
        proxy: list[float] = []
        for i, run in enumerate(runs):
            for axis, key, style, marker in ((ax, "reward/mean", "-", "o"), (right, "gold/accuracy", "--", "s")):
                xs, ys = series(run.rows, key)
                proxy += ys if key == "reward/mean" else []
                if xs:
                    color = f"C{i}" if len(runs) > 1 else ("C0" if marker == "o" else "C3")
                    axis.plot(xs, ys, style, color=color, marker=marker, ms=5, mfc="none" if marker == "s" else None,
                              label=f"{run.label} · {key}" if len(runs) > 1 else key)
                    if len(run.members) > 1:
                        axis.fill_between(*band(run, key), color=color, alpha=0.12, linewidth=0)
        right.set_ylim(-0.03, 1.03)
        if proxy and 0 <= min(proxy) and max(proxy) <= 1:  # same scale on both sides when comparable
            ax.set_ylim(-0.03, 1.03)
        _proxy_and_gold_axes(ax, right, legend)
    else:
        for i, run in enumerate(runs):
            for j, key in enumerate(keys):
                xs, ys = series(run.rows, key)
                if xs:
                    color = f"C{i}" if len(runs) > 1 else f"C{j}"
                    style = styles[j % len(styles)]
                    ax.plot(xs, ys, style, color=color, marker="o", ms=3,
                            label=f"{run.label} · {key}" if len(runs) > 1 else key)
                    if len(run.members) > 1:
                        ax.fill_between(*band(run, key), color=color, alpha=0.15, linewidth=0)
    if panel.name == "kl":
        ax.set_yscale(**y_scale([v for run in runs for v in series(run.rows, "kl")[1]]))
    if panel.name not in ("gold_vs_proxy", "proxy_gold_vs_kl"):
        ax.set_ylabel(panel.ylabel)
        ax.legend(**legend)
    ax.set_title(panel.title)
    if panel.name == "proxy_gold_vs_kl":
        ax.set_xlabel("sqrt(KL to the reference), per-token k3 estimate, each iteration's rollouts")
    else:
        ax.set_xlabel("iteration")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return keys


def _fmt(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def _world_size(rows: list[dict[str, Any]]) -> int:
    return int(rows[-1].get("world_size", 1)) if rows else 1


def _ends(run: Run, key: str) -> tuple[Any, Any]:
    """First and last value of a metric; for a group of seeds each as "mean ± sd" over the seeds."""
    if not run.members:
        values = series(run.rows, key)[1]
        return (values[0], values[-1]) if values else (None, None)
    per_seed = [series(rows, key)[1] for rows in run.members]
    per_seed = [v for v in per_seed if v]
    if not per_seed:
        return None, None
    spread = lambda xs: f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.3f}"
    return spread([v[0] for v in per_seed]), spread([v[-1] for v in per_seed])


def run_table(runs: list[Run]) -> str:
    """Start -> end of the headline metrics, and where the time went, one row per run."""
    header = ["run", "iterations", "world size", "eval acc start", "eval acc end", "gold acc first",
              "gold acc last", "reward first", "reward last", "stage seconds", "share (gen/score/update/eval)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        stage = [sum(series(run.rows, k)[1]) for k in STAGES]  # a group: seconds of the mean seed
        total = sum(stage)
        share = "/".join(f"{100 * s / total:.0f}%" for s in stage) if total else ""
        first_last = [v for key in ("eval/accuracy", "gold/accuracy", "reward/mean") for v in _ends(run, key)]
        cells = [run.label, max((r["iteration"] for r in run.rows), default=0),
                 _world_size(run.members[0] if run.members else run.rows), *first_last, total, share]
        lines.append("| " + " | ".join(_fmt(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(path: str | Path, out: str | Path | None = None, seeds: str = "mean") -> Path:
    """Plot every panel for the run (or multirun) at `path` into `out` (default <path>/report) and
    write report.md there; returns the markdown's path. `seeds`: mean (a multirun's seeds of one setting
    averaged, with their range) or each (every job its own curve)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory; pass a run dir or a multirun dir")
    runs, multirun = load_runs(path, seeds)
    out = Path(out) if out is not None else path / "report"
    drawn, absent = [], []
    for panel in PANELS:
        keys = draw_panel(panel, runs, out / f"{panel.name}.png")
        (drawn if keys else absent).append((panel, keys))
    jobs = sum(max(len(r.members), 1) for r in runs)
    kind = ("run" if not multirun else f"multirun of {jobs} jobs, curves overlaid" if jobs == len(runs) else
            f"multirun of {jobs} jobs in {len(runs)} settings; each curve is the mean over a setting's seeds, its "
            f"band the lowest to the highest seed; table values are mean ± standard deviation over seeds")
    parts = [f"# Report: {path}\n", f"{kind.capitalize()}.\n", run_table(runs)]
    parts += [f"## {p.title}\n\n![{p.name}]({p.name}.png)\n\nMetrics: {', '.join(f'`{k}`' for k in keys)}\n"
              for p, keys in drawn]
    if absent:
        parts.append("Not logged by " + ("any job" if multirun else "this run") + ": "
                     + ", ".join(p.title for p, _ in absent) + ".\n")
    report = out / "report.md"
    write_text_atomic(report, "\n".join(parts))
    return report
