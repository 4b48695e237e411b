"""Resuming a killed sweep: the points of interrupted trials run again, each from the newest
checkpoint its interrupted trial left, when that checkpoint fits and is intact; a failed trial
whose training finished (its metrics.json holds the objective) is not trained again: its
results are logged again and its point told COMPLETE (`sweep.loop.recover_finished`)."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import checkpoint, names, paths, tracking
from dpo_sweep.sweep.placement import job_dir, training_overrides
from dpo_sweep.sweep.space import format_params, in_space
from dpo_sweep.sweep.state import Sweep

log = logging.getLogger(__name__)


def retry_points(sw: Sweep) -> List[Dict[str, Any]]:
    """Points whose latest trial was interrupted (no trial took them up again since), oldest
    first, that still lie in the search space. A grid finds them among its pending points."""
    latest: Dict[Tuple[Any, ...], FrozenTrial] = {}
    for t in sw.study.get_trials(deepcopy=False):  # by number: a later trial at a point replaces
        latest[tuple(sorted(t.params.items()))] = t
    return [dict(t.params) for t in latest.values()
            if t.user_attrs.get(names.INTERRUPTED) and in_space(sw.dims, t.params)]


def checkpoint_file(folder: str) -> str:
    """Where a run folder keeps its checkpoint (train.checkpoint_every)."""
    return paths.checkpoint_file(folder)


def trial_folder(sw: Sweep, trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get(names.FOLDER) or job_dir(sw, trial.number))


def resume_source(sw: Sweep, params: Dict[str, Any], job: Sequence[str]) -> Optional[FrozenTrial]:
    """The newest interrupted trial at the point `params` whose folder holds an intact checkpoint
    (`intact_step`) that fits `job` (`same_training`): the furthest this point got, since a
    resumed trial starts from its source's checkpoint and goes on. None when there is none: the
    point then starts from step 0."""
    found = _resume_source(sw, params, job)
    return found[0] if found else None


def _resume_source(sw: Sweep, params: Dict[str, Any], job: Sequence[str]) -> Optional[Tuple[FrozenTrial, int]]:
    """`resume_source`, and the step of its checkpoint."""
    unfit = []
    for t in reversed(sw.study.get_trials(deepcopy=False)):
        folder = trial_folder(sw, t)
        if not (t.user_attrs.get(names.INTERRUPTED) and t.params == params and os.path.isfile(checkpoint_file(folder))):
            continue
        if not same_training(folder, job):
            unfit.append(t.number)
            continue
        step = intact_step(checkpoint_file(folder), t.number)
        if step is not None:
            return t, step
    if unfit:
        log.warning("not resuming from the checkpoints of interrupted trials %s at %s: launched with other "
                    "overrides (see their .hydra/overrides.yaml), or not launched", unfit, format_params(params))
    return None


def intact_step(path: str, number: int) -> Optional[int]:
    """The step of the checkpoint `path` of trial `number` when it is intact; None, with a
    warning naming it, when it is truncated, damaged or unreadable (it is then not used)."""
    try:
        return checkpoint.verified_step(path)
    except checkpoint.CheckpointError as e:
        log.warning("%s: not resuming from this checkpoint of interrupted trial %d; its point goes on from an "
                    "older checkpoint, if any, else from step 0", e, number)
        return None


def same_training(folder: str, job: Sequence[str]) -> bool:
    """Whether the run in `folder` was launched with the training overrides of `job` (from its
    .hydra/overrides.yaml): only then does its checkpoint fit the job."""
    path = paths.overrides_file(folder)
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        saved = yaml.safe_load(f) or []
    return training_overrides(saved) == training_overrides(job)


def place_file(src: str, dst: str) -> None:
    """`src` at `dst`, whole or not at all: a hard link (the trainer replaces its checkpoint
    file rather than writing into it, so the two never change each other), else a copy."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    tmp = f"{dst}.tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    try:
        os.link(src, tmp)
    except OSError:  # another file system, or no hard links there
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def checkpoint_step(path: str) -> int:
    """The optimizer step a checkpoint was written at, once verified (checkpoint.CheckpointError
    if it is not intact)."""
    return checkpoint.verified_step(path)


def resume_from_checkpoint(sw: Sweep, trial: optuna.Trial, job: List[str]) -> None:
    """When `trial` takes up the point of an interrupted trial that left a checkpoint, start it
    there: the checkpoint goes into the trial's folder, `train.resume=true` into its job, and the
    values the interrupted trial reported up to that step into the study (the resumed run does
    not evaluate those steps again). A checkpoint of other training overrides, or one that is
    truncated or damaged (a warning names it), is not used."""
    found = _resume_source(sw, trial.params, job)
    if found is None:
        return
    source, step = found
    target, origin = checkpoint_file(job_dir(sw, trial.number)), checkpoint_file(trial_folder(sw, source))
    if os.path.isfile(checkpoint.manifest_file(origin)):  # first: a checkpoint never stands beside another's manifest
        place_file(checkpoint.manifest_file(origin), checkpoint.manifest_file(target))
    place_file(origin, target)
    job[:] = [o for o in job if not o.startswith("train.resume=")] + ["train.resume=true"]
    trial.set_user_attr(names.RESUMED_FROM, source.number)
    if not sw.multi:  # Optuna keeps intermediate values for single-objective studies only
        for at, value in sorted(source.intermediate_values.items()):
            if at <= step:
                trial.report(value, at)
    log.info("trial %d resumes the point of interrupted trial %d from its checkpoint at step %d",
             trial.number, source.number, step)


def finished_results(sw: Sweep, trial: FrozenTrial) -> Optional[Dict[str, Any]]:
    """What the run of `trial` wrote to its metrics.json when its training finished, if that
    holds finite values of this sweep's objective; None otherwise. (The trial may have failed
    after writing it: its results did not reach MLflow, or its sweeper died before telling it.)"""
    try:
        with open(paths.metrics_file(trial_folder(sw, trial))) as f:
            results = json.load(f)
        metric, values = results["objective_metric"], results["objective"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    metrics = metric if isinstance(metric, list) else [metric]
    values = values if isinstance(values, list) else [values]
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    return results if metrics == sw.metrics and len(values) == len(metrics) and numbers else None


def recoverable(sw: Sweep) -> List[Tuple[FrozenTrial, Dict[str, Any]]]:
    """Failed trials whose training finished (`finished_results`), each the latest trial at its
    point and in the search space, launched with the training overrides the sweep gives that
    point now; oldest first, each with its results."""
    latest: Dict[Tuple[Any, ...], FrozenTrial] = {}
    for t in sw.study.get_trials(deepcopy=False):  # by number: a later trial at a point replaces
        latest[tuple(sorted(t.params.items()))] = t
    found = []
    for t in latest.values():
        if t.state != TrialState.FAIL or not in_space(sw.dims, t.params):
            continue
        results = finished_results(sw, t)
        if results is None:
            continue
        job = list(sw.fixed) + [d.override(t.params[d.key]) for d in sw.dims]
        if same_training(trial_folder(sw, t), job):
            found.append((t, results))
        else:
            log.warning("failed trial %d finished its training, but with other overrides than %s gets now (see its "
                        ".hydra/overrides.yaml): its results are not taken", t.number, format_params(t.params))
    return found


def relog(sw: Sweep, source: FrozenTrial, trial: optuna.Trial, results: Dict[str, Any]) -> None:
    """The MLflow run of `source`'s training (found by its folder; a new one if there is none)
    completed as the run of `trial`, which holds its results: the final metrics and files its
    end did not log, the trial's number and state, FINISHED."""
    if not sw.parent:
        return
    folder, experiment = trial_folder(sw, source), sw.base.tracking.experiment
    runs = [] if "'" in folder else tracking.find_runs(sw.parent.uri, experiment, f"tags.`{names.RUN_DIR}` = '{folder}'")
    tags = {names.STUDY_NAME: sw.study.study_name, names.TRIAL_NUMBER: trial.number,
            names.STATE: TrialState.COMPLETE.name, names.RECOVERED_FROM: source.number}
    run_id = tracking.relog_results(sw.parent.uri, experiment, folder, results, f"trial-{trial.number}", tags,
                                    run_id=runs[0].run_id if runs else None, parent_run_id=sw.parent.run_id,
                                    untag=(names.ERROR, names.INTERRUPTED))
    log.info("MLflow: run %s holds the results of trial %d (the training of failed trial %d), logged again",
             run_id, trial.number, source.number)
