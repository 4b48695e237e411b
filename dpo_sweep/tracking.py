"""MLflow: runs, nesting under a sweep's parent run, params, metrics, artifacts.

The only module that imports mlflow. The store is an explicit absolute URI: `tracking.uri`, else
$MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/outputs/mlflow.db`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

from omegaconf import DictConfig, OmegaConf

from dpo_sweep import names, paths

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
# SQLite takes one writer at a time: parallel trials sharing a store can find it locked (MLflow
# waits 20 s on a lock, then fails). Such a call is tried again, up to RETRIES times in all.
RETRIES = 6
RETRY_DELAY = 0.5  # seconds before the first retry; doubled before each next one (with jitter)
T = TypeVar("T")


def default_uri(cwd: Optional[str] = None) -> str:
    return "sqlite:///" + paths.default_store(cwd)


def resolve_uri(uri: Optional[str], cwd: Optional[str] = None, create: bool = True) -> str:
    """The absolute store URI: `uri`, else $MLFLOW_TRACKING_URI, else outputs/mlflow.db; a
    relative SQLite path is taken from `cwd` (the folder the run started in). `create` makes the
    SQLite store's folder."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cwd)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///") :]
        uri = "sqlite:///" + os.path.abspath(os.path.join(cwd or os.getcwd(), path))
    if create and uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///") :]), exist_ok=True)
    return uri


def is_transient(error: BaseException) -> bool:
    """Whether a store error goes away by itself: SQLite's "database is locked" (or busy), as
    sqlite3, SQLAlchemy or MLflow (TEMPORARILY_UNAVAILABLE, the cause chained) raise it."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).lower()
        if any(s in text for s in ("database is locked", "database table is locked", "database is busy")):
            return True
        error = error.__cause__ or error.__context__
    return False


def retrying(call: Callable[[], T], attempts: int = RETRIES, delay: float = RETRY_DELAY) -> T:
    """`call()`, tried again after a transient store error (`is_transient`) with a growing pause,
    `attempts` times in all; any other error, or the last one, is raised. A locked SQLite write
    is rolled back, so trying it again never writes twice."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as e:
            if attempt >= attempts or not is_transient(e):
                raise
            pause = delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # jitter: writers do not retry in step
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            attempt += 1
            log.warning("MLflow store busy (%s); try %d of %d in %.1fs", reason, attempt, attempts, pause)
            time.sleep(pause)


class RetryingClient:
    """An MlflowClient whose every call (and its creation, which opens the store) goes through
    `retrying`: parallel trials can share one SQLite store without losing a metric."""

    def __init__(self, uri: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = uri
        self._client = retrying(lambda: MlflowClient(tracking_uri=uri))

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return retrying(lambda: attr(*args, **kwargs))

        return call


def flatten(cfg: DictConfig) -> Dict[str, str]:
    """The resolved config as dotted keys: {"optimizer.lr": "0.0005", ...}."""
    out: Dict[str, str] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = str(node)[:MAX_PARAM_LENGTH]

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


class Tracker:
    """One MLflow run. Metrics are buffered and sent in batches."""

    def __init__(self, uri: str, experiment: str, run_name: Optional[str] = None,
                 parent_run_id: Optional[str] = None, tags: Optional[Dict[str, str]] = None,
                 run_id: Optional[str] = None):
        """Create a run in `experiment` (created if new), or, given `run_id`, go on with that
        existing run (set RUNNING again: a resumed sweep keeps its parent run)."""
        import mlflow

        self.uri = uri
        self.client = RetryingClient(uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self._create_experiment(experiment)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags[names.PARENT_RUN_ID] = parent_run_id
        if run_id:
            self.client.update_run(run_id, status="RUNNING")
            self.run_id: str = run_id
        else:
            self.run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags).info.run_id
        self._buffer: List[Any] = []
        self._metric_cls = mlflow.entities.Metric

    def _create_experiment(self, name: str) -> str:
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the cwd
            location = os.path.join(os.path.dirname(self.uri[len("sqlite:///") :]), "mlartifacts")
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by a parallel process
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                raise
            return exp.experiment_id

    def log_params(self, params: Dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        for k, v in metrics.items():
            v = float(v)
            if math.isfinite(v):
                self._buffer.append(self._metric_cls(k, v, now, step))
        if len(self._buffer) >= 500:
            self.flush()

    def flush(self) -> None:
        for i in range(0, len(self._buffer), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self.run_id, metrics=self._buffer[i : i + 1000])
        self._buffer = []

    def set_tags(self, tags: Dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str, artifact_path: Optional[str] = None) -> None:
        if os.path.isdir(path):
            self.client.log_artifacts(self.run_id, path, artifact_path)
        elif os.path.exists(path):
            self.client.log_artifact(self.run_id, path, artifact_path)

    def log_table(self, rows: List[Dict[str, Any]], artifact_file: str) -> None:
        """Rows of a table as MLflow's table artifact (shown in the run's artifact view)."""
        if rows:
            self.client.log_table(self.run_id, {k: [r[k] for r in rows] for k in rows[0]}, artifact_file)

    def end(self, status: str = "FINISHED") -> None:
        try:
            self.flush()
        finally:
            self.client.set_terminated(self.run_id, status=status)


def start_run(cfg: DictConfig, run_name: Optional[str] = None, cwd: Optional[str] = None) -> Optional[Tracker]:
    """The MLflow run of one training run, or None when tracking is off."""
    t = cfg.tracking
    if not t.enabled:
        return None
    tags = {str(k): str(v) for k, v in (t.tags or {}).items()}
    trial_number = OmegaConf.select(cfg, "sweep.trial_number")
    if trial_number is not None:  # a sweep's trial: findable by study and trial number
        tags.update({names.STUDY_NAME: str(cfg.sweep.study_name), names.TRIAL_NUMBER: str(trial_number)})
        run_name = f"trial-{trial_number}"
    return Tracker(resolve_uri(t.uri, cwd), t.experiment, t.run_name or run_name, t.parent_run_id, tags)


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


def set_tags(uri: str, run_id: str, tags: Dict[str, Any]) -> None:
    client = RetryingClient(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v)[:MAX_PARAM_LENGTH])


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
