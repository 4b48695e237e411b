"""A run's results logged at its end, and again later when the store refused them; runs whose
process died, ended KILLED."""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import OmegaConf

from dpo_sweep import names, paths
from dpo_sweep.tracking.lookup import find_runs, get_run, set_status
from dpo_sweep.tracking.runs import Tracker, flatten

log = logging.getLogger(__name__)


# -- a run's results, logged at its end, and again later when they did not reach the store


def objective_metrics(objective: Any) -> Dict[str, float]:
    """MLflow metrics of a run's objective: `objective`, or `objective/0`, `objective/1`, ... for
    a multi-objective run (a tuple, or a list as metrics.json holds it)."""
    if isinstance(objective, (tuple, list)):
        return {f"objective/{i}": float(v) for i, v in enumerate(objective)}
    return {"objective": float(objective)}


def log_results(tracker: Tracker, run_dir: str, objective: Any) -> None:
    """The end of a run's logging, once its results are in the run folder: metrics.json and
    .hydra/ as artifacts, the objective as metrics, every buffered metric sent. Should the store
    refuse them (a full disk), the folder still holds them for `relog_results`."""
    tracker.log_artifact(paths.metrics_file(run_dir))
    tracker.log_artifact(paths.hydra_dir(run_dir), "hydra")
    tracker.log_metrics(objective_metrics(objective), step=0)
    tracker.flush()


def relog_results(uri: str, experiment: str, run_dir: str, results: Dict[str, Any], run_name: str,
                  tags: Dict[str, Any], run_id: Optional[str] = None, parent_run_id: Optional[str] = None,
                  untag: Tuple[str, ...] = ()) -> str:
    """Log the results of a finished training that did not reach the store, from its run
    folder's metrics.json (`results`): on its run `run_id` (the final metrics it lacks, renamed
    `run_name`, the tags `untag` deleted), or on a new run (child of `parent_run_id`, with the
    params of the folder's saved config); then `tags`, `log_results`, and the end FINISHED.
    Returns the run's id."""
    if run_id:
        tracker = Tracker(uri, experiment, run_id=run_id)
        tracker.client.update_run(run_id, name=run_name)
        present = get_run(uri, run_id).tags
        for key in untag:
            if key in present:
                tracker.client.delete_tag(run_id, key)
    else:
        tracker = Tracker(uri, experiment, run_name=run_name, parent_run_id=parent_run_id)
        saved = os.path.join(paths.hydra_dir(run_dir), "config.yaml")
        if os.path.isfile(saved):
            tracker.log_params(flatten(OmegaConf.load(saved)))
    status = "FAILED"
    try:
        logged = get_run(uri, tracker.run_id).metrics
        if results.get("step") is not None:
            final = {k: v for k, v in results.get("metrics", {}).items() if logged.get(k) != v}
            tracker.log_metrics(final, int(results["step"]))
        tracker.set_tags({names.RUN_DIR: os.path.abspath(run_dir), **tags})
        log_results(tracker, run_dir, results["objective"])
        status = "FINISHED"
    finally:
        tracker.end(status)
    return tracker.run_id


# -- runs whose process died (SIGKILL, a crash, power loss) while they ran


def process_owner() -> str:
    """"host:pid" of this process: the owner tag (names.RUN_OWNER) of the runs it starts."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def owner_is_dead(owner: str, since: Optional[float] = None) -> bool:
    """True when `owner` ("host:pid") is a process of this machine that no longer runs: no process
    has that pid, or (given `since`, when the owner was known to run, in seconds since the epoch)
    the process that has it now started later, the pid reused. A process of another machine, or an
    owner not recorded, is never taken for dead."""
    import socket

    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # another user's process: alive
        return False
    started = process_start_time(int(pid))
    return since is not None and started is not None and started > since + 1.0  # /proc's boot time: whole seconds


def process_start_time(pid: int) -> Optional[float]:
    """When process `pid` started, in seconds since the epoch (Linux /proc); None elsewhere."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime, after the name
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def end_dead_runs(uri: str, experiment: str, folder: str, below: bool = False) -> List[str]:
    """End KILLED (MLflow's status for a run whose process was killed) the runs of `experiment`
    left RUNNING in the run folder `folder` (`below`: in any folder under it) by a process of this
    machine that no longer runs (names.RUN_OWNER). Returns their ids."""
    folder = os.path.abspath(folder)
    if "'" in folder:  # not expressible in an MLflow filter
        return []
    where = f"LIKE '{folder}{os.sep}%'" if below else f"= '{folder}'"
    runs = find_runs(uri, experiment, f"tags.`{names.RUN_DIR}` {where} and attributes.status = 'RUNNING'")
    ended = []
    for run in runs:
        run_dir = run.tags.get(names.RUN_DIR, "")
        inside = run_dir.startswith(folder + os.sep) if below else run_dir == folder  # LIKE's _ matches any character
        owner = run.tags.get(names.RUN_OWNER, "")
        if inside and owner_is_dead(owner, since=(run.start_time or 0) / 1000 or None):
            set_status(uri, run.run_id, "KILLED")
            log.warning("MLflow: run %s (%s) was left RUNNING by %s, which no longer runs; ended KILLED",
                        run.run_id, run.name, owner)
            ended.append(run.run_id)
    return ended
