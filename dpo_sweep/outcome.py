"""A finished run's results, the same for a lone run and a packed trial: the objective read from
its final metrics, `metrics.json` in its folder (first: a store that refuses the results loses
nothing), then its MLflow run's files, final metrics and saved model."""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Dict, List, Tuple, Union

from omegaconf import DictConfig, OmegaConf

from dpo_sweep import names, paths, tracking
from dpo_sweep.config import ConfigError, objective_spec

log = logging.getLogger(__name__)
Objective = Union[float, Tuple[float, ...]]  # one value, or one per metric of a multi-objective sweep


def record_results(cfg: DictConfig, out_dir: str, tracker, metrics: Dict[str, float], step: int, files: List[str],
                   built: List[str], write: bool = True) -> Objective:
    """A finished run's results: metrics.json (when `write`), then its MLflow run: the `files`,
    the caches it `built`, the final metrics and saved config, the saved model. Returns the
    objective."""
    objective = objective_values(cfg, metrics)
    if write:  # the results on disk first: a store that refuses them (full) loses nothing
        spec = [m for m, _ in objective_spec(cfg)]  # `auto` resolved
        metric = spec if OmegaConf.is_list(cfg.objective.metric) else spec[0]
        write_results(out_dir, {"objective": objective, "objective_metric": metric, "step": step,
                                "metrics": metrics, names.CACHES_BUILT: built})
        checkpoints = paths.checkpoint_dir(out_dir)
        if cfg.trainer == "dpo_sweep" and os.path.isdir(checkpoints):
            shutil.rmtree(checkpoints)  # finished: the checkpoint is no longer needed
    if tracker:
        for path in files:
            tracker.log_artifact(path)
        if built:
            tracker.set_tags({names.CACHES_BUILT: ",".join(built)})
        tracking.log_results(tracker, out_dir, objective)
        if cfg.train.save_model and os.path.isdir(paths.model_dir(out_dir)):  # the UI's Model column
            model_id = tracker.log_model(paths.model_dir(out_dir), name="dpo-policy", step=step)
            log.info("model logged to MLflow: models:/%s", model_id)
    return objective


def write_results(out_dir: str, result: Dict[str, Any]) -> None:
    """metrics.json, whole or not at all: a sweep's resume takes a run that has one as finished."""
    path = paths.metrics_file(out_dir)
    with open(f"{path}.tmp", "w") as f:
        json.dump(result, f, indent=2)
    os.replace(f"{path}.tmp", path)


def objective_values(cfg: DictConfig, metrics: Dict[str, float]) -> Objective:
    """The objective metric's final value, or a tuple of them for a multi-objective config."""
    values = []
    for metric, _ in objective_spec(cfg):
        if metric not in metrics:
            raise ConfigError(
                f"config key 'objective.metric' = {metric!r}: not a metric of this run; "
                f"expected one of {', '.join(sorted(metrics))}"
            )
        values.append(metrics[metric])
    return tuple(values) if OmegaConf.is_list(cfg.objective.metric) else values[0]
