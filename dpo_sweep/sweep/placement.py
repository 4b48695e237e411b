"""Where a trial runs: its folder, its overrides, and its GPU when parallel trials share a machine."""

from __future__ import annotations

from typing import List, Optional, Sequence

import optuna
from omegaconf import OmegaConf

from dpo_sweep import paths
from dpo_sweep.sweep.space import quote
from dpo_sweep.sweep.state import Sweep

JOBLIB_LAUNCHER = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
# Override keys that say where a trial runs, reports and logs, not what it trains: two runs that
# differ only in these can continue each other's checkpoint.
PLACEMENT_KEYS = ("hydra.", "sweep.", "tracking.", "train.resume=", "train.device=", "train.progress=")


def job_dir(sw: Sweep, number: int) -> str:
    return paths.trial_dir(sw.sweep_dir, number)


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
        from dpo_sweep.sweep.lineage import trial_name

        overrides += [f"tracking.uri={quote(sw.parent.uri)}", f"tracking.parent_run_id={quote(sw.parent.run_id)}",
                      f"tracking.run_name={quote(trial_name(sw, trial.number, trial.params))}"]
    return overrides


def training_overrides(overrides: Sequence[str]) -> List[str]:
    """The overrides that decide what a run trains (not PLACEMENT_KEYS), sorted."""
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(PLACEMENT_KEYS))


def pins_gpus(launcher_target: str, n_jobs: int, device: str, trainer: str, swept: Sequence[str]) -> bool:
    """Whether parallel trials share this machine's GPUs and should each get one: the
    joblib launcher runs them at the same time (n_jobs > 1), `train.device` is left to pick a GPU
    (auto or cuda), our trainer runs them (TRL's picks its GPU itself), and neither key is among
    the `swept` keys. Other launchers place their jobs themselves (SLURM sets CUDA_VISIBLE_DEVICES
    per job) and the basic one runs one trial at a time."""
    return (launcher_target == JOBLIB_LAUNCHER and n_jobs > 1 and device in ("auto", "cuda")
            and trainer == "dpo_sweep" and not {"train.device", "trainer"} & set(swept))


def gpu_slots(batch_size: int, gpu_count: int) -> List[Optional[int]]:
    """The GPU of each of `batch_size` worker slots (a slot runs one trial at a time): its index
    modulo the GPU count (0, 1, 0, 1 for four slots on two GPUs); None for every slot with fewer
    than two GPUs."""
    if gpu_count < 2:
        return [None] * batch_size
    return [i % gpu_count for i in range(batch_size)]


def launcher_target(sweeper) -> str:
    """The `_target_` of the sweep's Hydra launcher."""
    return str(OmegaConf.select(sweeper.config, "hydra.launcher._target_", default=""))


def pin_gpus(sweeper, sw: Sweep, jobs: List[List[str]], slots: Optional[Sequence[int]] = None) -> List[List[str]]:
    """The jobs, each with `train.device=cuda:<gpu>` added when `pins_gpus` says so and CUDA sees
    several devices (torch is imported only then: the sweeper does not need it). The GPU is that
    of the job's worker slot (`slots`; by default its place in the batch), so that trials running
    at the same time, in different slots, get different GPUs while there are enough of them."""
    swept = [d.key.lstrip("+~") for d in sw.dims]
    if not pins_gpus(launcher_target(sweeper), sw.settings.n_jobs, str(sw.base.train.device), str(sw.base.trainer),
                     swept):
        return jobs
    import torch

    slots = list(range(len(jobs))) if slots is None else list(slots)
    gpus = gpu_slots(max(slots, default=-1) + 1, torch.cuda.device_count())
    return [job + ([f"train.device=cuda:{gpus[slot]}"] if gpus[slot] is not None else [])
            for job, slot in zip(jobs, slots)]
