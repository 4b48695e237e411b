"""The Optuna sweeper: search space, samplers, storage, pruning, batches through Hydra's launcher.

The Hydra plugin (`hydra_plugins/dpo_sweep_sweeper`) is a thin shell around `run_sweep`:

1. the search space comes from `hydra.sweeper.params` and the command line (parsed by
   `sweep_space.py`); other overrides are fixed and pass through to every trial;
2. the study opens (or resumes) in its storage: a journal file in the sweep folder by default;
3. the sweep's MLflow parent run is created (or found again on resume) before any trial starts;
4. a batch of `n_jobs` trials is asked (every grid point once, or the sampler's choice), launched
   through Hydra's launcher as ordinary runs with overrides, and each result told to the study;
5. at the end: `optimization_results.yaml`, a table of every trial, plots on the parent run.

A trial reports its eval objective to the study itself (`trial_reporter`, attached by run.py when
`sweep.trial_number` is set); that is how the pruner stops it early. Under torchrun rank 0
reports and decides for every rank.

Rerunning a killed sweep resumes it: trials its dead sweeper left running are FAIL (interrupted)
and do not count; their points are asked again under new numbers, from the interrupted trial's
checkpoint when it left one (`resume_from_checkpoint`); MLflow runs left RUNNING are ended
(`settle_child_runs`), and a parent run created but never recorded in the study is taken up.

Only this module imports optuna.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import socket
import tempfile
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import optuna
import yaml
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution
from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import distributed, tracking
from dpo_sweep.config import ConfigError, objective_spec, validate
from dpo_sweep.run import METRICS_FILE, TrialStopped
from dpo_sweep.sweep_space import Dimension, describe, grid_points, parse_search_space, quote
from dpo_sweep.trainer import CHECKPOINT_FILE

log = logging.getLogger(__name__)

JOURNAL_FILE = "optuna.journal"  # the default storage, in the sweep folder
RESULTS_FILE = "optimization_results.yaml"
SEARCH_SPACE_FILE = "search_space.yaml"
SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "nsgaii")
PRUNERS = ("median", "successive_halving", "hyperband", "none")
# Study and trial attributes this module keeps in the Optuna storage.
PRUNER_ATTR = "sweep.pruner"  # study: {name, kwargs}, read by each trial to decide pruning
PARENT_ATTR = "mlflow.parent_run_id"  # study: the sweep's MLflow run, kept across resumes
PARENT_URI_ATTR = "mlflow.tracking_uri"
OWNER_ATTR = "sweep.owner"  # trial: "host:pid" of the sweeper that asked it
FOLDER_ATTR = "sweep.folder"  # trial: its run folder
ERROR_ATTR = "sweep.error"  # trial: why it failed
INTERRUPTED_ATTR = "sweep.interrupted"  # trial: its sweeper died while it ran; it does not count
RESUMED_FROM_ATTR = "sweep.resumed_from"  # trial: the interrupted trial whose checkpoint it started from
# MLflow status of a trial's run once the trial is finished (an interrupted one: KILLED).
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
# Override keys that say where a trial runs, reports and logs, not what it trains: two runs that
# differ only in these can continue each other's checkpoint.
PLACEMENT_KEYS = ("hydra.", "sweep.", "tracking.", "train.resume=", "train.device=", "train.progress=")


class SweepError(RuntimeError):
    """The sweep cannot go on (too many failed trials, a job folder already in use)."""


class PrunedTrial(TrialStopped, optuna.TrialPruned):
    """Raised inside a trial when the study's pruner stops it: PRUNED in Optuna, KILLED in MLflow."""


# -- settings


@dataclass
class SweepSettings:
    """`hydra.sweeper.*`, checked (see hydra_plugins/dpo_sweep_sweeper/config.py)."""

    n_trials: Optional[int]
    n_jobs: int
    study_name: Optional[str]
    storage: Optional[str]
    sampler: str
    seed: Optional[int]
    sampler_kwargs: Dict[str, Any]
    pruner: str
    pruner_kwargs: Dict[str, Any]
    max_failure_rate: float
    params: Dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "SweepSettings":
        s = OmegaConf.to_container(cfg, resolve=True)
        settings = cls(
            n_trials=s.get("n_trials"), n_jobs=s.get("n_jobs", 1), study_name=s.get("study_name"),
            storage=s.get("storage"), sampler=s["sampler"]["name"], seed=s["sampler"].get("seed"),
            sampler_kwargs=s["sampler"].get("kwargs") or {}, pruner=s["pruner"]["name"],
            pruner_kwargs=s["pruner"].get("kwargs") or {}, max_failure_rate=s.get("max_failure_rate", 0.5),
            params=s.get("params") or {},
        )
        settings.check()
        return settings

    def check(self) -> None:
        def need(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise ConfigError(f"config key 'hydra.sweeper.{key}' = {value!r}: expected {expected}")

        need(self.n_trials is None or self.n_trials >= 1, "n_trials", self.n_trials, "null (the full grid) or >= 1")
        need(self.n_jobs >= 1, "n_jobs", self.n_jobs, "an integer >= 1")
        need(self.sampler in SAMPLERS, "sampler.name", self.sampler, "one of " + ", ".join(SAMPLERS))
        need(self.pruner in PRUNERS, "pruner.name", self.pruner, "one of " + ", ".join(PRUNERS))
        need(0 <= self.max_failure_rate <= 1, "max_failure_rate", self.max_failure_rate, "0 <= value <= 1")
        need(self.study_name is None or bool(self.study_name), "study_name", self.study_name, "null or a name")


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


# -- storage and study


def storage_location(setting: Optional[str], sweep_dir: str) -> str:
    """Where the study lives: a database URL as given, or an absolute journal file path."""
    if setting and "://" in setting:
        return setting
    return os.path.abspath(setting or os.path.join(sweep_dir, JOURNAL_FILE))


def open_storage(location: str) -> optuna.storages.BaseStorage:
    """A journal file (a path), a Redis journal (redis://) or an RDB storage (any other URL)."""
    journal = optuna.storages.journal
    if location.startswith("redis://"):
        return journal.JournalStorage(journal.JournalRedisBackend(location))
    if "://" in location:
        return optuna.storages.RDBStorage(location)
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
    return trial.state.is_finished() and not trial.user_attrs.get(INTERRUPTED_ATTR)


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _owner_is_dead(owner: str) -> bool:
    """True when `owner` ("host:pid") is a process of this machine that no longer runs."""
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False  # another machine's sweeper: it may still run
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def recover_interrupted(study: optuna.Study, storage) -> List[FrozenTrial]:
    """Trials left RUNNING by a sweeper of this machine that died (killed, crashed): told FAIL
    and marked interrupted, so that they do not count and their grid points run again."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
             if _owner_is_dead(str(t.user_attrs.get(OWNER_ATTR, "")))]
    for t in stale:
        storage.set_trial_user_attr(trial_id(storage, study, t.number), INTERRUPTED_ATTR, True)
        storage.set_trial_user_attr(trial_id(storage, study, t.number), ERROR_ATTR, "interrupted: its sweeper died")
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        log.warning("trial %d was interrupted (its sweeper %s died): it does not count and runs again",
                    t.number, t.user_attrs.get(OWNER_ATTR))
    return stale


# -- the sweep


@dataclass
class Sweep:
    """Everything one `-m` invocation works with."""

    settings: SweepSettings
    dims: List[Dimension]
    fixed: List[str]  # fixed overrides, passed to every trial
    base: DictConfig  # the composed config with the fixed overrides: objective, tracking
    sweep_dir: str
    location: str  # Optuna storage
    storage: Any
    study: optuna.Study
    metrics: List[str]
    directions: List[str]
    grid: bool  # every point of a finite space once, rather than the sampler's choice
    parent: Optional[tracking.Tracker] = None
    asked: List[int] = field(default_factory=list)  # trial numbers launched by this invocation
    interrupted: List[int] = field(default_factory=list)  # trials a dead sweeper left running

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1


def run_sweep(sweeper, arguments: List[str]) -> List[Sequence[Any]]:
    """Run a sweep for the Hydra sweeper `sweeper` (its config, launcher and config loader);
    return the launcher's results, batch by batch."""
    sw = prepare(sweeper, arguments)
    status = "FAILED"
    try:
        if sw.parent:
            settle_child_runs(sw)  # runs a killed sweeper left RUNNING, or untagged
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
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # this module logs each trial itself
    settings = SweepSettings.from_config(sweeper.settings)
    dims, fixed = parse_search_space(settings.params, arguments, sweeper.hydra_context.config_loader)
    grid = settings.sampler == "grid" or settings.n_trials is None
    check_grid(dims, settings, grid)
    base = sweeper.hydra_context.config_loader.load_sweep_config(sweeper.config, list(fixed))
    validate(base)
    metrics, directions = map(list, zip(*objective_spec(base)))
    sweep_dir = os.path.abspath(str(sweeper.config.hydra.sweep.dir))
    os.makedirs(sweep_dir, exist_ok=True)
    OmegaConf.save(sweeper.config, os.path.join(sweep_dir, "multirun.yaml"))
    location = storage_location(settings.storage, sweep_dir)
    storage = open_storage(location)
    name = settings.study_name or os.path.basename(sweep_dir)
    study = open_study(storage, name, directions)
    # Seeded, and offset by the trials already in the study: a resumed sweep does not repeat points.
    seed = None if settings.seed is None else settings.seed + len(study.get_trials(deepcopy=False))
    study.sampler = build_sampler(settings.sampler, seed, settings.sampler_kwargs)
    pruner = settings.pruner
    if len(metrics) > 1 and pruner != "none":
        log.warning("hydra.sweeper.pruner.name=%s: Optuna cannot prune a multi-objective study; pruning is off", pruner)
        pruner = "none"
    build_pruner(pruner, settings.pruner_kwargs)  # a bad name or argument fails here, not in every trial
    study.set_user_attr(PRUNER_ATTR, {"name": pruner, "kwargs": settings.pruner_kwargs})
    sw = Sweep(settings, dims, fixed, base, sweep_dir, location, storage, study, metrics, directions, grid)
    sw.interrupted = [t.number for t in recover_interrupted(study, storage)]
    log.info("study '%s' in %s: %d finished trials; search space %s; rerun with hydra.sweep.dir=%s to resume",
             name, location, sum(is_finished(t) for t in study.get_trials(deepcopy=False)),
             describe(dims) or "empty (fixed overrides only)", sweep_dir)
    sw.parent = open_parent(sw)  # last: nothing that can fail comes between it and run_sweep's finally
    return sw


def check_grid(dims: Sequence[Dimension], settings: SweepSettings, grid: bool) -> None:
    continuous = [d for d in dims if d.values is None]
    if grid and continuous:
        key = "sampler.name" if settings.sampler == "grid" else "n_trials"
        value = settings.sampler if settings.sampler == "grid" else settings.n_trials
        raise ConfigError(
            f"config key 'hydra.sweeper.{key}' = {value!r}: a grid needs every dimension finite (a list, choice() "
            f"or range()), but {continuous[0].key}={continuous[0].spec} is an interval; set hydra.sweeper.n_trials"
        )


def run_batches(sweeper, sw: Sweep) -> List[Sequence[Any]]:
    """Ask, launch and tell batches of trials until the grid or `n_trials` is done."""
    trials = sw.study.get_trials(deepcopy=False)
    finished = sum(is_finished(t) for t in trials)
    budget = None if sw.settings.n_trials is None else max(0, sw.settings.n_trials - finished)
    planned = len(pending_points(sw)) if sw.grid else budget
    if sw.grid and budget is not None:
        planned = min(planned, budget)
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
    base_sampler = sw.study.sampler
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            sw.study.sampler = optuna.samplers.PartialFixedSampler(point, base_sampler)
        return mark_owner(sw, sw.study.ask(distributions))
    finally:
        sw.study.sampler = base_sampler


def retry_points(sw: Sweep) -> List[Dict[str, Any]]:
    """Points whose latest trial was interrupted (no trial took them up again since), oldest
    first, that still lie in the search space. A grid finds them among its pending points."""
    latest: Dict[Tuple[Any, ...], FrozenTrial] = {}
    for t in sw.study.get_trials(deepcopy=False):  # by number: a later trial at a point replaces
        latest[tuple(sorted(t.params.items()))] = t
    return [dict(t.params) for t in latest.values()
            if t.user_attrs.get(INTERRUPTED_ATTR) and in_space(sw.dims, t.params)]


def in_space(dims: Sequence[Dimension], params: Dict[str, Any]) -> bool:
    """Whether `params` is a point of the search space `dims` (it may have changed since)."""
    if set(params) != {d.key for d in dims}:
        return False
    for d in dims:
        value, dist = params[d.key], d.distribution
        inside = value in dist.choices if isinstance(dist, CategoricalDistribution) else dist.low <= value <= dist.high
        if not inside:
            return False
    return True


def mark_owner(sw: Sweep, trial: optuna.Trial) -> optuna.Trial:
    trial.set_user_attr(OWNER_ATTR, owner_id())
    trial.set_user_attr(FOLDER_ATTR, job_dir(sw, trial.number))
    sw.asked.append(trial.number)
    return trial


def job_dir(sw: Sweep, number: int) -> str:
    return os.path.join(sw.sweep_dir, str(number))


def trial_overrides(sw: Sweep, trial: optuna.Trial) -> List[str]:
    """The overrides of one trial: fixed ones, its parameters, then where it reports and logs."""
    overrides = list(sw.fixed) + [d.override(trial.params[d.key]) for d in sw.dims]
    overrides += [
        f"hydra.sweep.dir={quote(sw.sweep_dir)}",
        f"hydra.sweep.subdir={quote(str(trial.number))}",  # folders by trial number: never reused
        f"sweep.storage={quote(sw.location)}",
        f"sweep.study_name={quote(sw.study.study_name)}",
        f"sweep.trial_number={trial.number}",
    ]
    if sw.parent:
        overrides += [f"tracking.uri={quote(sw.parent.uri)}", f"tracking.parent_run_id={quote(sw.parent.run_id)}"]
    return overrides


JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"


def pins_gpus(launcher_target: str, n_jobs: int, device: str, trainer: str, swept: Sequence[str]) -> bool:
    """Whether the trials of a batch share this machine's GPUs and should each get one: the
    joblib launcher runs them at the same time (n_jobs > 1), `train.device` is left to pick a GPU
    (auto or cuda), our trainer runs them (TRL's picks its GPU itself), and neither key is among
    the `swept` keys. Other launchers place their jobs themselves (SLURM sets CUDA_VISIBLE_DEVICES
    per job) and the basic one runs one trial at a time."""
    return (launcher_target == JOBLIB_LAUNCHER and n_jobs > 1 and device in ("auto", "cuda")
            and trainer == "dpo_sweep" and not {"train.device", "trainer"} & set(swept))


def gpu_slots(batch_size: int, gpu_count: int) -> List[Optional[int]]:
    """The GPU of each trial of a parallel batch: its index in the batch modulo the GPU count
    (0, 1, 0, 1 for four trials on two GPUs); None for every trial with fewer than two GPUs."""
    if gpu_count < 2:
        return [None] * batch_size
    return [i % gpu_count for i in range(batch_size)]


def pin_gpus(sweeper, sw: Sweep, jobs: List[List[str]]) -> List[List[str]]:
    """The batch's jobs, each with `train.device=cuda:<slot>` added when `pins_gpus` says so and
    CUDA sees several devices (torch is imported only then: the sweeper does not need it)."""
    target = str(OmegaConf.select(sweeper.config, "hydra.launcher._target_", default=""))
    swept = [d.key.lstrip("+~") for d in sw.dims]
    if not pins_gpus(target, sw.settings.n_jobs, str(sw.base.train.device), str(sw.base.trainer), swept):
        return jobs
    import torch

    slots = gpu_slots(len(jobs), torch.cuda.device_count())
    return [job + ([f"train.device=cuda:{slot}"] if slot is not None else []) for job, slot in zip(jobs, slots)]


def launch(sweeper, sw: Sweep, batch: List[optuna.Trial]) -> Sequence[Any]:
    """Run a batch through Hydra's launcher; a batch that cannot start fails its trials."""
    jobs = pin_gpus(sweeper, sw, [trial_overrides(sw, t) for t in batch])
    try:
        for trial in batch:
            folder = job_dir(sw, trial.number)
            if os.path.isdir(folder) and os.listdir(folder):
                raise SweepError(f"job folder {folder} is already in use (by a trial of another study?): "
                                 f"resume with the same hydra.sweeper.study_name, or use a new hydra.sweep.dir")
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
                trial.set_user_attr(INTERRUPTED_ATTR, True)  # they run again when the sweep resumes
            trial.set_user_attr(ERROR_ATTR, f"not finished: {type(e).__name__}: {e}"[:1000])
            sw.study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise


@dataclass
class FolderResult:
    """A trial's result when the launcher failed for its batch as a whole: what the trial wrote to
    its metrics.json if it finished, else the launcher's error (the trial is then told FAIL)."""

    folder: str
    error: Exception

    @property
    def return_value(self) -> Any:
        path = os.path.join(self.folder, METRICS_FILE)
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
    trial.set_user_attr(ERROR_ATTR, error[:1000])
    return sw.study.tell(trial, state=TrialState.FAIL)


def format_params(params: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


# -- a point whose trial was interrupted goes on from that trial's checkpoint


def checkpoint_file(folder: str) -> str:
    """Where a run folder keeps its checkpoint (run.py: <run>/checkpoint/, train.checkpoint_every)."""
    return os.path.join(folder, "checkpoint", CHECKPOINT_FILE)


def trial_folder(sw: Sweep, trial: FrozenTrial) -> str:
    return str(trial.user_attrs.get(FOLDER_ATTR) or job_dir(sw, trial.number))


def resume_source(sw: Sweep, params: Dict[str, Any], job: Sequence[str]) -> Optional[FrozenTrial]:
    """The newest interrupted trial at the point `params` whose folder holds a checkpoint that
    fits `job` (`same_training`): the furthest this point got, since a resumed trial starts from
    its source's checkpoint and goes on. None when there is none."""
    unfit = []
    for t in reversed(sw.study.get_trials(deepcopy=False)):
        folder = trial_folder(sw, t)
        if not (t.user_attrs.get(INTERRUPTED_ATTR) and t.params == params and os.path.isfile(checkpoint_file(folder))):
            continue
        if same_training(folder, job):
            return t
        unfit.append(t.number)
    if unfit:
        log.warning("not resuming from the checkpoints of interrupted trials %s at %s: launched with other "
                    "overrides (see their .hydra/overrides.yaml), or not launched", unfit, format_params(params))
    return None


def training_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides that decide what a run trains (not PLACEMENT_KEYS), sorted."""
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(PLACEMENT_KEYS))


def same_training(folder: str, job: Sequence[str]) -> bool:
    """Whether the run in `folder` was launched with the training overrides of `job` (from its
    .hydra/overrides.yaml): only then does its checkpoint fit the job."""
    path = os.path.join(folder, ".hydra", "overrides.yaml")
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
    """The optimizer step a checkpoint was written at (its tensors are mapped, not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=False)["step"])


def resume_from_checkpoint(sw: Sweep, trial: optuna.Trial, job: List[str]) -> None:
    """When `trial` takes up the point of an interrupted trial that left a checkpoint, start it
    there: the checkpoint goes into the trial's folder, `train.resume=true` into its job, and the
    values the interrupted trial reported up to that step into the study (the resumed run does
    not evaluate those steps again). A checkpoint of other training overrides is not used."""
    source = resume_source(sw, trial.params, job)
    if source is None:
        return
    target = checkpoint_file(job_dir(sw, trial.number))
    place_file(checkpoint_file(trial_folder(sw, source)), target)
    job[:] = [o for o in job if not o.startswith("train.resume=")] + ["train.resume=true"]
    trial.set_user_attr(RESUMED_FROM_ATTR, source.number)
    step = checkpoint_step(target)
    if not sw.multi:  # Optuna keeps intermediate values for single-objective studies only
        for at, value in sorted(source.intermediate_values.items()):
            if at <= step:
                trial.report(value, at)
    log.info("trial %d resumes the point of interrupted trial %d from its checkpoint at step %d",
             trial.number, source.number, step)


# -- the trial's side: report each eval to the study, stop when pruned


def trial_reporter(cfg: DictConfig, total_steps: int) -> Callable[[int, Dict[str, float]], None]:
    """An `on_eval` callback for a sweep trial: report the objective at each eval to the study
    (intermediate values) and raise PrunedTrial when the study's pruner says so. The final eval
    is reported but never pruned: a trial that got there completes.

    Under torchrun every rank calls it at every eval: rank 0 alone reports and asks the pruner,
    and its decision is broadcast, so that all ranks stop at the same step or none does."""
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
    spec = storage.get_study_user_attrs(study_id).get(PRUNER_ATTR) or {"name": "none", "kwargs": {}}
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


# -- MLflow: the parent run and its children


def open_parent(sw: Sweep) -> Optional[tracking.Tracker]:
    """The sweep's MLflow parent run, created before any trial starts (the store and the
    experiment with it), or found again when the study resumes."""
    t = sw.base.tracking
    if not t.enabled:
        return None
    uri = tracking.resolve_uri(t.uri, os.getcwd())
    attrs = sw.study.user_attrs
    known = attrs.get(PARENT_ATTR) if attrs.get(PARENT_URI_ATTR) == uri else None
    known = known if known and tracking.get_run(uri, known) else orphan_parent(sw, uri)
    if known:
        parent = tracking.Tracker(uri, t.experiment, run_id=known)
        log.info("MLflow: going on with parent run %s in %s", known, uri)
    else:
        tags = {"sweep.study_name": sw.study.study_name, "sweep.role": "parent", "sweep.storage": sw.location}
        parent = tracking.Tracker(uri, t.experiment, run_name=f"sweep-{sw.study.study_name}", tags=tags)
        log.info("MLflow: parent run %s in %s", parent.run_id, uri)
    if attrs.get(PARENT_ATTR) != parent.run_id or attrs.get(PARENT_URI_ATTR) != uri:
        sw.study.set_user_attr(PARENT_ATTR, parent.run_id)
        sw.study.set_user_attr(PARENT_URI_ATTR, uri)
    parent.set_tags({
        "sweep.folder": sw.sweep_dir, "sweep.storage": sw.location,
        "sweep.sampler": "grid" if sw.grid else sw.settings.sampler, "sweep.pruner": sw.settings.pruner,
        "sweep.n_trials": "the full grid" if sw.settings.n_trials is None else sw.settings.n_trials,
        "sweep.objective": ", ".join(f"{m} ({d})" for m, d in zip(sw.metrics, sw.directions)),
        "sweep.fixed_overrides": " ".join(sw.fixed),
        **{f"space.{d.key}": d.spec for d in sw.dims},
    })
    return parent


def orphan_parent(sw: Sweep, uri: str) -> Optional[str]:
    """A RUNNING parent run of this study and storage that the study does not name: its sweeper
    was killed between creating it and recording it in the study. Its id, or None."""
    values = [sw.study.study_name, sw.location]
    if any("'" in v for v in values):  # not expressible in an MLflow filter: a new parent instead
        return None
    runs = tracking.find_runs(uri, sw.base.tracking.experiment,
                              f"tags.`sweep.role` = 'parent' and tags.`sweep.study_name` = '{values[0]}' and "
                              f"tags.`sweep.storage` = '{values[1]}' and attributes.status = 'RUNNING'")
    return runs[0].run_id if runs else None


def child_runs(sw: Sweep) -> Dict[int, tracking.RunSummary]:
    """The parent's child runs by trial number (the newest run of each number)."""
    runs = tracking.find_runs(sw.parent.uri, sw.base.tracking.experiment,
                              f"tags.`mlflow.parentRunId` = '{sw.parent.run_id}'")
    by_number: Dict[int, tracking.RunSummary] = {}
    for run in runs:  # newest first
        number = run.tags.get("sweep.trial_number", "")
        if number.isdigit():
            by_number.setdefault(int(number), run)
    return by_number


def run_tags(trial: FrozenTrial) -> Dict[str, Any]:
    """The tags of a finished trial's run: its Optuna state, and its error or checkpoint source."""
    tags: Dict[str, Any] = {"sweep.state": trial.state.name}
    for attr in (ERROR_ATTR, RESUMED_FROM_ATTR):
        if attr in trial.user_attrs:
            tags[attr] = trial.user_attrs[attr]
    return tags


def tag_child_runs(sw: Sweep, told: Sequence[FrozenTrial]) -> None:
    """Tag each trial's run with its Optuna state (and error), to filter them in the MLflow UI."""
    runs = child_runs(sw)
    for trial in told:
        if trial.number in runs:
            tracking.set_tags(sw.parent.uri, runs[trial.number].run_id, run_tags(trial))


def settle_child_runs(sw: Sweep) -> None:
    """Bring the runs of finished trials in line with the study after a sweeper was killed: a
    run left RUNNING ends (KILLED when its trial was interrupted or pruned, FAILED, or FINISHED)
    and a run without its state tag gets it. Runs of trials still running are left alone."""
    trials = {t.number: t for t in sw.study.get_trials(deepcopy=False)}
    for number, run in child_runs(sw).items():
        trial = trials.get(number)
        if trial is None or not trial.state.is_finished():
            continue
        if run.status == "RUNNING" or run.tags.get("sweep.state") != trial.state.name:
            tracking.set_tags(sw.parent.uri, run.run_id, run_tags(trial))
        if run.status == "RUNNING":
            status = "KILLED" if trial.user_attrs.get(INTERRUPTED_ATTR) else RUN_STATUS[trial.state]
            tracking.set_status(sw.parent.uri, run.run_id, status)
            log.info("MLflow: run %s of trial %d was left RUNNING; ended %s", run.run_id, number, status)


# -- the end: results file, table, plots, parent status


def finish(sw: Sweep, status: str) -> None:
    """Write the results and the table, log them and the plots to the parent run, and end the
    parent with `status`, whatever happens on the way."""
    try:
        trials = sw.study.get_trials(deepcopy=False)
        results = write_results(sw, trials)
        print(results_table(sw, trials), flush=True)
        if sw.parent:
            log_to_parent(sw, trials, results)
    except Exception:  # the sweep's own outcome matters more than its report
        log.exception("could not write the sweep's results")
    finally:
        if sw.parent:
            sw.parent.end(status)


def best_trials(sw: Sweep, trials: Sequence[FrozenTrial]) -> List[FrozenTrial]:
    """The best complete trial (single objective), or the Pareto front (several)."""
    if not any(t.state == TrialState.COMPLETE for t in trials):
        return []
    return list(sw.study.best_trials) if sw.multi else [sw.study.best_trial]


def write_results(sw: Sweep, trials: Sequence[FrozenTrial]) -> Dict[str, Any]:
    """optimization_results.yaml in the sweep folder: best params and value, and the counts."""
    best = best_trials(sw, trials)
    counts = {s.name: sum(t.state == s and is_finished(t) for t in trials)
              for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    results: Dict[str, Any] = {
        "name": "dpo_optuna", "study_name": sw.study.study_name, "storage": sw.location,
        "objective": dict(zip(sw.metrics, sw.directions)), "search_space": describe(sw.dims), "trials": counts,
    }
    if sw.multi:
        results["best_trials"] = [{"number": t.number, "params": t.params, "values": t.values,
                                   "folder": t.user_attrs.get(FOLDER_ATTR)} for t in best]
    else:
        top = best[0] if best else None  # None when no trial completed
        results.update({
            "best_trial": top.number if top else None, "best_params": top.params if top else None,
            "best_value": top.value if top else None, "best_folder": top.user_attrs.get(FOLDER_ATTR) if top else None,
        })
    with open(os.path.join(sw.sweep_dir, RESULTS_FILE), "w") as f:
        yaml.safe_dump(results, f, sort_keys=False)
    log.info("results: %s", os.path.join(sw.sweep_dir, RESULTS_FILE))
    return results


def ranked(sw: Sweep, trials: Sequence[FrozenTrial]) -> List[FrozenTrial]:
    """Complete trials best first, then pruned, failed and unfinished ones by number."""
    sign = [-1 if d == "maximize" else 1 for d in sw.directions]
    front = {t.number for t in best_trials(sw, trials)}
    complete = sorted((t for t in trials if t.state == TrialState.COMPLETE),
                      key=lambda t: (t.number not in front, [s * v for s, v in zip(sign, t.values)]))
    order = {TrialState.PRUNED: 1, TrialState.FAIL: 2}
    rest = sorted((t for t in trials if t.state != TrialState.COMPLETE),
                  key=lambda t: (order.get(t.state, 3), t.number))
    return complete + rest


def results_table(sw: Sweep, trials: Sequence[FrozenTrial]) -> str:
    """Every trial of the study, best first: number, params, objective, state, duration."""
    keys = [d.key for d in sw.dims]
    header = ["trial", *keys, "objective", "state", "duration"]
    rows = []
    for t in ranked(sw, trials):
        objective = _objective_cell(t)
        state = "FAIL (interrupted)" if t.user_attrs.get(INTERRUPTED_ATTR) else t.state.name
        duration = f"{t.duration.total_seconds():.1f}s" if t.duration else "-"
        rows.append([str(t.number), *(_cell(t.params.get(k)) for k in keys), objective, state, duration])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    title = f"study {sw.study.study_name}: {', '.join(f'{m} ({d})' for m, d in zip(sw.metrics, sw.directions))}"
    errors = [f"  trial {t.number}: {t.user_attrs[ERROR_ATTR]}" for t in trials
              if t.state == TrialState.FAIL and ERROR_ATTR in t.user_attrs]
    body = [title, line(header), line(["-" * w for w in widths]), *map(line, rows)]
    return "\n".join(body + (["failed:"] + errors if errors else []))


def _objective_cell(t: FrozenTrial) -> str:
    """The final value(s), or a pruned trial's last reported value and its step."""
    if t.state == TrialState.COMPLETE:
        return ", ".join(f"{v:.6g}" for v in t.values)
    if t.state == TrialState.PRUNED and t.last_step is not None:
        return f"{t.intermediate_values[t.last_step]:.6g} (step {t.last_step})"
    return "-"


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def log_to_parent(sw: Sweep, trials: Sequence[FrozenTrial], results: Dict[str, Any]) -> None:
    """Search space, results, best trial and plots on the parent run."""
    parent = sw.parent
    finished = sum(is_finished(t) for t in trials)
    counts = {f"trials/{k.lower()}": v for k, v in results["trials"].items()}
    parent.log_metrics(counts, step=finished)
    best = best_trials(sw, trials)
    if best and not sw.multi:
        parent.log_metrics({"best_value": best[0].value}, step=finished)
        parent.set_tags({"best.trial_number": best[0].number, **{f"best.{k}": v for k, v in best[0].params.items()}})
    elif best:
        parent.set_tags({"best.trial_numbers": ",".join(str(t.number) for t in best)})
    with tempfile.TemporaryDirectory() as tmp:
        with open(os.path.join(tmp, SEARCH_SPACE_FILE), "w") as f:
            yaml.safe_dump(describe(sw.dims), f)
        parent.log_artifact(os.path.join(tmp, SEARCH_SPACE_FILE))
        for name in (RESULTS_FILE, "multirun.yaml"):
            parent.log_artifact(os.path.join(sw.sweep_dir, name))
        plots = save_plots(sw, os.path.join(tmp, "plots"))
        if plots:
            parent.log_artifact(os.path.join(tmp, "plots"), "plots")


def save_plots(sw: Sweep, folder: str) -> List[str]:
    """Optuna's plots as PNG: optimisation history, parameter importances, and the beta x lr
    contour when both are swept. A plot that cannot be drawn (too few trials) is skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as plots

    target = (lambda t: t.values[0]) if sw.multi else None
    keys = [d.key for d in sw.dims]
    wanted = {
        "optimization_history.png": lambda: plots.plot_optimization_history(
            sw.study, target=target, target_name=sw.metrics[0]),
        "param_importances.png": lambda: plots.plot_param_importances(
            sw.study, target=target, target_name=sw.metrics[0]),
    }
    if "beta" in keys and "optimizer.lr" in keys:
        wanted["contour_beta_lr.png"] = lambda: plots.plot_contour(
            sw.study, params=["beta", "optimizer.lr"], target=target, target_name=sw.metrics[0])
    os.makedirs(folder, exist_ok=True)
    saved = []
    for name, draw in wanted.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # matplotlib plots are "experimental" in Optuna
                axes = draw()
            figure = (axes.flat[0] if hasattr(axes, "flat") else axes).get_figure()
            figure.savefig(os.path.join(folder, name), dpi=100, bbox_inches="tight")
            plt.close(figure)
            saved.append(name)
        except Exception as e:  # e.g. importances need two complete trials
            log.info("plot %s skipped: %s", name, e)
    return saved
