"""`python -m dpo_sweep.report <sweep folder | parent run id>`: a sweep's results, from MLflow.

Everything comes from the MLflow store the sweep logged to (the sweep's parent run and its trial
runs), so anyone can regenerate a report from their own runs. Into `--out` it writes:

- `results.md`: every trial, best first (its swept values, state, objective, final eval reward
  accuracy and margin, duration), then the best setting and how to run it again;
- `curves.png`: train loss and train reward accuracy against step (and the eval reward accuracy
  at each eval), one line per trial;
- `heatmap.png`: the objective over the two main swept keys (beta x lr when both are swept): a
  heat map when the trials form a grid, a scatter coloured by the objective when they were
  sampled; against the one swept key, or per trial, when fewer are swept.

    python -m dpo_sweep.report outputs/sweeps/tiny_sweep
    python -m dpo_sweep.report 0123456789abcdef0123456789abcdef --tracking-uri sqlite:////abs/mlflow.db --out report
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from dpo_sweep import tracking

RUN_ID = re.compile(r"[0-9a-f]{32}")
MAIN_KEYS = ("beta", "optimizer.lr")  # always in the table; first in order; the heat map's axes when swept
EVAL_COLUMNS = ("eval/rewards/accuracies", "eval/rewards/margins")
STATE_ORDER = {"COMPLETE": 0, "PRUNED": 1, "FAIL": 2}  # then anything else (RUNNING, ...)
OBJECTIVE_TAG = re.compile(r"(.+?) \((maximize|minimize)\)(?:, |$)")


# -- finding the sweep in the store


def locate(source: str, uri: Optional[str] = None) -> Tuple[str, tracking.RunSummary]:
    """(store URI, parent run) of a sweep given by its folder or its parent run id."""
    if os.path.isdir(source):
        return parent_from_folder(source, uri)
    if RUN_ID.fullmatch(source):
        uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or tracking.default_uri()
        return uri, parent_from_run_id(source, uri)
    raise LookupError(f"{source!r} is neither a sweep folder (no such directory) nor an MLflow run id "
                      f"(32 hex digits)")


def read_multirun(folder: str) -> Dict[str, Any]:
    """The sweep's saved config, `<folder>/multirun.yaml`, as plain data (nothing resolved)."""
    path = os.path.join(folder, "multirun.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{folder} is not a sweep folder: it has no multirun.yaml "
                                f"(written by `python -m dpo_sweep ... -m`)")
    with open(path) as f:
        return yaml.safe_load(f) or {}


def store_of(multirun: Dict[str, Any]) -> str:
    """The MLflow store the sweep logged to, resolved as the sweeper resolved it, from the folder
    the sweep ran in."""
    cwd = ((multirun.get("hydra") or {}).get("runtime") or {}).get("cwd") or os.getcwd()
    return tracking.resolve_uri((multirun.get("tracking") or {}).get("uri"), cwd, create=False)


def check_store(uri: str, looked_for: str) -> None:
    """A SQLite store must exist already: opening a missing one would create an empty store."""
    if uri.startswith("sqlite:///") and not os.path.isfile(uri[len("sqlite:///"):]):
        raise FileNotFoundError(f"no MLflow store at {uri[len('sqlite:///'):]} (looked there for {looked_for}); "
                                f"pass the store with --tracking-uri")


def parent_from_folder(folder: str, uri: Optional[str]) -> Tuple[str, tracking.RunSummary]:
    """The parent run tagged with this sweep folder (the newest, if the folder was swept into
    with several stores or studies)."""
    folder = os.path.abspath(folder)
    multirun = read_multirun(folder)
    uri = uri or store_of(multirun)
    looked_for = f"a run tagged sweep.role=parent and sweep.folder={folder}"
    check_store(uri, looked_for)
    parents = [r for r in tracking.find_runs_in_store(uri, "tags.`sweep.role` = 'parent'")
               if r.tags.get("sweep.folder") == folder]
    if not parents:
        raise LookupError(f"no sweep in {uri} for the folder {folder} (looked for {looked_for}); pass the "
                          f"store with --tracking-uri, or the parent run id")
    return uri, parents[0]


def parent_from_run_id(run_id: str, uri: str) -> tracking.RunSummary:
    """The sweep's parent run with this id; a trial's or a single run's id is an error naming
    what to pass instead."""
    check_store(uri, f"the MLflow run {run_id}")
    run = tracking.get_run(uri, run_id)
    if run is None:
        raise LookupError(f"no MLflow run {run_id} in {uri}; pass the store with --tracking-uri")
    if run.tags.get("sweep.role") == "parent":
        return run
    parent = run.tags.get("mlflow.parentRunId")
    if parent:
        raise LookupError(f"MLflow run {run_id} ({run.name}) is a trial of the sweep whose parent run is "
                          f"{parent}: pass that id")
    raise LookupError(f"MLflow run {run_id} ({run.name}) is not a sweep's parent run (no tag sweep.role=parent)")


# -- the sweep's trials


@dataclass
class Trial:
    """One trial of the sweep, as its MLflow run recorded it."""

    number: int
    run: tracking.RunSummary
    state: str  # COMPLETE | PRUNED | FAIL | FAIL (interrupted) | the run's status when untagged
    values: Optional[List[float]]  # the final objective(s); None when the trial did not complete
    last_report: Optional[Tuple[int, float]] = None  # (step, value) of a pruned trial's last eval

    def param(self, key: str) -> Optional[str]:
        """The logged value of a swept key: `beta`, `optimizer.lr`; a config group swept by
        name (`loss=sigmoid,ipo`) is its `.name`."""
        name = key.lstrip("+~")
        params = self.run.params
        return params.get(name, params.get(f"{name}.name"))

    @property
    def duration_s(self) -> Optional[float]:
        if self.run.start_time is None or self.run.end_time is None:
            return None
        return (self.run.end_time - self.run.start_time) / 1000


@dataclass
class SweepReport:
    """A sweep read back from MLflow: its parent run, objective, swept keys and trials."""

    uri: str
    parent: tracking.RunSummary
    metrics: List[str]  # the objective metric(s)
    directions: List[str]  # maximize | minimize, one per metric
    keys: List[str]  # the swept keys, beta and optimizer.lr first
    trials: List[Trial]  # best first (see `rank`)
    best: List[int]  # the best trial's number, or the Pareto front's

    @property
    def study(self) -> str:
        return self.parent.tags.get("sweep.study_name", self.parent.name)

    @property
    def objective_label(self) -> str:
        return ", ".join(f"{m} ({d})" for m, d in zip(self.metrics, self.directions))

    def columns(self) -> List[str]:
        """The param columns of the table: beta and optimizer.lr always, then the other swept keys."""
        return list(MAIN_KEYS) + [k for k in self.keys if k.lstrip("+~") not in MAIN_KEYS]


def objective_of(parent: tracking.RunSummary) -> Tuple[List[str], List[str]]:
    """(metrics, directions) from the parent's tag `sweep.objective`: "m (maximize), ..."."""
    text = parent.tags.get("sweep.objective", "")
    found = OBJECTIVE_TAG.findall(text)
    if not found:
        raise LookupError(f"MLflow run {parent.run_id} has no sweep.objective tag of the form "
                          f"'<metric> (maximize|minimize)' (found {text!r})")
    return [m for m, _ in found], [d for _, d in found]


def swept_keys(parent: tracking.RunSummary) -> List[str]:
    """The sweep's dimensions from the parent's `space.<key>` tags, beta and optimizer.lr first."""
    keys = [k[len("space."):] for k in parent.tags if k.startswith("space.")]
    main = [k for k in MAIN_KEYS if k in keys]
    return main + sorted(k for k in keys if k not in MAIN_KEYS)


def child_trials(uri: str, parent: tracking.RunSummary, metrics: Sequence[str]) -> List[Trial]:
    """The parent's child runs as trials, the newest run of each trial number."""
    runs = tracking.find_runs_in_store(uri, f"tags.`mlflow.parentRunId` = '{parent.run_id}'")
    by_number: Dict[int, tracking.RunSummary] = {}
    for run in runs:  # newest first
        number = run.tags.get("sweep.trial_number", "")
        if number.isdigit():
            by_number.setdefault(int(number), run)
    return [to_trial(uri, number, run, metrics) for number, run in sorted(by_number.items())]


def to_trial(uri: str, number: int, run: tracking.RunSummary, metrics: Sequence[str]) -> Trial:
    """A trial from its run: state from the sweeper's tag, the final objective, and for a pruned
    trial the last value its eval reported."""
    state = run.tags.get("sweep.state") or run.status
    if state == "FAIL" and run.tags.get("sweep.error") == "interrupted":
        state = "FAIL (interrupted)"
    names = ["objective"] if len(metrics) == 1 else [f"objective/{i}" for i in range(len(metrics))]
    values = [run.metrics[n] for n in names] if all(n in run.metrics for n in names) else None
    trial = Trial(number, run, state, values if state == "COMPLETE" else None)
    if state == "PRUNED" and len(metrics) == 1:
        history = tracking.metric_history(uri, run.run_id, metrics[0])
        trial.last_report = history[-1] if history else None
    return trial


def best_numbers(parent: tracking.RunSummary, trials: Sequence[Trial], directions: Sequence[str]) -> List[int]:
    """The best trial as the sweeper tagged it on the parent (or the Pareto front); else the
    top complete trial by the objective."""
    tagged = parent.tags.get("best.trial_numbers") or parent.tags.get("best.trial_number")
    if tagged:
        return [int(n) for n in tagged.split(",") if n.strip().isdigit()]
    ranked = rank(trials, directions, [])
    return [ranked[0].number] if ranked and ranked[0].values is not None else []


def rank(trials: Sequence[Trial], directions: Sequence[str], best: Sequence[int]) -> List[Trial]:
    """Complete trials best first (the best trial or front, then by objective, ties by number),
    then pruned, failed and other trials by number."""
    sign = [-1 if d == "maximize" else 1 for d in directions]
    done = sorted((t for t in trials if t.values is not None),
                  key=lambda t: (t.number not in best, [s * v for s, v in zip(sign, t.values)], t.number))
    rest = sorted((t for t in trials if t.values is None),
                  key=lambda t: (STATE_ORDER.get(t.state.split()[0], 3), t.number))
    return done + rest


def load_sweep(source: str, uri: Optional[str] = None) -> SweepReport:
    """Find the sweep (a folder or a parent run id) and read its trials from MLflow."""
    uri, parent = locate(source, uri)
    metrics, directions = objective_of(parent)
    trials = child_trials(uri, parent, metrics)
    best = best_numbers(parent, trials, directions)
    return SweepReport(uri, parent, metrics, directions, swept_keys(parent), rank(trials, directions, best), best)


# -- the table


def fmt(value: Any) -> str:
    """A cell: numbers (or numeric strings) to 4 significant digits, '-' for missing."""
    if value is None:
        return "-"
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(number):
        return "-"
    return f"{number:.4g}"


def fmt_duration(seconds: Optional[float]) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)} min {secs:.0f} s" if minutes else f"{secs:.1f} s"


def objective_cell(trial: Trial) -> str:
    """The final objective, or a pruned trial's last reported value and its step."""
    if trial.values is not None:
        return ", ".join(fmt(v) for v in trial.values)
    if trial.last_report is not None:
        return f"{fmt(trial.last_report[1])} (step {trial.last_report[0]})"
    return "-"


def table_rows(report: SweepReport) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of the trials table, best first."""
    header = ["trial", *report.columns(), "state", "objective", *EVAL_COLUMNS, "duration"]
    rows = []
    for t in report.trials:
        rows.append([str(t.number), *(fmt(t.param(k)) for k in report.columns()), t.state, objective_cell(t),
                     *(fmt(t.run.metrics.get(m)) for m in EVAL_COLUMNS), fmt_duration(t.duration_s)])
    return header, rows


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with aligned columns (readable as plain text too)."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def rerun_command(report: SweepReport, trial: Trial) -> str:
    """The command that trains the trial's setting alone: the sweep's fixed overrides and the
    trial's values."""
    fixed = report.parent.tags.get("sweep.fixed_overrides", "")
    values = " ".join(f"{k}={trial.param(k)}" for k in report.keys)
    return " ".join(p for p in ("python -m dpo_sweep", fixed, values) if p)


def summary_lines(report: SweepReport) -> List[str]:
    """The sweep's settings and counts, as markdown list items."""
    tags, counts = report.parent.tags, {}
    for t in report.trials:
        counts[t.state] = counts.get(t.state, 0) + 1
    space = "; ".join(f"`{k}={tags['space.' + k]}`" for k in report.keys) or "none (fixed overrides only)"
    start, end = report.parent.start_time, report.parent.end_time
    wall = fmt_duration((end - start) / 1000) if start and end else f"- (the sweep is {report.parent.status})"
    total = fmt_duration(sum(t.duration_s or 0 for t in report.trials))
    return [
        f"- objective: {report.objective_label}",
        f"- trials: {len(report.trials)} ({', '.join(f'{n} {s}' for s, n in counts.items()) or 'none yet'})",
        f"- search space: {space}",
        f"- sampler: {tags.get('sweep.sampler', '-')}, pruner: {tags.get('sweep.pruner', '-')}, "
        f"n_trials: {tags.get('sweep.n_trials', '-')}",
        f"- fixed overrides: `{tags.get('sweep.fixed_overrides') or '(none)'}`",
        f"- wall time: {wall} (the sweep's parent run, start to end); the trials' runs: {total} in all",
        f"- MLflow: parent run `{report.parent.run_id}` ({report.parent.name}, {report.parent.status}) "
        f"in `{report.uri}`",
    ]


def best_section(report: SweepReport) -> List[str]:
    """The best setting (or the Pareto front), with how to train it again."""
    best = [t for t in report.trials if t.number in report.best and t.values is not None]
    if not best:
        return ["No trial completed: there is no best setting."]
    lines = []
    for t in best:
        setting = ", ".join(f"{k} = {fmt(t.param(k))}" for k in report.keys) or "the fixed overrides"
        evals = ", ".join(f"{m} = {fmt(t.run.metrics.get(m))}" for m in EVAL_COLUMNS)
        lines += [
            f"**Trial {t.number}**: {setting}; objective {report.objective_label} = {objective_cell(t)} ({evals}).",
            "",
            f"Run folder `{t.run.tags.get('run_dir', '-')}`, MLflow run `{t.run.run_id}`. Rerun that trial "
            f"exactly: `python -m dpo_sweep.reproduce {t.run.tags.get('run_dir', t.run.run_id)}`; train the "
            f"setting alone: `{rerun_command(report, t)}`.",
            "",
        ]
    return lines[:-1]


def results_markdown(report: SweepReport) -> str:
    """results.md: the summary, the table of every trial, the best setting, the errors."""
    header, rows = table_rows(report)
    errors = [f"- trial {t.number}: {t.run.tags['sweep.error']}" for t in report.trials
              if t.state.startswith("FAIL") and "sweep.error" in t.run.tags]
    parts = [
        f"# Sweep `{report.study}`", "", *summary_lines(report), "",
        "## Trials, best first", "",
        f"`objective` is the final {report.objective_label}; for a pruned trial, the last value its eval "
        f"reported and the step. The eval columns are each trial's last eval.", "",
        markdown_table(header, rows), "",
        "## Best setting", "", *best_section(report), "",
    ]
    if errors:
        parts += ["## Failed trials", "", *errors, ""]
    return "\n".join(parts)


# -- the command


def write_report(report: SweepReport, out_dir: str) -> Dict[str, str]:
    """results.md, curves.png and heatmap.png in `out_dir`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in ("results.md", "curves.png", "heatmap.png")}
    with open(paths["results.md"], "w") as f:
        f.write(results_markdown(report))
    from dpo_sweep.report_plots import curves_figure, objective_figure, save  # matplotlib loads here

    save(curves_figure(report), paths["curves.png"])
    save(objective_figure(report), paths["heatmap.png"])
    return paths


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_sweep.report", description=__doc__.split("\n\n")[0],
                                     epilog="Writes results.md, curves.png and heatmap.png; prints the table.")
    parser.add_argument("sweep", help="a sweep folder (hydra.sweep.dir, with multirun.yaml) or the MLflow run id "
                                      "of a sweep's parent run")
    parser.add_argument("--tracking-uri", help="the MLflow store (default: the one the sweep folder's config names, "
                                               "else $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db)")
    parser.add_argument("--out", help="the folder to write into (default: the sweep folder, or ./report for a run id)")
    args = parser.parse_args(argv)
    try:
        report = load_sweep(args.sweep, args.tracking_uri)
    except (FileNotFoundError, LookupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out_dir = args.out or (args.sweep if os.path.isdir(args.sweep) else "report")
    paths = write_report(report, out_dir)
    print(f"sweep {report.study}: {report.objective_label}")
    print(markdown_table(*table_rows(report)))
    print("\n".join(best_section(report)))
    print("written: " + ", ".join(paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
