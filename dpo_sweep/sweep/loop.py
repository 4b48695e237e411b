"""The sweep loop: prepare everything before any trial, then run the trials (`trials`: ask, launch,
tell) batch by batch, or each the moment a worker frees up (`dispatch`: the joblib launcher with
`n_jobs > 1`), or with LoRA trials packed, several a process (`packs`: `pack > 1`), until the grid
or `n_trials` is done. The end (results, table, plots, the parent's status) comes whatever happens."""

from __future__ import annotations

import logging
import os
from typing import Any, List, Sequence

import optuna
from omegaconf import OmegaConf
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import names, paths, tracking
from dpo_sweep.config import objective_spec
from dpo_sweep.preflight import check_points
from dpo_sweep.sweep.lineage import open_parent, settle_child_runs
from dpo_sweep.sweep.resume import recoverable, relog, trial_folder
from dpo_sweep.sweep.settings import SweepSettings, check_grid
from dpo_sweep.sweep.space import describe, format_params, parse_search_space
from dpo_sweep.sweep.state import Sweep
from dpo_sweep.sweep.study import (build_pruner, build_sampler, claim_folder, is_finished, open_storage, open_study,
                                   owner_id, recover_interrupted, storage_location)
from dpo_sweep.sweep.dispatch import dispatches, run_dispatched
from dpo_sweep.sweep.packs import launch_packed
from dpo_sweep.sweep.summary import finish
from dpo_sweep.sweep.trials import (ask_batch, ask_fixed, count_failed, launch, planned_trials, record,
                                    too_many_failures)

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
    frees up when `dispatches` says so, else batch by batch; with `pack` > 1, batches of
    `pack * n_jobs` trials, those that can share a process packed. The results, launch by launch."""
    planned, pack = planned_trials(sw), sw.settings.pack
    log.info("%d trials to run, %d at a time%s", planned, sw.settings.n_jobs,
             f", up to {pack} LoRA trials a process (hydra.sweeper.pack={pack})" if pack > 1 else "")
    if dispatches(sweeper, sw):
        if pack == 1:
            return run_dispatched(sweeper, sw, planned)
        log.info("hydra.sweeper.pack=%d: trials run in batches of pack x n_jobs = %d, not each as a worker frees up "
                 "(a pack is planned from the trials asked together)", pack, pack * sw.settings.n_jobs)
    returns, failed = [], 0
    while len(sw.asked) < planned:
        batch = ask_batch(sw, min(sw.settings.n_jobs * pack, planned - len(sw.asked)))
        if not batch:
            break
        results = launch(sweeper, sw, batch) if pack == 1 else launch_packed(sweeper, sw, batch)
        failed += count_failed(record(sw, batch, results))
        returns.append(results)
        error = too_many_failures(sw, failed, planned)
        if error:
            raise error
    return returns


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
