"""MLflow lineage of a sweep: its parent run (created before any trial, found again on resume)
and the tags that tie each trial's run to its Optuna trial."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Dict, Optional, Sequence

from optuna.trial import FrozenTrial, TrialState

from dpo_sweep import names, paths, results, tracking
from dpo_sweep.sweep.state import Sweep

log = logging.getLogger(__name__)
# MLflow status of a trial's run once the trial is finished (an interrupted one: KILLED).
RUN_STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}


STAMP = re.compile(r"(\d{4})-(\d{2})-(\d{2})_(\d{2})-(\d{2})-(\d{2})(?:-\d+)?")  # the default sweep folder name


def short_names(keys: Sequence[str]) -> Dict[str, str]:
    """Each swept key's short name for run names and params: its last part (`optimizer.lr` ->
    `lr`), or the whole key where two keys would share one."""
    parts = [k.lstrip("+~").rsplit(".", 1)[-1] for k in keys]
    return {k: p if parts.count(p) == 1 else k.lstrip("+~") for k, p in zip(keys, parts)}


def parent_name(sw: Sweep) -> str:
    """A readable, distinct name for the runs table, where long names are cut: what differs
    comes first. `sweep 15:25:18 12-04: beta, lr` for a sweep in a timestamped folder, else
    `<study>: beta, lr`."""
    keys = ", ".join(short_names([d.key for d in sw.dims]).values()) or "fixed overrides"
    m = STAMP.fullmatch(sw.study.study_name)
    if m:
        year, month, day, hour, minute, second = m.groups()
        return f"sweep {hour}:{minute}:{second} {month}-{day}: {keys}"
    return f"{sw.study.study_name}: {keys}"


def trial_name(sw: Sweep, number: int, params: Dict[str, Any]) -> str:
    """A trial's run name: its number and its setting, `t3 beta=0.3 lr=0.004`."""
    short = short_names([d.key for d in sw.dims])
    return " ".join([f"t{number}"] + [f"{short[d.key]}={results.fmt(params[d.key])}" for d in sw.dims
                                      if d.key in params])


def open_parent(sw: Sweep) -> Optional[tracking.Tracker]:
    """The sweep's MLflow parent run, created before any trial starts (the store and the
    experiment with it), or found again when the study resumes."""
    t = sw.base.tracking
    if not t.enabled:
        return None
    uri = tracking.resolve_uri(t.uri, os.getcwd())
    attrs = sw.study.user_attrs
    known = attrs.get(names.PARENT_ATTR) if attrs.get(names.PARENT_URI_ATTR) == uri else None
    known = known if known and tracking.get_run(uri, known) else orphan_parent(sw, uri)
    if known:
        parent = tracking.Tracker(uri, t.experiment, run_id=known)
        log.info("MLflow: going on with parent run %s in %s", known, uri)
    else:
        tags = {names.STUDY_NAME: sw.study.study_name, names.ROLE: names.PARENT_ROLE, names.STORAGE: sw.location}
        parent = tracking.Tracker(uri, t.experiment, run_name=parent_name(sw), tags=tags)
        log.info("MLflow: parent run %s in %s", parent.run_id, uri)
    if attrs.get(names.PARENT_ATTR) != parent.run_id or attrs.get(names.PARENT_URI_ATTR) != uri:
        sw.study.set_user_attr(names.PARENT_ATTR, parent.run_id)
        sw.study.set_user_attr(names.PARENT_URI_ATTR, uri)
    parent.set_tags(parent_tags(sw))
    return parent


def parent_tags(sw: Sweep) -> Dict[str, Any]:
    """What the parent run says of the sweep: folder, storage, sampler, objective, space."""
    return {
        names.FOLDER: sw.sweep_dir, names.STORAGE: sw.location,
        names.SAMPLER: "grid" if sw.grid else sw.settings.sampler, names.PRUNER: sw.settings.pruner,
        names.N_TRIALS: "the full grid" if sw.settings.n_trials is None else sw.settings.n_trials,
        names.OBJECTIVE: ", ".join(f"{m} ({d})" for m, d in zip(sw.metrics, sw.directions)),
        names.FIXED_OVERRIDES: " ".join(sw.fixed),
        **{names.SPACE_PREFIX + d.key: d.spec for d in sw.dims},
        names.NOTE: parent_note(sw),
    }


def parent_note(sw: Sweep) -> str:
    """The parent run's description (MLflow's run note): what the sweep searches, where its
    results are, and how to resume it."""
    space = ", ".join(f"`{d.key}={d.spec}`" for d in sw.dims) or "the fixed overrides only"
    sampler = "every point of the grid" if sw.grid else f"{sw.settings.n_trials} trials chosen by {sw.settings.sampler}"
    objective = ", ".join(f"{m} ({d})" for m, d in zip(sw.metrics, sw.directions))
    folder = paths.shown(sw.sweep_dir)
    return "\n\n".join([
        f"Sweep `{sw.study.study_name}` of DPO training over {space}: {sampler}, objective {objective}. "
        f"Each child run is one trial; the tags `best.*` name the best.",
        f"Results: `optimization_results.yaml` and `plots/` here; the table and plots again: "
        f"`python -m dpo_sweep.report {folder}`.",
        f"Resume, or run the missing points: the same command with `hydra.sweep.dir={folder}`.",
    ])


def orphan_parent(sw: Sweep, uri: str) -> Optional[str]:
    """A RUNNING parent run of this study and storage that the study does not name: its sweeper
    was killed between creating it and recording it in the study. Its id, or None."""
    values = [sw.study.study_name, sw.location]
    if any("'" in v for v in values):  # not expressible in an MLflow filter: a new parent instead
        return None
    runs = tracking.find_runs(uri, sw.base.tracking.experiment,
                              f"tags.`{names.ROLE}` = '{names.PARENT_ROLE}' and tags.`{names.STUDY_NAME}` = "
                              f"'{values[0]}' and tags.`{names.STORAGE}` = '{values[1]}' and "
                              f"attributes.status = 'RUNNING'")
    return runs[0].run_id if runs else None


def child_runs(sw: Sweep) -> Dict[int, tracking.RunSummary]:
    """The parent's child runs by trial number (the newest run of each number)."""
    runs = tracking.find_runs(sw.parent.uri, sw.base.tracking.experiment,
                              f"tags.`{names.PARENT_RUN_ID}` = '{sw.parent.run_id}'")
    return tracking.by_trial_number(runs)


def run_tags(trial: FrozenTrial) -> Dict[str, Any]:
    """The tags of a finished trial's run: its Optuna state, and its error, whether it was
    interrupted, or its checkpoint source."""
    tags: Dict[str, Any] = {names.STATE: trial.state.name}
    for attr in (names.ERROR, names.INTERRUPTED, names.RESUMED_FROM):
        if attr in trial.user_attrs:
            tags[attr] = trial.user_attrs[attr]
    return tags


def tag_child_runs(sw: Sweep, told: Sequence[FrozenTrial]) -> None:
    """Tag each trial's run with its Optuna state (and error), to filter them in the MLflow UI,
    and log its swept values under their short names (`lr`) beside the config's dotted ones."""
    runs = child_runs(sw)
    short = short_names([d.key for d in sw.dims])
    for trial in told:
        if trial.number in runs:
            run = runs[trial.number]
            tracking.set_tags(sw.parent.uri, run.run_id, run_tags(trial))
            params = {short[k]: v for k, v in trial.params.items() if k in short and short[k] not in run.params}
            if params:
                tracking.log_params(sw.parent.uri, run.run_id, params)


def settle_child_runs(sw: Sweep) -> None:
    """Bring the runs of finished trials in line with the study after a sweeper was killed: a
    run left RUNNING ends (KILLED when its trial was interrupted or pruned, FAILED, or FINISHED)
    and a run without its state tag gets it. Runs of trials still running are left alone."""
    trials = {t.number: t for t in sw.study.get_trials(deepcopy=False)}
    for number, run in child_runs(sw).items():
        trial = trials.get(number)
        if trial is None or not trial.state.is_finished():
            continue
        tags = run_tags(trial)
        if run.status == "RUNNING" or any(run.tags.get(k) != str(v) for k, v in tags.items()):
            tracking.set_tags(sw.parent.uri, run.run_id, tags)
        if run.status == "RUNNING":
            status = "KILLED" if trial.user_attrs.get(names.INTERRUPTED) else RUN_STATUS[trial.state]
            tracking.set_status(sw.parent.uri, run.run_id, status)
            log.info("MLflow: run %s of trial %d was left RUNNING; ended %s", run.run_id, number, status)
