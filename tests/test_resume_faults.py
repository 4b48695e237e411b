"""Faults met on resume: a truncated or damaged checkpoint, a full disk under the MLflow store at
the end of a trial, a single run SIGKILLed (its MLflow run left RUNNING), and a resume asked with
other settings than the checkpoint's. Real checkpoints damaged on disk, real killed processes, a
real SQLite MLflow store and Optuna journal; only the full disk is faked, at the one write."""

import errno
import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from conftest import compose
from dpo_sweep import checkpoint, names, tracking
from dpo_sweep.config import ConfigError
from test_faults import TINY, all_runs, command, finish, kill_when, start, trials_of
from test_sweep import env, snapshot

STEPS = ["train.max_steps=6", "train.checkpoint_every=2", "train.eval_every=2"]


class Crash(Exception):
    pass


def crashed_run(tmp_path, folder, overrides=()):
    """A real run of STEPS cut at step 4 by an exception: its folder holds the step-2 checkpoint."""
    from dpo_sweep.run import run_trial

    def crash_at_step_4(step, metrics):
        if step == 4:
            raise Crash

    with pytest.raises(Crash):
        run_trial(compose([*TINY, *STEPS, "tracking.enabled=false", *overrides]), out_dir=str(tmp_path / folder),
                  on_eval=[crash_at_step_4])
    return tmp_path / folder


def resume(folder, *overrides):
    from dpo_sweep.run import run_trial

    return run_trial(compose([*TINY, *STEPS, "tracking.enabled=false", "train.resume=true", *overrides]),
                     out_dir=str(folder))


def dead_pid():
    """The pid of a process that has exited."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


# -- 1. a truncated or damaged checkpoint


def test_a_damaged_or_truncated_checkpoint_is_refused_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the caches
    folder = crashed_run(tmp_path, "run")
    path = folder / "checkpoint" / "checkpoint.pt"
    manifest = json.loads((folder / "checkpoint" / "checkpoint.json").read_text())
    data = path.read_bytes()
    assert manifest["step"] == 2 and manifest["size"] == len(data)
    assert manifest["sha256"] == hashlib.sha256(data).hexdigest()
    assert manifest["settings"]["beta"] == "0.1" and not any(k.startswith("tracking.") for k in manifest["settings"])

    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF  # one flipped byte among the tensors: torch would read it in silence
    path.write_bytes(bytes(damaged))
    with pytest.raises(checkpoint.CheckpointError) as error:
        resume(folder)
    message = str(error.value)
    assert f"checkpoint {path} does not match the sha256" in message and "\n" not in message

    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated") as error:
        resume(folder)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not (folder / "metrics.json").exists()  # refused: nothing trained in the folder

    path.write_bytes(data)  # intact again: the run goes on from it
    assert resume(folder) is not None and (folder / "metrics.json").exists()


def test_a_save_cut_between_its_two_renames_leaves_an_intact_checkpoint(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.save(path, 1, model, optimizer, scheduler, [], settings={})
    renames = []

    def cut_before_the_manifest(src, dst):
        if dst.endswith(".json"):
            raise KeyboardInterrupt  # the process dies here
        renames.append(dst)
        return real_replace(src, dst)

    real_replace = checkpoint.os.replace
    monkeypatch.setattr(checkpoint.os, "replace", cut_before_the_manifest)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(path, 2, model, optimizer, scheduler, [], settings={})
    monkeypatch.undo()
    assert renames == [path]  # the new file is in place, the old manifest beside it
    assert checkpoint.verified_step(path) == 2  # the new manifest, left as its temporary file, is put in place
    assert json.loads((tmp_path / "checkpoint.json").read_text())["step"] == 2


def test_a_truncated_checkpoint_of_an_interrupted_trial_starts_its_point_again(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = command(tmp_path, store, "truncated", "beta=0.1,0.2", "train.max_steps=8", "train.checkpoint_every=2")
    saved = tmp_path / "sweep" / "0" / "checkpoint"
    first = start(cmd, tmp_path, "first.log")
    path = saved / "checkpoint.pt"
    kill_when(first, lambda _: path.exists(), tmp_path, "first.log")  # trial 0 mid-way
    path.write_bytes(path.read_bytes()[:1000])

    proc = finish(cmd, tmp_path)
    out = proc.stdout + proc.stderr
    assert f"checkpoint {path} is 1000 bytes" in out and "not resuming from this checkpoint" in out
    trials = {t.number: t for t in trials_of(tmp_path)}
    assert trials[0].state == TrialState.FAIL and trials[0].user_attrs[names.INTERRUPTED]
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert sorted(t.params["beta"] for t in complete) == [0.1, 0.2]  # the point is not lost
    assert not any(names.RESUMED_FROM in t.user_attrs for t in complete)  # it started again from step 0


# -- 2. a full disk under the MLflow store as a trial ends

FULL_DISK = """
import errno, os, runpy, sys
from dpo_sweep import tracking

log_results = tracking.log_results

def full_for_trial_0(tracker, run_dir, objective):  # the store's disk fills up as trial 0 logs its results
    if os.path.basename(run_dir) == "0":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    log_results(tracker, run_dir, objective)

tracking.log_results = full_for_trial_0
sys.argv[0] = "dpo_sweep"
runpy.run_module("dpo_sweep", run_name="__main__", alter_sys=True)
"""


def test_a_trial_whose_results_met_a_full_disk_is_completed_on_resume_without_training(tmp_path):
    store, experiment = f"sqlite:///{tmp_path}/mlflow.db", "full"
    cmd = command(tmp_path, store, experiment, "beta=0.1,0.2", "train.max_steps=4")
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    assert cmd[1:3] == ["-m", "dpo_sweep"]
    full = subprocess.run([sys.executable, str(script), *cmd[3:]], cwd=tmp_path, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stdout[-3000:] + full.stderr[-3000:]
    failed = trials_of(tmp_path)[0]
    assert failed.state == TrialState.FAIL and f"[Errno {errno.ENOSPC}]" in failed.user_attrs[names.ERROR]
    results = json.loads((tmp_path / "sweep" / "0" / "metrics.json").read_text())  # on disk before the store
    done = snapshot(tmp_path, 0)
    # A run under the sweep folder whose process died while it ran (not a trial the study knows).
    stray = tracking.Tracker(store, experiment, run_name="stray", tags={
        names.RUN_DIR: str(tmp_path / "sweep" / "9"), names.RUN_OWNER: f"{socket.gethostname()}:{dead_pid()}"})

    proc = finish(cmd, tmp_path)
    assert "from the finished training of failed trial 0, not run again" in proc.stdout + proc.stderr
    trials = {t.number: t for t in trials_of(tmp_path)}
    assert sorted(trials) == [0, 1, 2]  # nothing ran: the grid is complete
    recovered = trials[2]
    assert recovered.state == TrialState.COMPLETE and recovered.params == {"beta": 0.1}
    assert recovered.value == results["objective"] and recovered.user_attrs[names.RECOVERED_FROM] == 0
    assert recovered.user_attrs[names.FOLDER] == str(tmp_path / "sweep" / "0")
    assert snapshot(tmp_path, 0) == done and not (tmp_path / "sweep" / "2").exists()  # not trained again

    runs = {r.info.run_id: r for r in all_runs(store, experiment)}
    assert runs[stray.run_id].info.status == "KILLED"
    assert [r.info.run_name for r in runs.values() if r.info.status == "RUNNING"] == []
    (run,) = [r for r in runs.values() if r.data.tags.get(names.RUN_DIR) == str(tmp_path / "sweep" / "0")]
    assert run.info.status == "FINISHED" and run.info.run_name == "trial-2"
    assert run.data.tags[names.TRIAL_NUMBER] == "2" and run.data.tags[names.STATE] == "COMPLETE"
    assert run.data.tags[names.RECOVERED_FROM] == "0" and names.ERROR not in run.data.tags
    assert run.data.metrics["objective"] == pytest.approx(results["objective"])
    assert run.data.metrics["eval/loss"] == pytest.approx(results["metrics"]["eval/loss"])
    logged = {a.path for a in MlflowClient(tracking_uri=store).list_artifacts(run.info.run_id)}
    assert {"metrics.json", "hydra"} <= logged


# -- 3. a single run SIGKILLed


def test_a_killed_run_left_running_ends_killed_when_its_folder_starts_again(tmp_path):
    store, folder = f"sqlite:///{tmp_path}/mlflow.db", tmp_path / "run"
    cmd = [sys.executable, "-m", "dpo_sweep", *TINY, "train.max_steps=8", "train.checkpoint_every=2",
           f"hydra.run.dir={folder}", f"tracking.uri={store}", "tracking.experiment=single"]
    first = start(cmd, tmp_path, "first.log")
    kill_when(first, lambda _: (folder / "checkpoint" / "checkpoint.pt").exists(), tmp_path, "first.log")
    (killed,) = all_runs(store, "single")
    assert killed.info.status == "RUNNING"

    proc = finish(cmd + ["train.resume=true"], tmp_path)  # only train.resume differs: accepted
    runs = {r.info.run_id: r for r in all_runs(store, "single")}
    assert runs.pop(killed.info.run_id).info.status == "KILLED"
    assert f"run {killed.info.run_id} (run) was left RUNNING" in proc.stdout + proc.stderr
    assert killed.data.tags[names.RUN_OWNER] == f"{socket.gethostname()}:{first.pid}"  # how it was found
    (resumed,) = runs.values()
    assert resumed.info.status == "FINISHED" and resumed.data.tags[names.RUN_DIR] == str(folder)


# -- 4. a resume with other settings


def test_a_resume_with_other_settings_is_refused_naming_each_key_unless_overridden(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    folder = crashed_run(tmp_path, "run")
    with pytest.raises(ConfigError) as error:
        resume(folder, "beta=0.3", "loss=ipo")
    message = str(error.value)
    assert "beta: 0.1 -> 0.3" in message and "loss.name: sigmoid -> ipo" in message
    assert "train.resume_override=true" in message and str(folder / "checkpoint" / "checkpoint.pt") in message
    assert "\n" not in message and "train.resume: False" not in message
    assert not (folder / "metrics.json").exists()
    # Where it runs and logs, and its progress bar, may differ.
    resume(folder, "train.progress=true", "train.device=cpu", "tracking.experiment=elsewhere")
    assert (folder / "metrics.json").exists()

    other = crashed_run(tmp_path, "other")
    with caplog.at_level("WARNING", logger="dpo_sweep.run"):
        resume(other, "beta=0.3", "train.resume_override=true")
    assert "train.resume_override: resuming from" in caplog.text and "beta: 0.1 -> 0.3" in caplog.text
    assert json.loads((other / "metrics.json").read_text())["objective"] is not None


def test_a_pid_that_a_later_process_took_is_not_its_old_owner():
    """A sweeper or run killed long ago whose pid another process has since taken (pids wrap
    around) is taken for dead: that process started after the trial or run was known to run."""
    from dpo_sweep.tracking import owner_is_dead

    me = f"{socket.gethostname()}:{os.getpid()}"
    assert not owner_is_dead(me)  # alive, and nothing known of when its owner ran
    assert not owner_is_dead(me, since=time.time())  # this process ran before now: its own
    assert owner_is_dead(me, since=time.time() - 3600)  # an owner known an hour before this process began
    assert owner_is_dead(f"{socket.gethostname()}:{dead_pid()}", since=time.time())
