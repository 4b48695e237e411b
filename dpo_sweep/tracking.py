"""MLflow: runs, nesting under a sweep's parent run, params, metrics, artifacts.

The only module that imports mlflow. The store is an explicit absolute URI: `tracking.uri`, else
$MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/outputs/mlflow.db`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

DEFAULT_STORE = os.path.join("outputs", "mlflow.db")
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value


def default_uri(cwd: Optional[str] = None) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(cwd or os.getcwd(), DEFAULT_STORE))


def resolve_uri(uri: Optional[str], cwd: Optional[str] = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cwd)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///") :]
        uri = "sqlite:///" + os.path.abspath(path)  # a relative path would depend on the cwd
    if uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///") :]), exist_ok=True)
    return uri


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
                 parent_run_id: Optional[str] = None, tags: Optional[Dict[str, str]] = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self._create_experiment(experiment)
        all_tags = dict(tags or {})
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags=all_tags)
        self.run_id: str = run.info.run_id
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
    return Tracker(resolve_uri(t.uri, cwd), t.experiment, t.run_name or run_name, t.parent_run_id, tags)
