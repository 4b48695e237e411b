"""A sweep read back from its MLflow store: its parent run (found by sweep folder or run id), its
objective and swept keys, and its trials as `results.TrialResult`s. What `python -m dpo_sweep.report`
writes and draws comes from here (`report.py` for the tables, `report_plots.py` for the plots).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import yaml

from dpo_sweep import names, paths, results, tracking

RUN_ID = re.compile(r"[0-9a-f]{32}")
MAIN_KEYS = ("beta", "optimizer.lr")  # always in the table; first in order; the heat map's axes when swept
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
    path = paths.multirun_file(folder)
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
    looked_for = f"a run tagged {names.ROLE}={names.PARENT_ROLE} and {names.FOLDER}={folder}"
    check_store(uri, looked_for)
    parents = [r for r in tracking.find_runs_in_store(uri, f"tags.`{names.ROLE}` = '{names.PARENT_ROLE}'")
               if r.tags.get(names.FOLDER) == folder]
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
    if run.tags.get(names.ROLE) == names.PARENT_ROLE:
        return run
    parent = run.tags.get(names.PARENT_RUN_ID)
    if parent:
        raise LookupError(f"MLflow run {run_id} ({run.name}) is a trial of the sweep whose parent run is "
                          f"{parent}: pass that id")
    raise LookupError(f"MLflow run {run_id} ({run.name}) is not a sweep's parent run (no tag sweep.role=parent)")


# -- the sweep's trials


@dataclass
class Trial(results.TrialResult):
    """One trial of the sweep, as its MLflow run recorded it."""

    run: Optional[tracking.RunSummary] = None

    def param(self, key: str) -> Optional[str]:
        """The logged value of a swept key: `beta`, `optimizer.lr`; a config group swept by
        name (`loss=sigmoid,ipo`) is its `.name`."""
        name = key.lstrip("+~")
        params = self.run.params
        return params.get(name, params.get(f"{name}.name"))


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
        return self.parent.tags.get(names.STUDY_NAME, self.parent.name)

    @property
    def objective_label(self) -> str:
        return ", ".join(f"{m} ({d})" for m, d in zip(self.metrics, self.directions))

    def columns(self) -> List[str]:
        """The param columns of the table: beta and optimizer.lr always, then the other swept keys."""
        return list(MAIN_KEYS) + [k for k in self.keys if k.lstrip("+~") not in MAIN_KEYS]


def objective_of(parent: tracking.RunSummary) -> Tuple[List[str], List[str]]:
    """(metrics, directions) from the parent's tag `sweep.objective`: "m (maximize), ..."."""
    text = parent.tags.get(names.OBJECTIVE, "")
    found = OBJECTIVE_TAG.findall(text)
    if not found:
        raise LookupError(f"MLflow run {parent.run_id} has no sweep.objective tag of the form "
                          f"'<metric> (maximize|minimize)' (found {text!r})")
    return [m for m, _ in found], [d for _, d in found]


def swept_keys(parent: tracking.RunSummary) -> List[str]:
    """The sweep's dimensions from the parent's `space.<key>` tags, beta and optimizer.lr first."""
    keys = [k[len(names.SPACE_PREFIX):] for k in parent.tags if k.startswith(names.SPACE_PREFIX)]
    main = [k for k in MAIN_KEYS if k in keys]
    return main + sorted(k for k in keys if k not in MAIN_KEYS)


def child_trials(uri: str, parent: tracking.RunSummary, metrics: Sequence[str]) -> List[Trial]:
    """The parent's child runs as trials, the newest run of each trial number."""
    runs = tracking.find_runs_in_store(uri, f"tags.`{names.PARENT_RUN_ID}` = '{parent.run_id}'")
    return [to_trial(uri, number, run, metrics) for number, run in sorted(tracking.by_trial_number(runs).items())]


def to_trial(uri: str, number: int, run: tracking.RunSummary, metrics: Sequence[str]) -> Trial:
    """A trial from its run: state from the sweeper's tag, the final objective, and for a pruned
    trial the last value its eval reported."""
    state = run.tags.get(names.STATE) or run.status
    names_ = ["objective"] if len(metrics) == 1 else [f"objective/{i}" for i in range(len(metrics))]
    values = [run.metrics[n] for n in names_] if all(n in run.metrics for n in names_) else None
    duration = (run.end_time - run.start_time) / 1000 if run.start_time and run.end_time else None
    built = tuple(k for k in run.tags.get(names.CACHES_BUILT, "").split(",") if k)
    trial = Trial(number, state, values=values if state == "COMPLETE" else None,
                  interrupted=results.is_interrupted(state, run.tags), duration_s=duration,
                  error=run.tags.get(names.ERROR), built=built, pack=run.tags.get(names.PACK, ""), run=run)
    if state == "PRUNED" and len(metrics) == 1:
        history = tracking.metric_history(uri, run.run_id, metrics[0])
        trial.last_report = history[-1] if history else None
    return trial


def best_numbers(parent: tracking.RunSummary, trials: Sequence[Trial], directions: Sequence[str]) -> List[int]:
    """The best trial as the sweeper tagged it on the parent (or the Pareto front); else the
    top complete trial by the objective."""
    tagged = parent.tags.get(names.BEST_TRIALS) or parent.tags.get(names.BEST_TRIAL)
    if tagged:
        return [int(n) for n in tagged.split(",") if n.strip().isdigit()]
    return results.best_complete(trials, directions)


def load_sweep(source: str, uri: Optional[str] = None) -> SweepReport:
    """Find the sweep (a folder or a parent run id) and read its trials from MLflow."""
    uri, parent = locate(source, uri)
    metrics, directions = objective_of(parent)
    keys = swept_keys(parent)
    trials = child_trials(uri, parent, metrics)
    for t in trials:  # the table shows beta and optimizer.lr whether swept or not
        t.params = {k: t.param(k) for k in dict.fromkeys([*MAIN_KEYS, *keys])}
    best = best_numbers(parent, trials, directions)
    return SweepReport(uri, parent, metrics, directions, keys, results.rank(trials, directions, best), best)
