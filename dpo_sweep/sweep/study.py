"""The Optuna study: its storage, creation or resumption, sampler and pruner, and the trials a
dead sweeper left running.

Storage: a journal file in the sweep folder by default (resumable); a file path elsewhere (a
journal on shared disk); `redis://` (a Redis journal); any other URL an RDB storage.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from typing import Any, Dict, List, Optional

import optuna
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import credentials, names, paths, tracking
from dpo_sweep.config import ConfigError

log = logging.getLogger(__name__)


def build_sampler(name: str, seed: Optional[int], kwargs: Dict[str, Any]) -> optuna.samplers.BaseSampler:
    """The Optuna sampler `hydra.sweeper.sampler` names. The grid's points are fixed by the
    sweeper itself (each once, in order), so "grid" needs only a plain sampler underneath."""
    samplers = optuna.samplers
    classes = {
        "tpe": samplers.TPESampler, "random": samplers.RandomSampler, "grid": samplers.RandomSampler,
        "cmaes": samplers.CmaEsSampler, "gp": samplers.GPSampler, "nsgaii": samplers.NSGAIISampler,
    }
    if name == "cmaes" and importlib.util.find_spec("cmaes") is None:
        raise ConfigError("config key 'hydra.sweeper.sampler.name' = 'cmaes': needs the cmaes package "
                          "(pip install cmaes)")
    try:
        return classes[name](seed=seed, **kwargs)
    except TypeError as e:
        raise ConfigError(f"config key 'hydra.sweeper.sampler.kwargs' = {kwargs!r}: {e}") from e


def build_pruner(name: str, kwargs: Dict[str, Any]) -> optuna.pruners.BasePruner:
    """The Optuna pruner `hydra.sweeper.pruner` names."""
    pruners = optuna.pruners
    classes = {
        "median": pruners.MedianPruner, "successive_halving": pruners.SuccessiveHalvingPruner,
        "hyperband": pruners.HyperbandPruner, "none": pruners.NopPruner,
    }
    try:
        return classes[name](**kwargs)
    except TypeError as e:
        raise ConfigError(f"config key 'hydra.sweeper.pruner.kwargs' = {kwargs!r}: {e}") from e


def storage_location(setting: Optional[str], sweep_dir: str) -> str:
    """Where the study lives: a database URL as given, or an absolute journal file path."""
    if setting and "://" in setting:
        return setting
    return os.path.abspath(setting or paths.journal_file(sweep_dir))


_CLAIMED: Dict[str, Any] = {}  # sweep folder -> its open lock file, held while this process lives


def claim_folder(sweep_dir: str) -> None:
    """Make this process the one sweeper of `sweep_dir`, or raise SweepError naming the one that
    is: an exclusive lock on `<sweep dir>/sweeper.lock`, which the system drops when its process
    ends, however it ends (a killed sweeper leaves no stale lock). Two sweeper processes then
    never drive one folder's study by accident; a second worker on the same study takes its own
    folder (hydra.sweep.dir) with the same hydra.sweeper.storage and study_name."""
    import fcntl

    from dpo_sweep.sweep.state import SweepError

    if sweep_dir in _CLAIMED:
        return
    path = os.path.join(sweep_dir, paths.SWEEPER_LOCK)
    lock = open(path, "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise SweepError(f"sweep folder {sweep_dir} is in use by another sweeper ({holder}): wait for it to end, "
                         f"or give this sweep its own hydra.sweep.dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(owner_id())
    lock.flush()
    _CLAIMED[sweep_dir] = lock


def open_storage(location: str) -> optuna.storages.BaseStorage:
    """A journal file (a path), a Redis journal (redis://) or an RDB storage (any other URL)."""
    journal = optuna.storages.journal
    if location.startswith("redis://"):
        return journal.JournalStorage(journal.JournalRedisBackend(credentials.connectable(location)))
    if "://" in location:
        return optuna.storages.RDBStorage(credentials.connectable(location))
    os.makedirs(os.path.dirname(location), exist_ok=True)
    return journal.JournalStorage(journal.JournalFileBackend(location))


def open_study(storage, name: str, directions: List[str]) -> optuna.Study:
    """Create the study, or load it to resume; its directions must not have changed."""
    study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    found = [d.name.lower() for d in study.directions]
    if found != directions:
        raise ConfigError(f"config key 'objective.direction' = {directions}: study '{name}' was created with "
                          f"{found}; use the same directions or another hydra.sweeper.study_name")
    return study


def trial_id(storage, study: optuna.Study, number: int) -> int:
    return storage.get_trial_id_from_study_id_trial_number(storage.get_study_id_from_name(study.study_name), number)


def is_finished(trial: FrozenTrial) -> bool:
    """Finished and counted: complete, pruned or failed, but not cut short by a dead sweeper."""
    return trial.state.is_finished() and not trial.user_attrs.get(names.INTERRUPTED)


def owner_id() -> str:
    """"host:pid" of this sweeper: the owner of the trials it asks, as of the runs it starts."""
    return tracking.process_owner()


def recover_interrupted(study: optuna.Study, storage) -> List[FrozenTrial]:
    """Trials left RUNNING by a sweeper of this machine that died (killed, crashed): told FAIL
    and marked interrupted, so that they do not count and their grid points run again."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if tracking.owner_is_dead(str(t.user_attrs.get(names.OWNER, "")),
                                       since=t.datetime_start.timestamp() if t.datetime_start else None)]
    for t in stale:
        storage.set_trial_user_attr(trial_id(storage, study, t.number), names.INTERRUPTED, True)
        storage.set_trial_user_attr(trial_id(storage, study, t.number), names.ERROR, "interrupted: its sweeper died")
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        log.warning("trial %d was interrupted (its sweeper %s died): it does not count and runs again",
                    t.number, t.user_attrs.get(names.OWNER))
    return stale
