"""The sweep loop: prepare everything before any trial, then ask trials, launch them through
Hydra's launcher and tell the study how each ended, until the grid or `n_trials` is done. With
the joblib launcher and `n_jobs > 1` a trial is asked the moment a worker frees up; otherwise
batch by batch. The end (results, table, plots, the parent's status) comes whatever happens."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import optuna
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import names, paths, tracking
from dpo_sweep.config import objective_spec
from dpo_sweep.preflight import check_points
from dpo_sweep.sweep.lineage import open_parent, settle_child_runs, tag_child_runs
from dpo_sweep.sweep.placement import JOBLIB_LAUNCHER, job_dir, launcher_target, pin_gpus, trial_overrides
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
    """Ask, launch and tell trials until the grid or `n_trials` is done: each the moment a worker
    frees up when `dispatches` says so, else batch by batch. The launcher's results, launch by launch."""
    planned = planned_trials(sw)
    log.info("%d trials to run, %d at a time", planned, sw.settings.n_jobs)
    if dispatches(sweeper, sw):
        return run_dispatched(sweeper, sw, planned)
    returns, failed = [], 0
    while len(sw.asked) < planned:
        batch = ask_batch(sw, min(sw.settings.n_jobs, planned - len(sw.asked)))
        if not batch:
            break
        results = launch(sweeper, sw, batch)
        failed += count_failed(record(sw, batch, results))
        returns.append(results)
        error = too_many_failures(sw, failed, planned)
        if error:
            raise error
    return returns


def dispatches(sweeper, sw: Sweep) -> bool:
    """Whether trials are launched one by one, each as a worker frees up: with the joblib
    launcher and n_jobs > 1. Its jobs run in worker processes, so that several launches of one
    job each can wait at once, each from a thread of its own. The basic launcher runs its job in
    this process; the cluster launchers (submitit, ray) take their batches whole."""
    return launcher_target(sweeper) == JOBLIB_LAUNCHER and sw.settings.n_jobs > 1


def run_dispatched(sweeper, sw: Sweep, planned: int) -> List[Sequence[Any]]:
    """Keep `n_jobs` trials running: a trial is asked and launched the moment another one ends,
    in the worker slot (and on the GPU) that one freed, so that a slow trial holds only its own
    worker. Once failures pass `max_failure_rate`, or a trial cannot start, no trial is asked any
    more: those running end and are told, then the sweep stops with that error. On Ctrl-C (or
    when telling fails) the trials still running are stopped and marked interrupted."""
    workers = Workers(sweeper, sw, free=list(range(sw.settings.n_jobs)))
    returns, failed, error = [], 0, None
    try:
        while True:
            while error is None and workers.free and len(sw.asked) < planned:
                batch = ask_batch(sw, 1)
                if not batch:
                    break
                try:
                    workers.start(batch[0])
                except Exception as e:  # told FAIL by `prepare_launch`; the trials running end first
                    error = e
            if not workers.running:
                break
            trial, results = workers.next_ended()
            failed += count_failed(record(sw, [trial], results))
            returns.append(results)
            error = error or too_many_failures(sw, failed, planned)
    except BaseException as e:  # Ctrl-C included
        workers.stop(e)
        raise
    if error:
        raise error
    return returns


@dataclass
class Workers:
    """`n_jobs` worker slots, each running one trial at a time: its job goes through Hydra's
    launcher (a batch of one) from a thread of its own, which hands back the launcher's result."""

    sweeper: Any
    sw: Sweep
    free: List[int]  # slots without a trial; a slot keeps its GPU (`pin_gpus`)
    running: Dict[int, Tuple[optuna.Trial, int]] = field(default_factory=dict)  # trial number: (trial, slot)
    ended: queue.Queue = field(default_factory=queue.Queue)  # (trial number, the launcher's results)

    def start(self, trial: optuna.Trial) -> None:
        """Launch `trial` in the lowest free slot; a trial that cannot start is told FAIL, and raises."""
        slot = self.free[0]
        jobs = prepare_launch(self.sweeper, self.sw, [trial], [slot])
        self.free.remove(slot)
        self.running[trial.number] = (trial, slot)
        threading.Thread(target=self._launch, args=(trial, jobs), name=f"trial-{trial.number}", daemon=True).start()

    def _launch(self, trial: optuna.Trial, jobs: List[List[str]]) -> None:
        try:
            results = launch_jobs(self.sweeper, self.sw, [trial], jobs)
        except BaseException as e:  # whatever happens, the loop hears that this trial ended
            results = [FolderResult(job_dir(self.sw, trial.number), e)]
        self.ended.put((trial.number, results))

    def next_ended(self) -> Tuple[optuna.Trial, Sequence[Any]]:
        """Wait for the next trial to end; its slot is free again."""
        number, results = self.ended.get()
        trial, slot = self.running.pop(number)
        self.free = sorted(self.free + [slot])
        return trial, results

    def stop(self, error: BaseException) -> None:
        """Stop the trials still running (their workers killed) and tell them FAIL, interrupted:
        they run again when the sweep resumes, from their checkpoints."""
        if self.running:
            try:
                stop_joblib_workers()
            except Exception as e:  # the trials are told all the same; their workers end with them
                log.warning("could not stop the joblib workers: %s: %s", type(e).__name__, e)
        give_up(self.sw, [trial for trial, _ in self.running.values()], error, interrupted=True)
        self.running.clear()


def stop_joblib_workers() -> None:
    """Kill the joblib launcher's worker processes, with the trials in them, as joblib does when
    the caller of a parallel call is interrupted; the launches waiting on them then return."""
    from joblib.externals.loky import reusable_executor

    executor = getattr(reusable_executor, "_executor", None)  # the workers all launches share
    if executor is not None:
        executor.shutdown(wait=True, kill_workers=True)


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
