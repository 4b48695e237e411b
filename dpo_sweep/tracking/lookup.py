"""Runs found or changed by id, outside a Tracker: for the sweeper, reproduce and the report."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple


from dpo_sweep import credentials, names
from dpo_sweep.tracking.store import MAX_PARAM_LENGTH, RetryingClient

log = logging.getLogger(__name__)


# -- helpers for the sweeper and for reproduce: runs found or changed by id, outside a Tracker


@dataclass
class RunSummary:
    """What the sweeper and reproduce need of a logged run."""

    run_id: str
    name: str
    status: str  # RUNNING | FINISHED | FAILED | KILLED
    tags: Dict[str, str]
    params: Dict[str, str]
    metrics: Dict[str, float]  # the latest value of each metric
    experiment_id: str = ""
    start_time: Optional[int] = None  # ms since the epoch
    end_time: Optional[int] = None  # ms since the epoch; None while the run is RUNNING


def _summary(run) -> RunSummary:
    return RunSummary(run.info.run_id, run.info.run_name, run.info.status, dict(run.data.tags),
                      dict(run.data.params), dict(run.data.metrics), run.info.experiment_id,
                      run.info.start_time, run.info.end_time)


def _search(client: RetryingClient, experiment_ids: List[str], filter_string: str) -> List[RunSummary]:
    """Runs of these experiments matching an MLflow filter, newest first."""
    if not experiment_ids:
        return []
    runs = client.search_runs(experiment_ids, filter_string, max_results=10000, order_by=["start_time DESC"])
    return [_summary(r) for r in runs]


def find_runs(uri: str, experiment: str, filter_string: str = "") -> List[RunSummary]:
    """Runs of `experiment` matching an MLflow filter (tags.`sweep.study_name` = 'x'), newest first."""
    client = RetryingClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return _search(client, [exp.experiment_id] if exp else [], filter_string)


def by_trial_number(runs: List[RunSummary]) -> Dict[int, RunSummary]:
    """A sweep's trial runs by their trial number; of several runs with one number, the first
    (the newest, as `find_runs` orders them)."""
    out: Dict[int, RunSummary] = {}
    for run in runs:
        number = run.tags.get(names.TRIAL_NUMBER, "")
        if number.isdigit():
            out.setdefault(int(number), run)
    return out


def get_run(uri: str, run_id: str) -> Optional[RunSummary]:
    """The run with this id, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return _summary(RetryingClient(uri).get_run(run_id))
    except MlflowException:
        return None


def register_model(uri: str, run_id: str, name: str, alias: str) -> Optional[str]:
    """Register the logged model of run `run_id` (its tag names it) as a new version of the
    registered model `name`, with `alias` moved to it. Returns the version, or None when the run
    logged no model."""
    client = RetryingClient(uri)
    run = client.get_run(run_id)
    model_id = run.data.tags.get(names.MODEL_ID)
    if not model_id:
        return None
    try:
        client.get_registered_model(name)
    except Exception:  # not registered yet
        client.create_registered_model(name)
    # The model's artifact location, not `models:/<id>`: MLflow resolves that with a client of the
    # process-wide tracking URI, which need not be this store.
    location = client.get_logged_model(model_id).artifact_location
    version = client.create_model_version(name, source=location, run_id=run_id, model_id=model_id)
    client.set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def log_params(uri: str, run_id: str, params: Dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, credentials.mask(str(v))[:MAX_PARAM_LENGTH]) for k, v in params.items()]
    RetryingClient(uri).log_batch(run_id, params=items)


def set_tags(uri: str, run_id: str, tags: Dict[str, Any]) -> None:
    client = RetryingClient(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, credentials.mask(str(v))[:MAX_PARAM_LENGTH])


def set_status(uri: str, run_id: str, status: str) -> None:
    """End a run with this status (FINISHED, FAILED, KILLED)."""
    RetryingClient(uri).set_terminated(run_id, status=status)


def download_artifacts(uri: str, run_id: str, path: str, dst: str) -> str:
    """Copy the run's artifact `path` (a file or folder) into `dst`; return the local path."""
    os.makedirs(dst, exist_ok=True)
    return RetryingClient(uri).download_artifacts(run_id, path, dst)


# -- helpers for reports: runs of any experiment, metric histories


def find_runs_in_store(uri: str, filter_string: str = "") -> List[RunSummary]:
    """Active runs of every experiment in the store matching an MLflow filter, newest first."""
    client = RetryingClient(uri)
    return _search(client, [e.experiment_id for e in client.search_experiments()], filter_string)


def metric_history(uri: str, run_id: str, key: str) -> List[Tuple[int, float]]:
    """Every logged (step, value) of one metric of a run, by step (the latest value per step)."""
    by_step: Dict[int, Tuple[int, float]] = {}
    for m in RetryingClient(uri).get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [(step, value) for step, (_, value) in sorted(by_step.items())]
