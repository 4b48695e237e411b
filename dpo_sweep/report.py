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
import os
import sys
from typing import Dict, List, Optional, Tuple

from dpo_sweep import names, paths, report_plots, results
from dpo_sweep.report_data import SweepReport, Trial, load_sweep
from dpo_sweep.report_frontier import frontier_figure

EVAL_COLUMNS = ("eval/rewards/accuracies", "eval/rewards/margins")
GEN_COLUMNS = ("eval/gen/reward", "eval/gen/win_rate", "eval/gen/kl")  # when the trials logged them


# -- the table


def table_rows(report: SweepReport) -> Tuple[List[str], List[List[str]]]:
    """(header, rows) of the trials table, best first."""
    evals = [(m, lambda t, m=m: results.fmt(t.run.metrics.get(m))) for m in EVAL_COLUMNS]
    gen = [(m, lambda t, m=m: results.fmt(t.run.metrics.get(m))) for m in GEN_COLUMNS
           if any(m in t.run.metrics for t in report.trials)]
    columns = [results.TRIAL, *results.param_columns(report.columns()), results.STATE, results.OBJECTIVE,
               *gen, *evals, results.DURATION]
    if len(report.metrics) > 1:  # a multi-objective sweep: its Pareto front
        columns.insert(1, ("pareto", lambda t: "yes" if t.number in report.best else ""))
    return results.table_rows(report.trials, columns)


def rerun_command(report: SweepReport, trial: Trial) -> str:
    """The command that trains the trial's setting alone: the sweep's fixed overrides and the
    trial's values."""
    fixed = report.parent.tags.get(names.FIXED_OVERRIDES, "")
    values = " ".join(f"{k}={trial.param(k)}" for k in report.keys)
    return " ".join(p for p in ("python -m dpo_sweep", fixed, values) if p)


def summary_lines(report: SweepReport) -> List[str]:
    """The sweep's settings and counts, as markdown list items."""
    tags = report.parent.tags
    space = "; ".join(f"`{k}={tags[names.SPACE_PREFIX + k]}`" for k in report.keys) or "none (fixed overrides only)"
    start, end = report.parent.start_time, report.parent.end_time
    wall = results.fmt_duration((end - start) / 1000) if start and end else f"- (the sweep is {report.parent.status})"
    total = results.fmt_duration(sum(t.duration_s or 0 for t in report.trials))
    return [
        f"- objective: {report.objective_label}",
        f"- trials: {len(report.trials)} ({results.describe_counts(report.trials)})",
        f"- search space: {space}",
        f"- sampler: {tags.get(names.SAMPLER, '-')}, pruner: {tags.get(names.PRUNER, '-')}, "
        f"n_trials: {tags.get(names.N_TRIALS, '-')}",
        f"- fixed overrides: `{tags.get(names.FIXED_OVERRIDES) or '(none)'}`",
        f"- wall time: {wall} (the sweep's parent run, start to end); the trials' runs: {total} in all",
        f"- MLflow: parent run `{report.parent.run_id}` ({report.parent.name}, {report.parent.status}) "
        f"in `{paths.shown(report.uri)}`",
    ]


def best_section(report: SweepReport) -> List[str]:
    """The best setting (or the Pareto front), with how to train it again."""
    best = [t for t in report.trials if t.number in report.best and t.values is not None]
    if not best:
        return ["No trial completed: there is no best setting."]
    lines = []
    for t in best:
        setting = ", ".join(f"{k} = {results.fmt(t.param(k))}" for k in report.keys) or "the fixed overrides"
        evals = ", ".join(f"{m} = {results.fmt(t.run.metrics.get(m))}" for m in EVAL_COLUMNS)
        run_dir = t.run.tags.get(names.RUN_DIR)
        run_dir = paths.shown(run_dir) if run_dir else None
        lines += [
            f"**Trial {t.number}**: {setting}; objective {report.objective_label} = {results.objective_cell(t)} ({evals}).",
            "",
            f"Run folder `{run_dir or '-'}`, MLflow run `{t.run.run_id}`. Rerun that trial "
            f"exactly: `python -m dpo_sweep.reproduce {run_dir or t.run.run_id}`; train the "
            f"setting alone: `{rerun_command(report, t)}`.",
            "",
        ]
    return lines[:-1]


def results_markdown(report: SweepReport) -> str:
    """results.md: the summary, the table of every trial, the best setting, the errors."""
    header, rows = table_rows(report)
    errors = [f"- {line}" for line in results.error_lines(report.trials)]
    parts = [
        f"# Sweep `{report.study}`", "", *summary_lines(report), "",
        "## Trials, best first", "",
        f"`objective` is the final {report.objective_label}; for a pruned trial, the last value its eval "
        f"reported and the step. The eval columns are each trial's last eval.", "",
        results.markdown_table(header, rows), "",
        *([results.duration_note(report.trials), ""] if results.duration_note(report.trials) else []),
        "## Best setting", "", *best_section(report), "",
    ]
    if errors:
        parts += ["## Failed trials", "", *errors, ""]
    return "\n".join(parts)


# -- the command


def write_report(report: SweepReport, out_dir: str) -> Dict[str, str]:
    """results.md, curves.png, heatmap.png and (when the trials logged eval/gen/kl and
    eval/gen/reward) frontier.png in `out_dir`; return their paths."""
    os.makedirs(out_dir, exist_ok=True)
    written = {name: os.path.join(out_dir, name) for name in ("results.md", "curves.png", "heatmap.png")}
    with open(written["results.md"], "w") as f:
        f.write(results_markdown(report))
    report_plots.save(report_plots.curves_figure(report), written["curves.png"])
    report_plots.save(report_plots.objective_figure(report), written["heatmap.png"])
    frontier = frontier_figure(report)
    if frontier is not None:
        written["frontier.png"] = os.path.join(out_dir, "frontier.png")
        report_plots.save(frontier, written["frontier.png"])
    return written


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
    written = write_report(report, out_dir)
    print(f"sweep {report.study}: {report.objective_label}")
    print(results.markdown_table(*table_rows(report)))
    print("\n".join(best_section(report)))
    print("written: " + ", ".join(paths.shown(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
