"""frontier.png: the reward-KL frontier of a sweep, the DPO paper's Figure 2 for your own trials.

x = eval/gen/kl (how far the policy moved from the reference), y = eval/gen/reward (what its
answers are worth); one line per trial through its eval points in order, coloured by beta; the
reference sits at KL 0 with its own reward. The trials toward the upper left buy the most reward
for the least divergence; the Pareto trials of a multi-objective sweep are ringed.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from dpo_sweep import tracking
from dpo_sweep.report_data import SweepReport
from dpo_sweep.report_plots import pyplot, trial_label

KL, REWARD, REF_REWARD = "eval/gen/kl", "eval/gen/reward", "eval/gen/ref_reward"
LINEAR_KL = 0.1  # the x axis is linear below this KL and logarithmic above, when KLs span decades
LABEL_GAP_PX = (70, 11)  # an end point closer than this to a labelled one stays unlabelled


def trial_paths(report: SweepReport) -> Dict[int, List[Tuple[int, float, float]]]:
    """Each trial's (step, kl, reward) at every eval that logged both."""
    out = {}
    for t in report.trials:
        kl = dict(tracking.metric_history(report.uri, t.run.run_id, KL))
        reward = dict(tracking.metric_history(report.uri, t.run.run_id, REWARD))
        out[t.number] = [(s, kl[s], reward[s]) for s in sorted(kl) if s in reward]
    return out


def reference_reward(report: SweepReport) -> Optional[float]:
    values = [t.run.metrics[REF_REWARD] for t in report.trials if REF_REWARD in t.run.metrics]
    return sum(values) / len(values) if values else None


def _beta(value) -> Optional[float]:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _label_ends(ax, report: SweepReport, ends) -> None:
    """Label each trial's last point with its trial and setting, best trials first, leaving out a
    label that would overlap one already placed (the table in results.md lists every trial)."""
    rank = {n: i for i, n in enumerate(report.best)}
    ax.autoscale_view()
    placed = []
    for t, x, y in sorted(ends, key=lambda e: (rank.get(e[0].number, len(rank)), -e[2])):
        px, py = ax.transData.transform((x, y))
        if any(abs(px - qx) < LABEL_GAP_PX[0] and abs(py - qy) < LABEL_GAP_PX[1] for qx, qy in placed):
            continue
        placed.append((px, py))
        ax.annotate(trial_label(report, t).replace("trial ", "t"), (x, y), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")


def frontier_figure(report: SweepReport):
    """The figure, or None when no trial logged eval/gen/kl and eval/gen/reward."""
    paths = trial_paths(report)
    if not any(paths.values()):
        return None
    plt = pyplot()
    from matplotlib.colors import LogNorm, Normalize

    fig, ax = plt.subplots(figsize=(8.5, 6))
    betas = {t.number: _beta(t.run.params.get("beta")) for t in report.trials}
    known = [b for b in betas.values() if b is not None and b > 0]
    norm = (LogNorm if known and min(known) > 0 and max(known) / min(known) > 3 else Normalize)(
        vmin=min(known, default=0.0), vmax=max(known, default=1.0) + (0 if len(set(known)) > 1 else 1e-9))
    cmap = plt.get_cmap("viridis")
    pareto = set(report.best) if len(report.metrics) > 1 else set()
    kls = [p[1] for pts in paths.values() for p in pts]
    if max(kls) > 30 * LINEAR_KL:  # spread over decades: the close trials would sit in one pixel column
        ax.set_xscale("symlog", linthresh=LINEAR_KL, linscale=0.5)
    ends = []
    for t in report.trials:
        points = paths[t.number]
        if not points:
            continue
        colour = cmap(norm(betas[t.number])) if betas[t.number] else "grey"
        xs, ys = [p[1] for p in points], [p[2] for p in points]
        style = "-" if t.state == "COMPLETE" else "--"
        ax.plot(xs, ys, style, color=colour, marker="o", markersize=3, linewidth=1.2, alpha=0.9)
        ax.plot(xs[-1:], ys[-1:], "o", color=colour, markersize=7, markeredgecolor="black",
                markeredgewidth=2 if t.number in pareto else 0.5)
        ends.append((t, xs[-1], ys[-1]))
    room = 3.0 if ax.get_xscale() == "symlog" else 1.2  # for the labels right of the last points
    ax.set_xlim(left=min(0.0, *kls) - 0.05, right=max(max(kls), LINEAR_KL) * room)
    _label_ends(ax, report, ends)
    ref = reference_reward(report)
    if ref is not None:
        ax.plot([0], [ref], "*", color="red", markersize=14, label=f"reference (reward {ref:.3g})", zorder=5)
        ax.axhline(ref, color="red", linewidth=0.6, alpha=0.5)
    sm = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(sm, ax=ax, label="beta")
    scale = " (log scale above 0.1)" if ax.get_xscale() == "symlog" else ""
    ax.set(xlabel=f"{KL} (sequence KL from the reference){scale}", ylabel=f"{REWARD} (judge's mean score)",
           title=f"sweep {report.study}: reward against KL, one line per trial through its evals"
                 + ("\n(black rings: the Pareto trials)" if pareto else ""))
    if ref is not None:
        ax.legend(loc="lower right", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
