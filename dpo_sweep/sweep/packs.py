"""Packed trials (`hydra.sweeper.pack` > 1): the LoRA trials of a batch that may share a process
(`dpo_sweep.packing.plan`) train in one Hydra job over one frozen base model.

A pack's job is its first trial's (the leader's) job, in the leader's folder, with one more
override: `sweep.pack=[<the other members' trial numbers>]`. Each other member's folder gets,
before the launch, the `.hydra/` files that its own job would have written (config.yaml,
hydra.yaml, overrides.yaml), and the pack job reads the member's config from there. The pack
job returns one entry a member, `{"trial", "state", "value", "error"}`, in the pack's order; each
is told to the study as the result of that trial's own job would be (`MemberResult`)."""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import optuna
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from dpo_sweep import credentials, names, paths
from dpo_sweep.packing.plan import differing_keys, label, plan_packs
from dpo_sweep.sweep.placement import JOBLIB_LAUNCHER, job_dir, launcher_target, trial_overrides
from dpo_sweep.sweep.state import Sweep, SweepError
from dpo_sweep.sweep.trials import FolderResult, give_up, prepare_launch

log = logging.getLogger(__name__)
STATES = ("COMPLETE", "PRUNED", "FAIL")


class TrialFailed(RuntimeError):
    """A packed trial that its pack job reported FAIL; the message is the error it reported."""


@dataclass
class MemberResult:
    """One trial's entry of its pack job's result, read as a JobReturn of its own job would be:
    `return_value` is its objective, or raises TrialPruned (PRUNED) or TrialFailed (FAIL)."""

    trial: int
    state: str
    value: Any = None
    error: Optional[str] = None

    @property
    def return_value(self) -> Any:
        if self.state == "COMPLETE":
            return tuple(self.value) if isinstance(self.value, list) else self.value
        if self.state == "PRUNED":
            raise optuna.TrialPruned(self.error or "pruned")
        raise TrialFailed(self.error or "the pack job gave no error")


def launch_packed(sweeper, sw: Sweep, batch: List[optuna.Trial]) -> List[Any]:
    """Run a batch with its packable trials packed: plan, prepare every trial's job as its own
    (`prepare_launch`, a pack's members on their leader's GPU), write the members' folders, launch
    the packs' and the singles' jobs in one launcher call. One result a trial, in batch order. A
    batch that cannot start fails its trials and raises; on Ctrl-C all are interrupted."""
    units = plan_batch(sweeper, sw, batch)
    slots = [0] * len(batch)
    for slot, unit in enumerate(units):
        for i in unit:
            slots[i] = slot  # a member runs in its leader's process: its job is pinned as the leader's
    jobs = prepare_launch(sweeper, sw, batch, slots)
    for unit in units:
        if len(unit) > 1:  # the tables' duration footnote: these trials share one process and its time
            for i in unit:
                batch[i].set_user_attr(names.PACK, ",".join(str(batch[j].number) for j in unit))
    try:
        for unit in units:
            for i in unit[1:]:
                write_member_folder(sweeper, sw, batch[i].number, jobs[i])
        launched = [jobs[unit[0]] + (pack_overrides(sw, [batch[i].number for i in unit[1:]]) if len(unit) > 1 else [])
                    for unit in units]
        returns = launch_units(sweeper, sw, batch, units, launched)
    except BaseException as e:  # Ctrl-C included: they run again when the sweep resumes
        give_up(sw, batch, e, interrupted=not isinstance(e, Exception))
        raise
    results: List[Any] = [None] * len(batch)
    for unit, ret in zip(units, returns):
        for i, result in zip(unit, ret):
            results[i] = result
    return results


def plan_batch(sweeper, sw: Sweep, batch: List[optuna.Trial]) -> List[List[int]]:
    """The batch's launch units, indices into `batch` ordered by their first: each pack (its
    leader first) and each trial that runs alone; one log line each, with why a single is one."""
    try:
        cfgs = [compose(sweeper, trial_overrides(sw, t)) for t in batch]
    except BaseException as e:  # a config Hydra cannot compose: the batch cannot start
        give_up(sw, batch, e, interrupted=not isinstance(e, Exception))
        raise
    numbers = [t.number for t in batch]
    packs, singles = plan_packs(cfgs, sw.settings.pack, numbers)
    for pack in packs:
        keys = differing_keys([cfgs[i] for i in pack])
        log.info("trials %s packed in one process over one base model (%s)", label([numbers[i] for i in pack]),
                 f"{', '.join(keys)} differ{'s' if len(keys) == 1 else ''}" if keys else "the same settings")
    for i, reason in singles:
        log.info("trial %d runs alone: %s", numbers[i], reason)
    return sorted([*packs, *([i] for i, _ in singles)])


def pack_overrides(sw: Sweep, members: Sequence[int]) -> List[str]:
    """The overrides that make a leader's job train its pack: `sweep.pack=[5,6,7]`, and how many
    of them go through the model together when `hydra.sweeper.pack_forward` says."""
    forward = sw.settings.pack_forward
    return [f"{names.PACK}=[{','.join(map(str, members))}]"] + ([f"sweep.pack_forward={forward}"] if forward else [])


def launch_units(sweeper, sw: Sweep, batch: List[optuna.Trial], units: List[List[int]],
                 launched: List[List[str]]) -> List[List[Any]]:
    """Launch one job a unit in one launcher call; one result a trial of each unit. When the
    launcher fails as a whole (a job died, was killed or preempted), a `FolderResult` each."""
    try:
        returns = sweeper.launcher.launch(launched, initial_job_idx=batch[0].number)
    except Exception as e:
        log.error("the launcher failed for trials %s: %s: %s", [t.number for t in batch], type(e).__name__, e)
        return [[FolderResult(job_dir(sw, batch[i].number), e) for i in unit] for unit in units]
    return [[ret] if len(unit) == 1 else member_results(ret, [batch[i].number for i in unit],
                                                        [job_dir(sw, batch[i].number) for i in unit])
            for unit, ret in zip(units, returns)]


def member_results(ret, numbers: Sequence[int], folders: Sequence[str]) -> List[Any]:
    """Each member's result from its pack job's JobReturn `ret`: its entry as a `MemberResult`;
    when the job raised, or returned no valid entry for it, a `FolderResult` (the objective its
    metrics.json holds if it finished, else FAIL with the error)."""
    try:
        entries = ret.return_value
    except Exception as e:  # the pack job as a whole failed
        return [FolderResult(folder, e) for folder in folders]
    found = {e.get("trial"): e for e in entries if isinstance(e, dict)} if isinstance(entries, list) else {}
    results: List[Any] = []
    for number, folder in zip(numbers, folders):
        entry = found.get(number)
        if entry is None or entry.get("state") not in STATES:
            error = SweepError(f"the pack job returned no result for trial {number}: {entries!r}"[:500])
            results.append(FolderResult(folder, error))
        else:
            results.append(MemberResult(number, entry["state"], entry.get("value"), entry.get("error")))
    return results


# ---------------------------------------------------------------------------- member folders


def compose(sweeper, overrides: Sequence[str]) -> DictConfig:
    """A trial's config, with Hydra's node, as the launcher composes it for the trial's job."""
    return sweeper.hydra_context.config_loader.load_sweep_config(sweeper.config, list(overrides))


def write_member_folder(sweeper, sw: Sweep, number: int, overrides: Sequence[str]) -> str:
    """Write the `.hydra/` files (config.yaml, hydra.yaml, overrides.yaml) of trial `number` as
    Hydra's `run_job` writes them for the trial's own job (its `overrides`), into its folder
    (`job_dir`); return the folder. Passwords are masked first, as for every config written."""
    config = compose(sweeper, overrides)
    with open_dict(config):
        config.hydra.job.id = job_id(sweeper, config, number)
        config.hydra.job.num = number
    folder = os.path.abspath(os.path.join(str(OmegaConf.select(config, "hydra.sweep.dir")),
                                          str(OmegaConf.select(config, "hydra.sweep.subdir"))))
    if folder != os.path.abspath(job_dir(sw, number)):
        raise SweepError(f"trial {number}'s job would write to {folder}, not to its folder {job_dir(sw, number)}")
    with read_write(config.hydra.runtime), open_dict(config.hydra.runtime):
        config.hydra.runtime.output_dir = folder
    credentials.mask_config(config)
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    hydra_cfg = OmegaConf.masked_copy(config, "hydra")  # what Hydra keeps as HydraConfig
    out = paths.hydra_dir(folder)  # where the pack job reads it, whatever hydra.output_subdir says
    os.makedirs(out, exist_ok=True)
    for name, node in (("config.yaml", task_cfg), ("hydra.yaml", hydra_cfg),
                       (paths.OVERRIDES_FILE, config.hydra.overrides.task)):
        with open(os.path.join(out, name), "w", encoding="utf-8") as f:
            f.write(OmegaConf.to_yaml(node))
    return folder


def job_id(sweeper, config: DictConfig, number: int) -> Any:
    """`hydra.job.id` as the sweep's launcher sets it for job `number`: joblib's
    `<job name>_<number>`; the basic launcher's (and others') the number."""
    if launcher_target(sweeper) == JOBLIB_LAUNCHER:
        return f"{config.hydra.job.name}_{number}"
    return number
