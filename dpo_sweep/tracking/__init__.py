"""MLflow: runs, nesting under a sweep's parent run, params, metrics, artifacts.

The only package that imports mlflow. The store is an explicit absolute URI: `tracking.uri`, else
$MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/outputs/mlflow.db`.

| module | what |
| --- | --- |
| `store` | the store's URI, the client that opens it, retries of transient SQLite errors |
| `runs` | `Tracker` (one run: params, metrics, tags, artifacts, data sets, model), `start_run` |
| `lookup` | runs found or changed by id: `RunSummary`, `find_runs`, `get_run`, `set_tags`, ... |
| `lifecycle` | results logged at a run's end and again after a refusal; dead runs ended KILLED |
"""

from dpo_sweep.tracking.lifecycle import (end_dead_runs, log_results, objective_metrics, owner_is_dead,
                                          process_owner, relog_results)
from dpo_sweep.tracking.lookup import (RunSummary, by_trial_number, download_artifacts, find_runs,
                                       find_runs_in_store, get_run, log_params, metric_history, register_model,
                                       set_status, set_tags)
from dpo_sweep.tracking.runs import Tracker, describe, flatten, start_run
from dpo_sweep.tracking.store import (MAX_PARAM_LENGTH, RETRIES, RETRY_DELAY, TRANSIENT, RetryingClient, default_uri,
                                      is_transient, resolve_uri, retrying)

__all__ = [
    "MAX_PARAM_LENGTH", "RETRIES", "RETRY_DELAY", "TRANSIENT", "RetryingClient", "RunSummary", "Tracker",
    "by_trial_number", "default_uri", "describe", "download_artifacts", "end_dead_runs", "find_runs",
    "find_runs_in_store", "flatten", "get_run", "is_transient", "log_params", "log_results", "metric_history",
    "objective_metrics", "owner_is_dead", "process_owner", "register_model", "relog_results", "resolve_uri",
    "retrying", "set_status", "set_tags", "start_run",
]
