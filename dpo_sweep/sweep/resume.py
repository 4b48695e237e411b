"""Resuming a killed sweep: the points of interrupted trials run again, each from the newest
checkpoint its interrupted trial left, when that checkpoint fits."""

from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List, Optional, Sequence, Tuple

import optuna
import yaml
from optuna.trial import FrozenTrial

from dpo_sweep import names, paths
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
    """The newest interrupted trial at the point `params` whose folder holds a checkpoint that
    fits `job` (`same_training`): the furthest this point got, since a resumed trial starts from
    its source's checkpoint and goes on. None when there is none."""
    unfit = []
    for t in reversed(sw.study.get_trials(deepcopy=False)):
        folder = trial_folder(sw, t)
        if not (t.user_attrs.get(names.INTERRUPTED) and t.params == params and os.path.isfile(checkpoint_file(folder))):
            continue
        if same_training(folder, job):
            return t
        unfit.append(t.number)
    if unfit:
        log.warning("not resuming from the checkpoints of interrupted trials %s at %s: launched with other "
                    "overrides (see their .hydra/overrides.yaml), or not launched", unfit, format_params(params))
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
    """The optimizer step a checkpoint was written at (its tensors are mapped, not read)."""
    import torch

    return int(torch.load(path, map_location="cpu", mmap=True, weights_only=True)["step"])


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
    trial.set_user_attr(names.RESUMED_FROM, source.number)
    step = checkpoint_step(target)
    if not sw.multi:  # Optuna keeps intermediate values for single-objective studies only
        for at, value in sorted(source.intermediate_values.items()):
            if at <= step:
                trial.report(value, at)
    log.info("trial %d resumes the point of interrupted trial %d from its checkpoint at step %d",
             trial.number, source.number, step)
