"""The sweep loop: prepare everything before any trial, then ask a batch of trials, launch it
through Hydra's launcher, tell the study how each trial ended, until the grid or `n_trials` is
done. The end (results, table, plots, the parent's status) comes whatever happens."""

from __future__ import annotations

import json
import logging
import math
import os
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

import optuna
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import names, paths, tracking
from dpo_sweep.config import objective_spec
from dpo_sweep.preflight import check_points
from dpo_sweep.sweep.lineage import open_parent, settle_child_runs, tag_child_runs
from dpo_sweep.sweep.placement import job_dir, pin_gpus, trial_overrides
from dpo_sweep.sweep.resume import recoverable, relog, resume_from_checkpoint, retry_points, trial_folder
from dpo_sweep.sweep.settings import SweepSettings, check_grid
from dpo_sweep.sweep.space import describe, format_params, grid_points, parse_search_space
from dpo_sweep.sweep.state import Sweep, SweepError
from dpo_sweep.sweep.study import (build_pruner, build_sampler, claim_folder, is_finished, open_storage, open_study,
                                   owner_id, recover_interrupted, storage_location)
from dpo_sweep.sweep.summary import finish

log = logging.getLogger(__name__)


def run_sweep(sweeper, arguments: List[str]) -> List[Sequence[Any]]:
    """Run a sweep for the Hydra sweeper `sweeper` (its config, launcher and config loader);
    return the launcher's results, batch by batch."""
    sw = prepare(sweeper, arguments)
    status = "FAILED"
    try:
        if sw.parent:
            settle_child_runs(sw)  # runs a killed sweeper left RUNNING, or untagged
            tracking.end_dead_runs(sw.parent.uri, sw.base.tracking.experiment, sw.sweep_dir, below=True)
        recover_finished(sw)
        returns = run_batches(sweeper, sw)
        status = "FINISHED"
        return returns
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        finish(sw, status)


def prepare(sweeper, arguments: List[str]) -> Sweep:
    """Parse and check everything, open the study, create the parent run: before any trial."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep logs each trial itself
    settings = SweepSettings.from_config(sweeper.settings)
    dims, fixed = parse_search_space(settings.params, arguments, sweeper.hydra_context.config_loader)
    grid = settings.is_grid()
    check_grid(dims, settings, grid)
    base = sweeper.hydra_context.config_loader.load_sweep_config(sweeper.config, list(fixed))
    # Every point's config (the Preflight callback did this before the sweep; again here for a
    # sweeper started without it). The base alone is not checked: its swept keys are defaults.
    check_points(sweeper.hydra_context.config_loader, sweeper.config, arguments, fixed, dims)
    metrics, directions = map(list, zip(*objective_spec(base)))
    sweep_dir = os.path.abspath(str(sweeper.config.hydra.sweep.dir))
    os.makedirs(sweep_dir, exist_ok=True)
    claim_folder(sweep_dir)  # before anything in it is written: one sweeper per folder
    OmegaConf.save(sweeper.config, paths.multirun_file(sweep_dir))
    location = storage_location(settings.storage, sweep_dir)
    storage = open_storage(location)
    study = open_study(storage, settings.study_name or os.path.basename(sweep_dir), directions)
    sw = Sweep(settings, dims, fixed, base, sweep_dir, location, storage, study, metrics, directions, grid)
    set_sampler_and_pruner(sw)
    sw.interrupted = [t.number for t in recover_interrupted(study, storage)]
    log.info("study '%s' in %s: %d finished trials; search space %s; rerun with hydra.sweep.dir=%s to resume",
             study.study_name, location, sum(is_finished(t) for t in study.get_trials(deepcopy=False)),
             describe(dims) or "empty (fixed overrides only)", sweep_dir)
    sw.parent = open_parent(sw)  # last: nothing that can fail comes between it and run_sweep's finally
    return sw


def set_sampler_and_pruner(sw: Sweep) -> None:
    """The study's sampler (seeded, and offset by the trials already in the study, so that a
    resumed sweep does not repeat points) and the pruner each trial reads from the study."""
    settings = sw.settings
    seed = None if settings.seed is None else settings.seed + len(sw.study.get_trials(deepcopy=False))
    sw.study.sampler = build_sampler(settings.sampler, seed, settings.sampler_kwargs)
    pruner = settings.pruner
    if sw.multi and pruner != "none":
        log.warning("hydra.sweeper.pruner.name=%s: Optuna cannot prune a multi-objective study; pruning is off", pruner)
        pruner = "none"
    build_pruner(pruner, settings.pruner_kwargs)  # a bad name or argument fails here, not in every trial
    sw.study.set_user_attr(names.PRUNER, {"name": pruner, "kwargs": settings.pruner_kwargs})


def run_batches(sweeper, sw: Sweep) -> List[Sequence[Any]]:
    """Ask, launch and tell batches of trials until the grid or `n_trials` is done."""
    planned = planned_trials(sw)
    log.info("%d trials to run, %d at a time", planned, sw.settings.n_jobs)
    returns, failed = [], 0
    while len(sw.asked) < planned:
        batch = ask_batch(sw, min(sw.settings.n_jobs, planned - len(sw.asked)))
        if not batch:
            break
        results = launch(sweeper, sw, batch)
        told = [tell(sw, trial, result) for trial, result in zip(batch, results)]
        failed += sum(t.state == TrialState.FAIL for t in told)
        if sw.parent:
            tag_child_runs(sw, told)
        returns.append(results)
        if failed > sw.settings.max_failure_rate * planned:
            raise SweepError(f"{failed} of {planned} trials failed, more than hydra.sweeper.max_failure_rate="
                             f"{sw.settings.max_failure_rate} allows; the errors are in the table above")
    return returns


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


def recover_finished(sw: Sweep) -> List[FrozenTrial]:
    """Points whose latest trial failed after its training finished (its metrics.json holds the
    objective; a full disk under the MLflow store refused the results, or the sweeper died
    before telling them): each told COMPLETE under a new trial number with those values, its
    MLflow run completed (`relog`), never trained again. Not counted among this invocation's
    trials; when the MLflow store still refuses, the new trial is interrupted and the sweep stops."""
    distributions = {d.key: d.distribution for d in sw.dims}
    told = []
    for source, results in recoverable(sw):
        trial = ask_fixed(sw, dict(source.params), distributions)
        trial.set_user_attr(names.OWNER, owner_id())
        trial.set_user_attr(names.FOLDER, trial_folder(sw, source))  # where its results are
        trial.set_user_attr(names.RECOVERED_FROM, source.number)
        try:
            relog(sw, source, trial, results)
        except BaseException as e:  # its next resume tries again
            trial.set_user_attr(names.INTERRUPTED, True)
            trial.set_user_attr(names.ERROR, f"not recovered: {type(e).__name__}: {e}"[:1000])
            sw.study.tell(trial, state=TrialState.FAIL)
            raise
        objective = results["objective"]
        done = sw.study.tell(trial, objective if isinstance(objective, list) else [objective])
        log.info("trial %d COMPLETE: %s = %s (%s), from the finished training of failed trial %d, not run again",
                 done.number, ", ".join(sw.metrics), ", ".join(f"{v:.6g}" for v in done.values),
                 format_params(done.params), source.number)
        told.append(done)
    return told


def mark_owner(sw: Sweep, trial: optuna.Trial) -> optuna.Trial:
    trial.set_user_attr(names.OWNER, owner_id())
    trial.set_user_attr(names.FOLDER, job_dir(sw, trial.number))
    sw.asked.append(trial.number)
    return trial


def launch(sweeper, sw: Sweep, batch: List[optuna.Trial]) -> Sequence[Any]:
    """Run a batch through Hydra's launcher; a batch that cannot start fails its trials."""
    jobs = pin_gpus(sweeper, sw, [trial_overrides(sw, t) for t in batch])
    try:
        check_folders_free(sw, batch)
        for trial, job in zip(batch, jobs):
            resume_from_checkpoint(sw, trial, job)
        sweeper.validate_batch_is_legal(jobs)
        for trial, job in zip(batch, jobs):
            log.info("trial %d: %s", trial.number, " ".join(job[len(sw.fixed): len(sw.fixed) + len(sw.dims)]))
        try:
            return sweeper.launcher.launch(jobs, initial_job_idx=batch[0].number)
        except Exception as e:  # a job died (killed, preempted): the launcher gives up on the whole batch
            log.error("the launcher failed for trials %s: %s: %s", [t.number for t in batch], type(e).__name__, e)
            return [FolderResult(job_dir(sw, trial.number), e) for trial in batch]
    except BaseException as e:  # Ctrl-C included: the batch's trials did not finish
        for trial in batch:
            if not isinstance(e, Exception):
                trial.set_user_attr(names.INTERRUPTED, True)  # they run again when the sweep resumes
            trial.set_user_attr(names.ERROR, f"not finished: {type(e).__name__}: {e}"[:1000])
            sw.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


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
