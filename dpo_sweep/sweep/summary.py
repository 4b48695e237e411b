"""The end of a sweep: optimization_results.yaml, the table of every trial, and the results
and plots on the MLflow parent run; then the parent's final status, whatever happens."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import warnings
from typing import Any, Dict, List, Sequence

import yaml
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import names, paths, results, tracking
from dpo_sweep.config import ConfigError
from dpo_sweep.pairs import DataError
from dpo_sweep.sweep.space import describe
from dpo_sweep.sweep.state import Sweep, SweepError
from dpo_sweep.sweep.study import is_finished

log = logging.getLogger(__name__)
# Parameter importances (a fANOVA fit on the trials) from fewer complete trials than this are noise.
MIN_IMPORTANCE_TRIALS = 10
# Errors that stop a sweep and say what to change: one line, no traceback (sweeper.sweep).
SWEEP_ERRORS = (ConfigError, DataError, FileNotFoundError, SweepError)


def finish(sw: Sweep, status: str) -> None:
    """Write the results and the table, log them and the plots to the parent run, and end the
    parent with `status`, whatever happens on the way."""
    try:
        trials = sw.study.get_trials(deepcopy=False)
        summary = write_results(sw, trials)
        print(results_table(sw, trials), flush=True)
        if sw.parent:
            log_to_parent(sw, trials, summary)
        print(where_results_went(sw), flush=True)
    except Exception:  # the sweep's own outcome matters more than its report
        log.exception("could not write the sweep's results")
    finally:
        if sw.parent:
            sw.parent.end(status)


def where_results_went(sw: Sweep) -> str:
    """The footer of the table: the sweep folder, the MLflow parent run and how to open it, and
    the command that draws the report."""
    from dpo_sweep.console import mlflow_ui_lines

    folder = paths.shown(sw.sweep_dir)
    lines = [f"sweep folder: {folder}"]
    if sw.parent:
        lines += [f"MLflow parent run: {sw.parent.run_id}"]
        lines += mlflow_ui_lines(sw.parent.uri, sw.parent.experiment_id, sw.parent.run_id)
    lines += [f"report: python -m dpo_sweep.report {folder}"]
    return "\n".join(lines)


def interrupted(sweep_dir: str) -> None:
    """After Ctrl-C: one line naming the sweep folder, its finished trials and the command that
    resumes the sweep; exit status 130."""
    from dpo_sweep.console import INTERRUPTED_STATUS, command_line

    sweep_dir = os.path.abspath(sweep_dir)
    done = sorted(int(n) for n in (os.listdir(sweep_dir) if os.path.isdir(sweep_dir) else [])
                  if n.isdigit() and os.path.exists(paths.metrics_file(paths.trial_dir(sweep_dir, int(n)))))
    folder = paths.shown(sweep_dir)
    trials = f"finished trials {', '.join(map(str, done))}" if done else "no finished trial"
    command = command_line({"hydra.sweep.dir": folder})
    print(f"interrupted: saved the sweep folder {folder} ({trials}); resume with: {command}", file=sys.stderr,
          flush=True)
    raise SystemExit(INTERRUPTED_STATUS) from None


def to_result(trial: FrozenTrial) -> results.TrialResult:
    """A study's trial as a result (see dpo_sweep.results)."""
    state = trial.state.name
    last = trial.last_step if trial.state == TrialState.PRUNED else None
    return results.TrialResult(
        number=trial.number, state=state, params=dict(trial.params),
        values=list(trial.values) if trial.state == TrialState.COMPLETE else None,
        interrupted=results.is_interrupted(state, trial.user_attrs),
        last_report=(last, trial.intermediate_values[last]) if last is not None else None,
        duration_s=trial.duration.total_seconds() if trial.duration else None,
        error=trial.user_attrs.get(names.ERROR), built=caches_built(trial), pack=trial.user_attrs.get(names.PACK, ""),
    )


def caches_built(trial: FrozenTrial) -> tuple:
    """The shared caches a finished trial built, as its metrics.json says (names.FOLDER: its folder)."""
    folder = trial.user_attrs.get(names.FOLDER)
    try:
        with open(paths.metrics_file(folder)) as f:
            return tuple(json.load(f).get(names.CACHES_BUILT, ()))
    except (OSError, TypeError, ValueError):
        return ()


def best_trials(sw: Sweep, trials: Sequence[FrozenTrial]) -> List[FrozenTrial]:
    """The best complete trial (single objective), or the Pareto front (several)."""
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return []
    return list(sw.study.best_trials) if sw.multi else [sw.study.best_trial]


def write_results(sw: Sweep, trials: Sequence[FrozenTrial]) -> Dict[str, Any]:
    """optimization_results.yaml in the sweep folder: best params and value, and the counts."""
    best = best_trials(sw, trials)
    summary: Dict[str, Any] = {
        "name": "dpo_optuna", "study_name": sw.study.study_name, "storage": sw.location,
        "objective": dict(zip(sw.metrics, sw.directions)), "search_space": describe(sw.dims),
        "trials": {s: n for s, n in results.counts([to_result(t) for t in trials]).items() if s in results.STATES},
    }
    if sw.multi:
        summary["best_trials"] = [{"number": t.number, "params": t.params, "values": t.values,
                                   "folder": t.user_attrs.get(names.FOLDER)} for t in best]
    else:
        top = best[0] if best else None  # None when no trial completed
        summary.update({
            "best_trial": top.number if top else None, "best_params": top.params if top else None,
            "best_value": top.value if top else None, "best_folder": top.user_attrs.get(names.FOLDER) if top else None,
        })
    with open(paths.results_file(sw.sweep_dir), "w") as f:
        yaml.safe_dump(summary, f, sort_keys=False)
    log.info("results: %s", paths.results_file(sw.sweep_dir))
    return summary


def results_table(sw: Sweep, trials: Sequence[FrozenTrial]) -> str:
    """Every trial of the study, best first: number, params, objective, state, duration; then why
    each failed trial failed."""
    ranked = results.rank([to_result(t) for t in trials], sw.directions, [t.number for t in best_trials(sw, trials)])
    columns = [results.TRIAL, *results.param_columns([d.key for d in sw.dims]), results.OBJECTIVE,
               results.STATE, results.DURATION]
    title = f"study {sw.study.study_name}: {', '.join(f'{m} ({d})' for m, d in zip(sw.metrics, sw.directions))}"
    errors = results.error_lines(ranked)
    body = [title, results.text_table(*results.table_rows(ranked, columns))]
    note = results.duration_note(ranked)
    body += [note] if note else []
    return "\n".join(body + (["failed:"] + [f"  {e}" for e in errors] if errors else []))


def log_to_parent(sw: Sweep, trials: Sequence[FrozenTrial], summary: Dict[str, Any]) -> None:
    """Search space, results, best trial and plots on the parent run."""
    parent = sw.parent
    finished = sum(is_finished(t) for t in trials)
    counts = results.counts([to_result(t) for t in trials])
    parent.log_metrics({f"trials/{k.lower()}": counts[k] for k in (*results.STATES, "INTERRUPTED")}, step=finished)
    best = best_trials(sw, trials)
    if best and not sw.multi:
        parent.log_metrics({"best_value": best[0].value}, step=finished)
        parent.set_tags({names.BEST_TRIAL: best[0].number,
                         **{names.BEST_PREFIX + k: v for k, v in best[0].params.items()}})
        register_best(sw, best[0])
    elif best:
        parent.set_tags({names.BEST_TRIALS: ",".join(str(t.number) for t in best)})
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, paths.SEARCH_SPACE_FILE), "w") as f:
            yaml.safe_dump(describe(sw.dims), f)
        parent.log_artifact(os.path.join(tmp, paths.SEARCH_SPACE_FILE))
        for path in (paths.results_file(sw.sweep_dir), paths.multirun_file(sw.sweep_dir)):
            parent.log_artifact(path)
        saved = save_plots(sw, os.path.join(tmp, "plots"))
        if save_frontier(sw, os.path.join(tmp, "plots")):
            saved.append("frontier.png")
        if saved:
            parent.log_artifact(os.path.join(tmp, "plots"), "plots")


def register_best(sw: Sweep, best: FrozenTrial) -> None:
    """With `tracking.register_best=<name>`: the best trial's logged model (its run saved it:
    `train.save_model=true`) becomes a version of the registered model <name>, alias `best`."""
    from dpo_sweep.sweep.lineage import child_runs

    name = sw.base.tracking.register_best
    if not name:
        return
    run = child_runs(sw).get(best.number)
    version = tracking.register_model(sw.parent.uri, run.run_id, name, "best") if run else None
    if version is None:
        log.warning("tracking.register_best=%s: the best trial (%d) logged no model; set train.save_model=true "
                    "so that every trial logs the model it trained", name, best.number)
        return
    sw.parent.set_tags({names.REGISTERED_MODEL: f"{name} version {version} (alias best)"})
    log.info("MLflow: the best trial's model is %s version %s, alias 'best'", name, version)


def save_frontier(sw: Sweep, folder: str) -> bool:
    """frontier.png (dpo_sweep.report_frontier) from the trials' runs, when they logged it."""
    from dpo_sweep.report_data import load_sweep
    from dpo_sweep.report_frontier import frontier_figure
    from dpo_sweep.report_plots import save

    sw.parent.flush()
    figure = frontier_figure(load_sweep(sw.parent.run_id, sw.parent.uri))
    if figure is None:
        return False
    os.makedirs(folder, exist_ok=True)
    save(figure, os.path.join(folder, "frontier.png"))
    return True


def save_plots(sw: Sweep, folder: str) -> List[str]:
    """Optuna's plots as PNG: optimisation history, parameter importances, and the beta x lr
    contour when both are swept. A plot that cannot be drawn (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    target = (lambda t: t.values[0]) if sw.multi else None
    keys = [d.key for d in sw.dims]
    wanted = {
        "optimization_history.png": lambda: plots.plot_optimization_history(
            sw.study, target=target, target_name=sw.metrics[0]),
    }
    complete = len(sw.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    if complete >= MIN_IMPORTANCE_TRIALS:
        wanted["param_importances.png"] = lambda: plots.plot_param_importances(
            sw.study, target=target, target_name=sw.metrics[0])
    else:
        log.info("param_importances.png not drawn: %d complete trials; importances from fewer than %d say nothing",
                 complete, MIN_IMPORTANCE_TRIALS)
    if "beta" in keys and "optimizer.lr" in keys:
        wanted["contour_beta_lr.png"] = lambda: plots.plot_contour(
            sw.study, params=["beta", "optimizer.lr"], target=target, target_name=sw.metrics[0])
    os.makedirs(folder, exist_ok=True)
    saved = []
    for name, draw in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # matplotlib plots are "experimental" in Optuna
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(os.path.join(folder, name), dpi=100, bbox_inches="tight")
            plt.close(figure)
            saved.append(name)
        except Exception as e:  # e.g. importances need two complete trials
            log.info("plot %s skipped: %s", name, e)
    return saved
