"""A sweep trial's side of pruning: report the objective at each eval to the study (its
intermediate values) and stop the run when the study's pruner says so.

`run.py` attaches `trial_reporter` as an `on_eval` callback of the trainer when the run is a trial
(`sweep.trial_number` is set by the sweeper). Under torchrun rank 0 alone reports and asks the
pruner, and its decision is broadcast, so that all ranks stop at the same step or none does.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Tuple

import optuna
from omegaconf import DictConfig

from dpo_sweep import distributed, names
from dpo_sweep.config import objective_spec
from dpo_sweep.sweep.study import build_pruner, open_storage
from dpo_sweep.trainer import TrialStopped


class PrunedTrial(TrialStopped, optuna.TrialPruned):
    """Raised inside a trial when the study's pruner stops it: PRUNED in Optuna, KILLED in MLflow."""


def trial_reporter(cfg: DictConfig, total_steps: int) -> Callable[[int, Dict[str, float]], None]:
    """An `on_eval` callback for a sweep trial: report the objective at each eval to the study
    and raise PrunedTrial when the study's pruner says so. The final eval is reported but never
    pruned: a trial that got there completes."""
    (metric, _), *more = objective_spec(cfg)
    if more:
        return lambda step, metrics: None  # Optuna reports and prunes single-objective studies only
    trial, pruner_name = open_trial(cfg) if distributed.is_main() else (None, "")

    def report(step: int, metrics: Dict[str, float]) -> None:
        value = metrics.get(metric)
        prune = trial is not None and report_and_decide(trial, value, step, total_steps)
        if distributed.broadcast_flag(prune):
            shown = f"{value:.4g}" if value is not None else "?"
            raise PrunedTrial(f"trial {cfg.sweep.trial_number} pruned by the {pruner_name or 'study'} pruner at "
                              f"step {step}: {metric} = {shown}")

    return report


def open_trial(cfg: DictConfig) -> Tuple[optuna.Trial, str]:
    """The running trial `sweep.trial_number` of the study, with the study's pruner (and its name)."""
    storage = open_storage(cfg.sweep.storage)
    study_id = storage.get_study_id_from_name(cfg.sweep.study_name)
    spec = storage.get_study_user_attrs(study_id).get(names.PRUNER) or {"name": "none", "kwargs": {}}
    pruner = build_pruner(spec["name"], spec["kwargs"])
    study = optuna.load_study(study_name=cfg.sweep.study_name, storage=storage, pruner=pruner,
                              sampler=optuna.samplers.RandomSampler())  # never samples: the params are set
    trial = optuna.Trial(study, storage.get_trial_id_from_study_id_trial_number(study_id, cfg.sweep.trial_number))
    return trial, spec["name"]


def report_and_decide(trial: optuna.Trial, value: Optional[float], step: int, total_steps: int) -> bool:
    """Report `value` at `step`; whether the pruner stops the trial there (never at the last step,
    never on a missing or non-finite value)."""
    if value is None or not math.isfinite(value):
        return False
    trial.report(float(value), step)
    return step < total_steps and trial.should_prune()
