"""Trials dispatched as workers free up: with the joblib launcher and `n_jobs > 1`, `n_jobs` worker
slots each run one trial at a time, and a new trial is asked the moment one ends."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence, Tuple

import optuna

from dpo_sweep.sweep.placement import JOBLIB_LAUNCHER, job_dir, launcher_target
from dpo_sweep.sweep.state import Sweep


from dpo_sweep.sweep.trials import (FolderResult, ask_batch, count_failed, give_up, launch_jobs, prepare_launch,
                                    record, too_many_failures)

log = logging.getLogger(__name__)


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
