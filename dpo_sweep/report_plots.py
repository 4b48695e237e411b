"""The plots of a sweep report (`python -m dpo_sweep.report`), drawn with matplotlib (Agg):
`curves_figure` for curves.png, `objective_figure` for heatmap.png. Data come from a
`report_data.SweepReport`, read from MLflow; metric histories through `tracking`."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

from dpo_sweep import names, tracking
from dpo_sweep.report_data import SweepReport, Trial
from dpo_sweep.results import fmt

CURVES = ("train/loss", "train/rewards/accuracies")  # against step, one line per trial
EVAL_CURVE = "eval/rewards/accuracies"  # at each eval


def short(key: str) -> str:
    """A key's label in legends: optimizer.lr -> lr."""
    return key.lstrip("+~").split(".")[-1]


def trial_label(report: SweepReport, trial: Trial) -> str:
    values = ", ".join(f"{short(k)}={fmt(trial.param(k))}" for k in report.keys)
    state = "" if trial.state == "COMPLETE" else f" ({trial.label.lower()})"
    return f"trial {trial.number}" + (f": {values}" if values else "") + state


def running_mean(values: Sequence[float], window: int) -> List[float]:
    """The mean of each value and the `window - 1` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str) -> None:
    """Write a figure as PNG and free it."""
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def curves_figure(report: SweepReport):
    """curves.png: train loss and train reward accuracy (running means) against step, and the
    objective at each eval (eval reward accuracy when the objective is no eval metric), one line
    per trial (dashed: pruned, dotted: failed)."""
    plt = pyplot()
    objective = report.metrics[0] if report.metrics else ""
    eval_key = objective if objective.startswith("eval/") else EVAL_CURVE
    histories = {t.number: {k: tracking.metric_history(report.uri, t.run.run_id, k) for k in (*CURVES, eval_key)}
                 for t in report.trials}
    steps = max((len(h[CURVES[0]]) for h in histories.values()), default=0)
    window = max(1, round(steps / 15))  # ~15 windows over the run: batch-to-batch noise averaged out
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.2))
    colours = plt.get_cmap("tab20" if len(report.trials) > 10 else "tab10")
    styles = {"COMPLETE": "-", "PRUNED": "--"}
    for i, t in enumerate(report.trials):
        style = dict(color=colours(i % colours.N), linestyle=styles.get(t.state, ":"), linewidth=1.4)
        for ax, key in zip(axes, CURVES):
            points = histories[t.number][key]
            if points:
                ax.plot([s for s, _ in points], running_mean([v for _, v in points], window), **style)
        evals = histories[t.number][eval_key]
        axes[2].plot([s for s, _ in evals], [v for _, v in evals], marker="o", markersize=4,
                     label=trial_label(report, t), **style)
    smoothed = f" (running mean over {window} steps)" if window > 1 else ""
    eval_title = "the objective, at each eval" if eval_key == objective else "eval reward accuracy, at each eval"
    for ax, key, title in zip(axes, (*CURVES, eval_key), ("train loss" + smoothed, "train reward accuracy" + smoothed,
                                                          eval_title)):
        ax.set(xlabel="step", ylabel=key, title=title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep {report.study}: one line per trial, best first in the legend")
    fig.legend(*axes[2].get_legend_handles_labels(), loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    fig.tight_layout()
    return fig


def axis_values(values: Sequence[Optional[str]]) -> Tuple[List[str], bool]:
    """The distinct values of one key, sorted (numerically when they are numbers), and whether numeric."""
    distinct = list(dict.fromkeys(v for v in values if v is not None))
    try:
        return sorted(distinct, key=float), True
    except ValueError:
        return distinct, False


def varying_keys(report: SweepReport) -> List[str]:
    """The swept keys that take at least two values over the trials (beta and lr first)."""
    return [k for k in report.keys if len(axis_values([t.param(k) for t in report.trials])[0]) > 1]


def is_grid(report: SweepReport, x: str, y: str) -> bool:
    """True when the trials take every (x, y) combination of their values: a grid, not samples."""
    xs, _ = axis_values([t.param(x) for t in report.trials])
    ys, _ = axis_values([t.param(y) for t in report.trials])
    taken = {(t.param(x), t.param(y)) for t in report.trials}
    return all((a, b) in taken for a in xs for b in ys)


def objective_figure(report: SweepReport):
    """heatmap.png: the objective over the two main varying keys (a heat map for a grid, else a
    scatter), against the only one, or per trial when none varies."""
    keys = varying_keys(report)
    fig, ax = pyplot().subplots(figsize=(8, 6))
    if len(keys) >= 2:
        y, x = keys[0], keys[1]
        if y == "optimizer.lr":  # the learning rate across, on a log scale
            x, y = y, x
        (draw_heatmap if is_grid(report, x, y) else draw_scatter)(fig, ax, report, x, y, keys[2:])
    elif len(keys) == 1:
        draw_line(ax, report, keys[0])
    else:
        draw_bars(ax, report)
    fig.tight_layout()
    return fig


def metric_label(report: SweepReport) -> str:
    direction = report.directions[0]
    return f"{report.metrics[0]} ({'higher' if direction == 'maximize' else 'lower'} is better)"


def draw_heatmap(fig, ax, report: SweepReport, x: str, y: str, others: Sequence[str]) -> None:
    """One cell per (y, x) value: the best final objective there (over the other keys' values),
    with the trials there that did not complete counted under it (`+1 fail`), or their state
    when none completed."""
    import numpy as np

    xs, _ = axis_values([t.param(x) for t in report.trials])
    ys, _ = axis_values([t.param(y) for t in report.trials])
    better = max if report.directions[0] == "maximize" else min
    grid = np.full((len(ys), len(xs)), np.nan)
    notes: Dict[Tuple[int, int], List[str]] = {}
    for t in report.trials:
        i, j = ys.index(t.param(y)), xs.index(t.param(x))
        if t.values is not None:
            grid[i, j] = t.values[0] if np.isnan(grid[i, j]) else better(grid[i, j], t.values[0])
        else:
            notes.setdefault((i, j), []).append(t.state.split()[0].lower())
    image = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
    fig.colorbar(image, ax=ax, label=metric_label(report))
    finite = grid[~np.isnan(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
    for i in range(len(ys)):
        for j in range(len(xs)):
            value, others = grid[i, j], notes.get((i, j), [])
            counted = ", ".join(f"+{others.count(s)} {s}" for s in dict.fromkeys(others))
            if np.isnan(value):
                text = "/".join(dict.fromkeys(others)) or "-"
            else:
                text = fmt(value) + (f"\n({counted})" if counted else "")
            colour = "black" if not np.isnan(value) and value > middle else "white"
            ax.text(j, i, text, ha="center", va="center", color=colour if not np.isnan(value) else "grey")
    for t in report.trials:
        if t.number in report.best and t.values is not None:  # the best trial's cell, outlined
            i, j = ys.index(t.param(y)), xs.index(t.param(x))
            ax.add_patch(pyplot().Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    ax.set_xticks(range(len(xs)), [fmt(v) for v in xs])
    ax.set_yticks(range(len(ys)), [fmt(v) for v in ys])
    ax.set(xlabel=x, ylabel=y)
    over = f", best over {', '.join(others)}" if others else ""
    outline = "\n(red outline: the best trial)" if report.best else ""
    ax.set_title(f"sweep {report.study}: final {report.metrics[0]} over {y} x {x}{over}{outline}", fontsize=11)


def positions(values: Sequence[Optional[str]]) -> Tuple[List[float], List[str], bool]:
    """Plot coordinates of one key's values: the numbers, or category indices with tick labels."""
    distinct, numeric = axis_values(values)
    if numeric:
        return [float(v) if v is not None else math.nan for v in values], [], True
    return [distinct.index(v) if v is not None else math.nan for v in values], distinct, False


def set_axis(ax, axis: str, report: SweepReport, key: str, coords: Sequence[float], labels: Sequence[str],
             numeric: bool) -> None:
    """Label an axis; a log scale for a key swept with tag(log, ...) or whose values span 10x or
    more; a tick at each value of a finite dimension with few values (a choice() of betas), at
    each category for values that are not numbers."""
    from matplotlib.ticker import NullLocator

    spec = report.parent.tags.get(names.SPACE_PREFIX + key, "")
    getattr(ax, f"set_{axis}label")(key)
    finite = sorted(set(c for c in coords if not math.isnan(c)))
    if numeric and finite and finite[0] > 0 and ("log" in spec or finite[-1] / finite[0] >= 10):
        getattr(ax, f"set_{axis}scale")("log")
    if not numeric:
        getattr(ax, f"set_{axis}ticks")(range(len(labels)), labels)
    elif len(finite) <= 8 and "interval(" not in spec:
        getattr(ax, f"{axis}axis").set_minor_locator(NullLocator())
        getattr(ax, f"set_{axis}ticks")(finite, [fmt(v) for v in finite])


def draw_scatter(fig, ax, report: SweepReport, x: str, y: str, others: Sequence[str]) -> None:
    """Sampled trials: complete ones coloured by the final objective, the best ringed in red,
    pruned and failed ones as grey and red crosses."""
    trials = report.trials
    xc, x_labels, x_numeric = positions([t.param(x) for t in trials])
    yc, y_labels, y_numeric = positions([t.param(y) for t in trials])
    done = [i for i, t in enumerate(trials) if t.values is not None]
    if done:
        points = ax.scatter([xc[i] for i in done], [yc[i] for i in done], c=[trials[i].values[0] for i in done],
                            cmap="viridis", s=110, edgecolors="black", linewidths=0.5, zorder=3)
        fig.colorbar(points, ax=ax, label=metric_label(report))
    best = [i for i in done if trials[i].number in report.best]
    ax.scatter([xc[i] for i in best], [yc[i] for i in best], s=260, facecolors="none", edgecolors="red",
               linewidths=1.8, label="best", zorder=4)
    for state, colour, label in (("PRUNED", "grey", "pruned (last value @ step)"), ("FAIL", "red", "failed")):
        idx = [i for i, t in enumerate(trials) if t.values is None and t.state.startswith(state)]
        if idx:
            ax.scatter([xc[i] for i in idx], [yc[i] for i in idx], marker="x", s=70, color=colour, label=label,
                       zorder=3)
    set_axis(ax, "x", report, x, xc, x_labels, x_numeric)
    set_axis(ax, "y", report, y, yc, y_labels, y_numeric)
    ax.margins(0.08)
    labels = [(xc[i], yc[i], fmt(trials[i].values[0]), "black") for i in done]
    labels += [(xc[i], yc[i], f"{fmt(t.last_report[1])} @ {t.last_report[0]}", "grey")
               for i, t in enumerate(trials) if t.values is None and t.last_report is not None]
    label_points(ax, labels)
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)
    over = f" (other keys: {', '.join(others)})" if others else ""
    ax.set_title(f"sweep {report.study}: final {report.metrics[0]} of each trial over {y} x {x}{over}")


def label_points(ax, labels: Sequence[Tuple[float, float, str, str]], size: float = 8) -> None:
    """Write each (x, y, text, colour) beside its point, at the first of four offsets (right or left,
    above or below) where it stays inside the axes and overlaps neither a marker nor a label
    already written."""
    ax.autoscale_view()
    scale = ax.figure.dpi / 72  # points to pixels
    offsets = [(7, 4), (7, -4 - size), (-7, 4), (-7, -4 - size)]  # points from the marker's centre
    centres = [ax.transData.transform((x, y)) for x, y, _, _ in labels]
    radius = 6 * scale  # about a marker's size
    placed: List[Tuple[float, float, float, float]] = [(cx - radius, cy - radius, cx + radius, cy + radius)
                                                       for cx, cy in centres]
    for x, y, text, colour in sorted(labels, key=lambda label: (label[0], label[1])):
        px, py = ax.transData.transform((x, y))
        width, height = 0.62 * size * len(text) * scale, size * scale  # about, for a sans-serif font
        own = (px - radius, py - radius, px + radius, py + radius)  # its own marker is not in the way
        for dx, dy in offsets:
            left = px + dx * scale - (width if dx < 0 else 0)
            box = (left, py + dy * scale, left + width, py + dy * scale + height)
            inside = ax.bbox.x0 <= box[0] and box[2] <= ax.bbox.x1
            if inside and not any(overlap(box, b) for b in placed if b != own):
                break
        placed.append(box)
        ax.annotate(text, (x, y), textcoords="offset points", xytext=(dx, dy), ha="left" if dx > 0 else "right",
                    fontsize=size, color=colour, annotation_clip=False)


def overlap(a: Tuple[float, float, float, float], b: Tuple[float, float, float, float]) -> bool:
    """Whether two boxes (x0, y0, x1, y1) overlap."""
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def draw_line(ax, report: SweepReport, key: str) -> None:
    """One swept key: the final objective against its values (pruned trials at their last report)."""
    trials = report.trials
    coords, labels, numeric = positions([t.param(key) for t in trials])
    done = sorted((coords[i], t.values[0]) for i, t in enumerate(trials) if t.values is not None)
    ax.plot([c for c, _ in done], [v for _, v in done], marker="o", label="complete")
    pruned = [(coords[i], t.last_report[1]) for i, t in enumerate(trials) if t.last_report is not None]
    if pruned:
        ax.scatter([c for c, _ in pruned], [v for _, v in pruned], marker="x", color="grey",
                   label="pruned (last reported value)")
    set_axis(ax, "x", report, key, coords, labels, numeric)
    ax.set_ylabel(metric_label(report))
    ax.legend(loc="best", fontsize=9)
    ax.grid(alpha=0.3)
    ax.set_title(f"sweep {report.study}: final {report.metrics[0]} against {key}")


def draw_bars(ax, report: SweepReport) -> None:
    """Nothing varies across trials: the final objective of each trial."""
    done = [t for t in report.trials if t.values is not None]
    ax.bar([f"trial {t.number}" for t in done], [t.values[0] for t in done])
    ax.set(xlabel="trial", ylabel=metric_label(report),
           title=f"sweep {report.study}: final {report.metrics[0]} per trial (no swept key varies)")
