"""One trial's life in the sweep: asked (at a pending grid point or by the sampler), launched
through Hydra's launcher, told to the study with its MLflow run tagged; and how many failed."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import names, paths
from dpo_sweep.sweep.lineage import tag_child_runs
from dpo_sweep.sweep.placement import job_dir, pin_gpus, trial_overrides
from dpo_sweep.sweep.resume import resume_from_checkpoint, retry_points
from dpo_sweep.sweep.space import format_params, grid_points
from dpo_sweep.sweep.state import Sweep, SweepError
from dpo_sweep.sweep.study import (is_finished, owner_id)


log = logging.getLogger(__name__)


def record(sw: Sweep, batch: Sequence[optuna.Trial], results: Sequence[Any]) -> List[FrozenTrial]:
    """Tell the study how each trial of a launch ended, and tag their MLflow runs."""
    told = [tell(sw, trial, result) for trial, result in zip(batch, results)]
    if sw.parent:
        tag_child_runs(sw, told)
    return told


def count_failed(told: Sequence[FrozenTrial]) -> int:
    return sum(t.state == TrialState.FAIL for t in told)


def too_many_failures(sw: Sweep, failed: int, planned: int) -> Optional[SweepError]:
    """The error that stops the sweep once more than `max_failure_rate` of its trials failed."""
    if failed <= sw.settings.max_failure_rate * planned:
        return None
    return SweepError(f"{failed} of {planned} trials failed, more than hydra.sweeper.max_failure_rate="
                      f"{sw.settings.max_failure_rate} allows; the errors are in the table above")


def planned_trials(sw: Sweep) -> int:
    """How many trials this invocation runs: the grid's pending points and/or what is left of
    `n_trials` once the study's finished trials are counted."""
    finished = sum(is_finished(t) for t in sw.study.get_trials(deepcopy=False))
    budget = None if sw.settings.n_trials is None else max(0, sw.settings.n_trials - finished)
    if not sw.grid:
        return budget
    pending = len(pending_points(sw))
    return pending if budget is None else min(pending, budget)


def pending_points(sw: Sweep) -> List[Dict[str, Any]]:
    """Grid points that no counted or running trial of the study has taken yet, in order."""
    keys = [d.key for d in sw.dims]
    taken = {tuple(t.params.get(k) for k in keys) for t in sw.study.get_trials(deepcopy=False)
             if is_finished(t) or t.state == TrialState.RUNNING}
    return [p for p in grid_points(sw.dims) if tuple(p[k] for k in keys) not in taken]


def ask_batch(sw: Sweep, size: int) -> List[optuna.Trial]:
    """Ask up to `size` trials: the next grid points; or, sampling, the points of interrupted
    trials first (they run again), then the sampler's choice."""
    distributions = {d.key: d.distribution for d in sw.dims}
    points = pending_points(sw) if sw.grid else retry_points(sw)
    trials = [ask_at(sw, point, distributions) for point in points[:size]]
    if not sw.grid:
        trials += [mark_owner(sw, sw.study.ask(distributions)) for _ in range(size - len(trials))]
    return trials


def ask_at(sw: Sweep, point: Dict[str, Any], distributions: Dict[str, BaseDistribution]) -> optuna.Trial:
    """A trial at a given point: its parameters fixed, not sampled."""
    return mark_owner(sw, ask_fixed(sw, point, distributions))


def ask_fixed(sw: Sweep, point: Dict[str, Any], distributions: Dict[str, BaseDistribution]) -> optuna.Trial:
    """A trial at `point`, not yet marked as this invocation's (`mark_owner`)."""
    base_sampler = sw.study.sampler
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sw.study.sampler = optuna.samplers.PartialFixedSampler(point, base_sampler)
        return sw.study.ask(distributions)
    finally:
        sw.study.sampler = base_sampler


def mark_owner(sw: Sweep, trial: optuna.Trial) -> optuna.Trial:
    trial.set_user_attr(names.OWNER, owner_id())
    trial.set_user_attr(names.FOLDER, job_dir(sw, trial.number))
    sw.asked.append(trial.number)
    return trial


def launch(sweeper, sw: Sweep, batch: List[optuna.Trial]) -> Sequence[Any]:
    """Run a batch through Hydra's launcher; a batch that cannot start fails its trials."""
    jobs = prepare_launch(sweeper, sw, batch)
    try:
        return launch_jobs(sweeper, sw, batch, jobs)
    except BaseException as e:  # Ctrl-C: the batch's trials did not finish
        give_up(sw, batch, e, interrupted=not isinstance(e, Exception))
        raise


def prepare_launch(sweeper, sw: Sweep, batch: List[optuna.Trial],
                   slots: Optional[Sequence[int]] = None) -> List[List[str]]:
    """The batch's jobs, ready for the launcher: GPUs pinned by worker slot (`slots`; by default
    each trial's place in the batch), folders checked free, checkpoints to resume from put in
    place, overrides checked by Hydra. A batch that cannot start fails its trials, and raises."""
    try:
        jobs = pin_gpus(sweeper, sw, [trial_overrides(sw, t) for t in batch], slots)
        check_folders_free(sw, batch)
        for trial, job in zip(batch, jobs):
            resume_from_checkpoint(sw, trial, job)
        sweeper.validate_batch_is_legal(jobs)
    except BaseException as e:  # Ctrl-C included: they run again when the sweep resumes
        give_up(sw, batch, e, interrupted=not isinstance(e, Exception))
        raise
    for trial, job in zip(batch, jobs):
        log.info("trial %d: %s", trial.number, " ".join(job[len(sw.fixed): len(sw.fixed) + len(sw.dims)]))
    return jobs


def launch_jobs(sweeper, sw: Sweep, batch: List[optuna.Trial], jobs: List[List[str]]) -> Sequence[Any]:
    """The launcher's results for the batch's jobs (job numbers are trial numbers); when a job
    died (killed, preempted) and the launcher gave up on the whole batch, a `FolderResult` each."""
    try:
        return sweeper.launcher.launch(jobs, initial_job_idx=batch[0].number)
    except Exception as e:
        log.error("the launcher failed for trials %s: %s: %s", [t.number for t in batch], type(e).__name__, e)
        return [FolderResult(job_dir(sw, trial.number), e) for trial in batch]


def give_up(sw: Sweep, trials: Sequence[optuna.Trial], error: BaseException, interrupted: bool) -> None:
    """Tell FAIL the trials that did not finish, with why; `interrupted` ones run again when the
    sweep resumes."""
    for trial in trials:
        if interrupted:
            trial.set_user_attr(names.INTERRUPTED, True)
        trial.set_user_attr(names.ERROR, f"not finished: {type(error).__name__}: {error}"[:1000])
        sw.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)


def check_folders_free(sw: Sweep, batch: Sequence[optuna.Trial]) -> None:
    for trial in batch:
        folder = job_dir(sw, trial.number)
        if os.path.isdir(folder) and os.listdir(folder):
            raise SweepError(f"job folder {folder} is already in use (by a trial of another study?): "
                             f"resume with the same hydra.sweeper.study_name, or use a new hydra.sweep.dir")


@dataclass
class FolderResult:
    """A trial's result when the launcher failed for its batch as a whole: what the trial wrote to
    its metrics.json if it finished, else the launcher's error (the trial is then told FAIL)."""

    folder: str
    error: Exception

    @property
    def return_value(self) -> Any:
        path = paths.metrics_file(self.folder)
        if not os.path.exists(path):
            raise SweepError(f"the trial's job died before it finished ({type(self.error).__name__}: {self.error})")
        with open(path) as f:
            objective = json.load(f)["objective"]
        return tuple(objective) if isinstance(objective, list) else objective


def tell(sw: Sweep, trial: optuna.Trial, result) -> FrozenTrial:
    """Tell the study how a trial ended: COMPLETE with its value(s), PRUNED, or FAIL with why."""
    try:
        value = result.return_value  # raises the trial's exception
    except optuna.TrialPruned as e:
        log.info("trial %d PRUNED: %s", trial.number, e)
        return sw.study.tell(trial, state=TrialState.PRUNED)
    except Exception as e:
        return fail(sw, trial, f"{type(e).__name__}: {e}", e)
    values = list(value) if isinstance(value, (tuple, list)) else [value]
    if len(values) != len(sw.metrics) or not all(isinstance(v, (int, float)) for v in values):
        return fail(sw, trial, f"the run returned {value!r}; expected {len(sw.metrics)} number(s) for {sw.metrics}")
    if not all(math.isfinite(v) for v in values):
        return fail(sw, trial, f"non-finite objective {value!r} ({', '.join(sw.metrics)})")
    done = sw.study.tell(trial, values)
    log.info("trial %d COMPLETE: %s = %s (%s)", trial.number, ", ".join(sw.metrics),
             ", ".join(f"{v:.6g}" for v in values), format_params(done.params))
    return done


def fail(sw: Sweep, trial: optuna.Trial, error: str, exc: Optional[BaseException] = None) -> FrozenTrial:
    log.error("trial %d FAIL: %s", trial.number, error, exc_info=exc if exc and exc.__traceback__ else None)
    trial.set_user_attr(names.ERROR, error[:1000])
    return sw.study.tell(trial, state=TrialState.FAIL)
