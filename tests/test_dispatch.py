"""Trials launched as workers free up (joblib launcher, n_jobs > 1): a slow trial holds only its
own worker. The loop's bookkeeping (slots, failures, Ctrl-C) in process with a fake launcher;
then a real sweep through Hydra's joblib launcher in a subprocess."""

import os
import signal
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import FAST, REPO
from dpo_sweep import names
from dpo_sweep.sweep import JOBLIB_LAUNCHER, Sweep, SweepError, dispatches, pin_gpus, run_batches
from dpo_sweep.sweep import dispatch
from dpo_sweep.sweep.space import Dimension

BASIC_LAUNCHER = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"


# -- in process: a fake launcher whose job for point x sleeps SECONDS[x] and returns x


class Returned:
    def __init__(self, value):
        self.value = value

    @property
    def return_value(self):
        if isinstance(self.value, Exception):
            raise self.value
        return self.value


class FakeLauncher:
    """Runs each job in the calling thread: sleeps, then returns its point x (or raises for x < 0).
    Records when each job (trial number) started and ended, and calls `on_start(number)`."""

    def __init__(self, seconds, on_start=None):
        self.seconds, self.on_start, self.times = seconds, on_start, {}

    def launch(self, jobs, initial_job_idx):
        (job,) = jobs  # one job a launch
        x = float(next(o.split("=", 1)[1] for o in job if o.startswith("x=")))
        start = time.monotonic()
        if self.on_start:
            self.on_start(initial_job_idx)
        time.sleep(self.seconds.get(x, 0.01))
        self.times[initial_job_idx] = (start, time.monotonic())
        return [Returned(RuntimeError("bad point") if x < 0 else x)]


def fake_sweep(tmp_path, xs, launcher, n_jobs=2, max_failure_rate=0.5, target=JOBLIB_LAUNCHER):
    dim = Dimension("x", ",".join(map(str, xs)), CategoricalDistribution(xs), tuple(xs))
    settings = SimpleNamespace(n_jobs=n_jobs, max_failure_rate=max_failure_rate, n_trials=None, pack=1)
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, direction="maximize")
    sw = Sweep(settings, [dim], [], OmegaConf.create({"train": {"device": "cpu"}, "trainer": "dpo_sweep"}),
               str(tmp_path), "memory", storage, study, ["x"], ["maximize"], grid=True)
    sweeper = SimpleNamespace(config=OmegaConf.create({"hydra": {"launcher": {"_target_": target}}}),
                              launcher=launcher, validate_batch_is_legal=lambda jobs: None)
    return sweeper, sw


def test_only_the_joblib_launcher_with_several_jobs_dispatches(tmp_path):
    for target, n_jobs, expected in [(JOBLIB_LAUNCHER, 2, True), (JOBLIB_LAUNCHER, 1, False),
                                     (BASIC_LAUNCHER, 2, False)]:
        sweeper, sw = fake_sweep(tmp_path, [1.0], FakeLauncher({}), n_jobs=n_jobs, target=target)
        assert dispatches(sweeper, sw) == expected


def test_a_trial_starts_in_the_slot_a_trial_freed_while_a_slow_one_runs(tmp_path):
    launcher = FakeLauncher({2.0: 1.0})  # the second point is slow
    sweeper, sw = fake_sweep(tmp_path, [1.0, 2.0, 3.0, 4.0, 5.0], launcher)
    returns = run_batches(sweeper, sw)
    trials = sw.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5 and [t.value for t in trials] == [1, 2, 3, 4, 5]
    assert len(returns) == 5  # one launch a trial
    slow_end = launcher.times[1][1]
    assert all(launcher.times[n][0] < slow_end for n in (2, 3, 4))  # the others ran beside the slow one
    moments = sorted(start for start, _ in launcher.times.values())
    assert all(sum(s <= m < e for s, e in launcher.times.values()) <= 2 for m in moments)  # two at most


def test_gpus_follow_the_worker_slot(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    sweeper, sw = fake_sweep(tmp_path, [1.0], FakeLauncher({}), n_jobs=4)
    sw.base.train.device = "auto"
    assert pin_gpus(sweeper, sw, [["a"]], [3]) == [["a", "train.device=cuda:1"]]
    assert pin_gpus(sweeper, sw, [["a"], ["b"]]) == [["a", "train.device=cuda:0"], ["b", "train.device=cuda:1"]]


def test_too_many_failures_stop_asking_and_the_running_trials_are_told_first(tmp_path):
    launcher = FakeLauncher({2.0: 0.5})
    sweeper, sw = fake_sweep(tmp_path, [-1.0, 2.0, -3.0, 4.0, 5.0, 6.0], launcher, max_failure_rate=0.2)
    with pytest.raises(SweepError, match="2 of 6 trials failed"):
        run_batches(sweeper, sw)
    # trials 0 and 2 failed while 1 ran: no trial asked after that, and 1 was told before the end
    assert [t.state for t in sw.study.trials] == [TrialState.FAIL, TrialState.COMPLETE, TrialState.FAIL]


def test_ctrl_c_stops_the_running_trials_and_marks_them_interrupted(tmp_path, monkeypatch):
    stopped = []
    monkeypatch.setattr(dispatch, "stop_joblib_workers", lambda: stopped.append(True))
    main = threading.main_thread().ident

    def on_start(number):  # Ctrl-C once trial 2 is launched (trial 0 has ended, 1 still runs)
        if number == 2:
            threading.Timer(0.1, signal.pthread_kill, (main, signal.SIGINT)).start()

    launcher = FakeLauncher({2.0: 3.0, 3.0: 3.0}, on_start)
    sweeper, sw = fake_sweep(tmp_path, [1.0, 2.0, 3.0, 4.0], launcher)
    with pytest.raises(KeyboardInterrupt):
        run_batches(sweeper, sw)
    trials = sw.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL, TrialState.FAIL]
    for t in trials[1:]:
        assert t.user_attrs[names.INTERRUPTED] and t.user_attrs[names.ERROR].startswith("not finished: KeyboardInterrupt")
    assert stopped == [True]


# -- a real sweep: Hydra's joblib launcher, two workers, one long trial among short ones

LONG = 200  # steps: seconds here, against well under one for a short trial
STEPS = [2, LONG, 3, 4]


def test_joblib_sweep_starts_a_trial_while_a_long_one_runs(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    command = [sys.executable, "-m", "dpo_sweep", "-m", *FAST, "train.progress=false", "dataset.builtin_size=100",
               "dataset.eval_size=20", "train.eval_batch_size=20", "train.max_steps=" + ",".join(map(str, STEPS)),
               "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2",
               f"hydra.sweep.dir={tmp_path}/sweep", f"tracking.uri={store}"]
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    storage = JournalStorage(JournalFileBackend(str(tmp_path / "sweep" / "optuna.journal")))
    trials = optuna.load_study(study_name="sweep", storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(STEPS)
    assert [t.params["train.max_steps"] for t in trials] == STEPS  # the grid, in order
    long = trials[1]
    # Trial 2 took the worker trial 0 freed, and started before the long trial ended.
    assert trials[0].datetime_complete <= trials[2].datetime_start < long.datetime_complete

    for t in trials:  # folders by trial number, each a complete run folder with its Hydra files
        folder = tmp_path / "sweep" / str(t.number)
        assert (folder / "metrics.json").is_file()
        assert yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["train"]["max_steps"] == \
            t.params["train.max_steps"]
        job = yaml.safe_load((folder / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]
        assert job["num"] == t.number
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.name.isdigit()) == ["0", "1", "2", "3"]

    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("dpo-sweep").experiment_id])
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = {int(r.data.tags["sweep.trial_number"]): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert parent.info.status == "FINISHED" and sorted(children) == [0, 1, 2, 3] and len(runs) == 5
    for t in trials:
        run = children[t.number]
        assert run.info.status == "FINISHED" and run.data.tags["sweep.state"] == "COMPLETE"
        assert run.data.metrics["objective"] == pytest.approx(t.value)
