"""Scale out: one GPU per parallel trial, trials as submitit jobs, and a study in PostgreSQL.

The sweeps run `python -m dpo_sweep ... -m` in a subprocess, trials shrunk to two steps (each
also evaluated at step 1, so that every trial reports to the study from its own process)."""

import os
import subprocess
import sys

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import FAST, REPO
from dpo_sweep.sweep import JOBLIB_LAUNCHER, gpu_slots, pins_gpus

SMALL = [*FAST, "train.max_steps=2", "train.eval_every=1", "train.progress=false", "dataset.builtin_size=100",
         "dataset.eval_size=20", "train.eval_batch_size=20"]
PARALLEL = ["hydra.sweeper.n_jobs=2"]  # two trials asked, launched and told together
SUBMITIT_LOCAL = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher"


# -- one GPU per trial of a parallel batch


def test_each_trial_of_a_batch_gets_its_own_gpu_round_robin():
    assert gpu_slots(2, 2) == [0, 1]
    assert gpu_slots(4, 2) == [0, 1, 0, 1]  # more trials than GPUs: they share, evenly
    assert gpu_slots(3, 8) == [0, 1, 2]


def test_no_gpu_is_pinned_with_fewer_than_two():
    assert gpu_slots(2, 1) == [None, None]  # one GPU: train.device stays as configured
    assert gpu_slots(2, 0) == [None, None]  # CPU only


def test_gpus_are_pinned_only_for_parallel_joblib_trials_that_leave_the_device_free():
    assert pins_gpus(JOBLIB_LAUNCHER, 2, "auto", "dpo_sweep", [])
    assert pins_gpus(JOBLIB_LAUNCHER, 4, "cuda", "dpo_sweep", ["beta"])
    assert not pins_gpus(JOBLIB_LAUNCHER, 1, "auto", "dpo_sweep", [])  # one trial at a time
    assert not pins_gpus("hydra._internal.core_plugins.basic_launcher.BasicLauncher", 2, "auto", "dpo_sweep", [])
    assert not pins_gpus(SUBMITIT_LOCAL, 2, "auto", "dpo_sweep", [])  # the scheduler places its jobs
    assert not pins_gpus(JOBLIB_LAUNCHER, 2, "cuda:1", "dpo_sweep", [])  # the user chose the GPU
    assert not pins_gpus(JOBLIB_LAUNCHER, 2, "cpu", "dpo_sweep", [])
    assert not pins_gpus(JOBLIB_LAUNCHER, 2, "auto", "dpo_sweep", ["train.device"])  # swept: its values win
    assert not pins_gpus(JOBLIB_LAUNCHER, 2, "auto", "trl", [])  # TRL wants CUDA_VISIBLE_DEVICES, not cuda:N


# -- sweeps in a subprocess


def env():
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)


def run_sweep(tmp, store, *args, timeout=400):
    """`python -m dpo_sweep -m` into `tmp`/sweep, logging to the MLflow store `store`."""
    command = [sys.executable, "-m", "dpo_sweep", "-m", *SMALL, f"hydra.sweep.dir={tmp}/sweep",
               f"tracking.uri={store}", *args]
    proc = subprocess.run(command, cwd=tmp, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def runs_of(store):
    """(parent, children by trial number) of the only sweep in the store's default experiment."""
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("dpo-sweep").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1  # every other run is a child of the sweep's parent
    return parents[0], {int(r.data.tags["sweep.trial_number"]): r for r in children}


def job_overrides(tmp, number):
    """The overrides a trial's job was launched with, as its folder saved them."""
    path = tmp / "sweep" / str(number) / ".hydra" / "overrides.yaml"
    return dict(line.split("=", 1) for line in yaml.safe_load(path.read_text()))


def check_trials_reached(tmp, store, study, location):
    """Every trial ran as a child of the sweep's parent run, was given the parent's id and the
    study's storage as overrides, and used that storage from its own process (its evals are the
    study's intermediate values)."""
    parent, children = runs_of(store)
    assert parent.info.status == "FINISHED"
    assert sorted(children) == [t.number for t in study.trials]
    for trial in study.trials:
        overrides = job_overrides(tmp, trial.number)
        assert overrides["tracking.parent_run_id"].strip("'") == parent.info.run_id
        assert overrides["sweep.storage"].strip("'") == location
        assert "train.device" not in overrides  # no GPU here: nothing to pin
        run = children[trial.number]
        assert run.info.status == "FINISHED" and run.data.tags["sweep.state"] == "COMPLETE"
        assert run.data.params["sweep.storage"] == location
        assert run.data.metrics["objective"] == pytest.approx(trial.value)
        assert sorted(trial.intermediate_values) == [1, 2]
    return parent, children


def launched_together(trials, a, b):
    """True when trials a and b were one batch: both asked before either was told. (The runs'
    wall-clock overlap is not a reliable check: tiny trials can finish before a worker starts.)"""
    first, second = trials[a], trials[b]
    return first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete


@pytest.mark.slow
def test_submitit_local_runs_each_trial_as_a_job_under_the_sweeps_parent(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_sweep(tmp_path, store, "beta=0.1,0.5", "hydra/launcher=submitit_local", *PARALLEL)
    location = str(tmp_path / "sweep" / "optuna.journal")
    study = optuna.load_study(study_name="sweep", storage=JournalStorage(JournalFileBackend(location)))
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["beta"] for t in study.trials) == [0.1, 0.5]
    check_trials_reached(tmp_path, store, study, location)
    jobs = [d for d in (tmp_path / "sweep" / ".submitit").iterdir() if list(d.glob("*_result.pkl"))]
    assert len(jobs) == 2  # one submitit job (its own process) per trial
    for number in (0, 1):
        hydra_cfg = yaml.safe_load((tmp_path / "sweep" / str(number) / ".hydra" / "hydra.yaml").read_text())
        assert hydra_cfg["hydra"]["launcher"]["_target_"] == SUBMITIT_LOCAL
        assert hydra_cfg["hydra"]["job"]["id"] in {d.name for d in jobs}  # the submitit job id


@pytest.mark.slow
def test_study_in_postgresql_runs_trials_in_parallel_and_resumes(tmp_path, postgres_url):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = ["beta=0.1,0.2,0.3,0.4", "hydra.sweeper.sampler.name=grid", f"hydra.sweeper.storage='{postgres_url}'",
             "hydra.sweeper.study_name=pg"]
    run_sweep(tmp_path, store, *sweep, "hydra.sweeper.n_trials=2", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
              *PARALLEL)
    assert not (tmp_path / "sweep" / "optuna.journal").exists()  # the study is in the database
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["beta"] for t in study.trials) == [0.1, 0.2]
    check_trials_reached(tmp_path, store, study, postgres_url)
    assert launched_together(study.trials, 0, 1)  # one batch of two, through joblib

    # Another invocation (the basic launcher: one trial needs no workers) goes on with the same study.
    proc = run_sweep(tmp_path, store, *sweep, "hydra.sweeper.n_trials=3")
    assert "1 trials to run" in proc.stdout  # the two finished trials count
    study = optuna.load_study(study_name="pg", storage=postgres_url)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 3
    assert [t.params["beta"] for t in study.trials] == [0.1, 0.2, 0.3]  # the next grid point, not a repeat
    check_trials_reached(tmp_path, store, study, postgres_url)  # under the same parent run
