"""Faults at sweep level: a sweeper SIGKILLed at any moment and rerun with the same command, a
killed trial resumed from its checkpoint, parallel trials sharing one SQLite MLflow store and one
journal, a locked store, and pruning under torchrun. Sweeps run as subprocesses (in their own
process group, so that a kill takes the trials with them) on tiny runs of the built-in set."""

import contextlib
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import FAST, compose
from dpo_sweep import names, sweep, tracking
from dpo_sweep.sweep import space as sweep_space
from test_sweep import env, snapshot

TINY = [*FAST, "train.progress=false", "dataset.builtin_size=60", "dataset.eval_size=10"]
POLL = 0.02  # seconds between looks at a running sweep


def command(tmp, store, experiment, *args):
    """A tiny sweep into `tmp`/sweep, logging to `store` under `experiment`."""
    return [sys.executable, "-m", "dpo_sweep", "-m", *TINY, f"hydra.sweep.dir={tmp}/sweep",
            f"tracking.uri={store}", f"tracking.experiment={experiment}", *args]


def start(cmd, tmp, log_name):
    """The sweep as a process group leader, its output in `tmp`/`log_name`."""
    with open(tmp / log_name, "w") as out:
        return subprocess.Popen(cmd, cwd=tmp, env=env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def finish(cmd, tmp, timeout=300):
    proc = subprocess.run(cmd, cwd=tmp, env=env(), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def kill_when(proc, ready, tmp, log_name, timeout=180):
    """SIGKILL the sweep's whole process group as soon as `ready(proc)` holds."""
    deadline = time.time() + timeout
    try:
        while not ready(proc):
            assert proc.poll() is None, f"the sweep ended before the kill:\n{(tmp / log_name).read_text()[-3000:]}"
            assert time.time() < deadline, f"not ready in {timeout}s:\n{(tmp / log_name).read_text()[-3000:]}"
            time.sleep(POLL)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def study_of(tmp, name="sweep"):
    """The study of `tmp`/sweep as it is on disk now; None before it exists."""
    path = tmp / "sweep" / "optuna.journal"
    if not path.exists():
        return None
    try:
        return optuna.load_study(study_name=name, storage=JournalStorage(JournalFileBackend(str(path))))
    except KeyError:  # the journal exists, the study is not created yet
        return None


def trials_of(tmp):
    study = study_of(tmp)
    return study.trials if study else []


def all_runs(store, experiment):
    client = MlflowClient(tracking_uri=store)
    return client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=1000)


def assert_consistent(tmp, store, experiment, points):
    """The sweep ended as if never killed: every point COMPLETE exactly once, every other trial
    an interrupted FAIL, no MLflow run RUNNING, one FINISHED parent whose children carry their
    trial's state. Returns (trials by number, child runs by trial number)."""
    trials = {t.number: t for t in trials_of(tmp)}
    complete = [t for t in trials.values() if t.state == TrialState.COMPLETE]
    assert sorted(t.params["beta"] for t in complete) == sorted(points)
    for t in trials.values():
        assert t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and t.user_attrs["sweep.interrupted"]), t
    runs = all_runs(store, experiment)
    assert [r.info.run_name for r in runs if r.info.status == "RUNNING"] == []
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {int(r.data.tags["sweep.trial_number"]): r for r in runs if r is not parents[0]}
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children.values())
    for number, run in children.items():
        assert run.data.tags["sweep.state"] == trials[number].state.name
        assert run.info.status == ("FINISHED" if trials[number].state == TrialState.COMPLETE else "KILLED")
    return trials, children


def metrics_of(folder):
    return json.loads((folder / "metrics.json").read_text())["metrics"]


# -- 1. a trial killed mid-way goes on from its checkpoint


def test_killed_trial_resumes_from_its_checkpoint_with_the_same_result(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    steps = ["train.max_steps=24", "train.checkpoint_every=4", "train.eval_every=8"]
    cmd = command(tmp_path, store, "resume", "beta=0.1,0.3", *steps)
    first = start(cmd, tmp_path, "first.log")
    checkpoint = tmp_path / "sweep" / "1" / "checkpoint" / "checkpoint.pt"
    kill_when(first, lambda _: checkpoint.exists(), tmp_path, "first.log")  # trial 1 is mid-way
    killed_at = sweep.checkpoint_step(str(checkpoint))
    assert 4 <= killed_at < 24
    done = snapshot(tmp_path, 0)

    proc = finish(cmd, tmp_path)
    trials, children = assert_consistent(tmp_path, store, "resume", [0.1, 0.3])
    assert snapshot(tmp_path, 0) == done  # the finished trial was not run again
    assert sorted(trials) == [0, 1, 2] and trials[1].user_attrs["sweep.interrupted"]
    resumed = trials[2]
    assert resumed.params == {"beta": 0.3} and resumed.user_attrs["sweep.resumed_from"] == 1
    said = f"resumes the point of interrupted trial 1 from its checkpoint at step {killed_at}"
    assert said in proc.stdout + proc.stderr
    assert sorted(resumed.intermediate_values) == [8, 16, 24]  # those before the checkpoint came from trial 1
    assert not (tmp_path / "sweep" / "2" / "checkpoint").exists()  # removed once the run finished

    # The same point run once, uninterrupted, outside any sweep: the same final metrics.
    monkeypatch.chdir(tmp_path)  # the reference log-probs cache, as the sweep's trials use it
    from dpo_sweep.run import run_trial

    cfg = compose(TINY + steps + ["beta=0.3", "tracking.enabled=false"])
    run_trial(cfg, out_dir=str(tmp_path / "uninterrupted"))
    assert metrics_of(tmp_path / "sweep" / "2") == metrics_of(tmp_path / "uninterrupted")
    history = MlflowClient(tracking_uri=store).get_metric_history(children[2].info.run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(1, 25))  # the whole curve on the resumed run


# -- 2. SIGKILL at any moment


def test_sweep_killed_at_any_moment_ends_consistent(tmp_path):
    """One sweep, killed four times at different moments, each time rerun with the same command;
    the fifth run finishes it. Before the first run, the state a sweeper killed between creating
    its MLflow parent run and recording it in the study leaves: a RUNNING parent nobody names."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = command(tmp_path, store, "moments", "beta=0.1,0.2,0.3", "train.max_steps=8", "train.checkpoint_every=2")
    sweep_dir = tmp_path / "sweep"
    orphan = tracking.Tracker(store, "moments", run_name="sweep-sweep", tags={
        "sweep.role": "parent", "sweep.study_name": "sweep", "sweep.storage": str(sweep_dir / "optuna.journal")})

    def parent_recorded(_):  # read straight from the journal: the moment passes in a few tenths of a second
        journal = sweep_dir / "optuna.journal"
        return journal.exists() and names.PARENT_ATTR.encode() in journal.read_bytes()

    def asked_by(proc, state):
        """Trials of this run (their owner is `proc`) in `state`."""
        owner = f"{socket.gethostname()}:{proc.pid}"
        return [t for t in trials_of(tmp_path) if t.state == state and t.user_attrs.get(names.OWNER) == owner]

    def one_complete(proc):
        return bool(asked_by(proc, TrialState.COMPLETE))

    def mid_trial(proc):
        return any((sweep_dir / str(t.number) / "checkpoint" / "checkpoint.pt").exists()
                   for t in asked_by(proc, TrialState.RUNNING))

    def results_written(_):
        return (sweep_dir / "optimization_results.yaml").exists()

    seen = {}  # snapshots of complete trials' folders, taken when first seen complete
    states_at_kill = []
    for n, ready in enumerate([parent_recorded, one_complete, mid_trial, results_written]):
        proc = start(cmd, tmp_path, f"run{n}.log")
        kill_when(proc, ready, tmp_path, f"run{n}.log")
        trials = trials_of(tmp_path)
        states_at_kill.append([t.state for t in trials])
        for t in trials:
            if t.state == TrialState.COMPLETE:
                seen.setdefault(t.number, snapshot(tmp_path, t.number))
        # No point is ever COMPLETE twice, whatever the moment.
        betas = [t.params["beta"] for t in trials if t.state == TrialState.COMPLETE]
        assert len(betas) == len(set(betas))
    assert states_at_kill[0] == []  # killed after the parent was recorded, before any trial was asked
    assert TrialState.RUNNING in states_at_kill[2]  # killed during a trial
    assert sorted(set(states_at_kill[3]) - {TrialState.FAIL}) == [TrialState.COMPLETE]  # after the last one

    finish(cmd, tmp_path)
    trials, children = assert_consistent(tmp_path, store, "moments", [0.1, 0.2, 0.3])
    assert {n: snapshot(tmp_path, n) for n in seen} == seen  # no finished trial was run again
    parent = [r for r in all_runs(store, "moments") if r.data.tags.get("sweep.role") == "parent"][0]
    assert parent.info.run_id == orphan.run_id  # the orphaned parent was taken up, not duplicated
    interrupted = [t.number for t in trials.values() if t.state == TrialState.FAIL]
    resumed = [t.user_attrs.get("sweep.resumed_from") for t in trials.values()]
    assert any(n in resumed for n in interrupted)  # the trial killed mid-way went on from its checkpoint


# -- 3. parallel trials, one SQLite store, one journal


def test_parallel_trials_lose_no_metric_and_no_trial(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    steps = 8
    finish(command(tmp_path, store, "parallel", "beta=0.1,0.2,0.3,0.4", f"train.max_steps={steps}",
                   "train.log_every=1", "train.eval_every=2", "hydra/launcher=joblib", "hydra.sweeper.n_jobs=2",
                   "hydra.launcher.n_jobs=2"), tmp_path)
    trials, children = assert_consistent(tmp_path, store, "parallel", [0.1, 0.2, 0.3, 0.4])
    assert sorted(trials) == sorted(children) == [0, 1, 2, 3]
    client = MlflowClient(tracking_uri=store)
    evals = list(range(2, steps + 1, 2))
    for number, run in children.items():
        for key in ("train/loss", "train/rewards/accuracies", "train/grad_norm", "train/lr"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == list(range(1, steps + 1))
        for key in ("eval/loss", "eval/rewards/accuracies"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == evals
        assert sorted(trials[number].intermediate_values) == evals
        assert run.data.metrics["objective"] == pytest.approx(trials[number].value)


# -- the retries that make a shared SQLite store safe


@pytest.fixture
def locked_db(tmp_path):
    """A SQLite file with a table, and a second connection that holds it exclusively."""
    path = tmp_path / "locked.db"
    with contextlib.closing(sqlite3.connect(path)) as setup:
        setup.execute("create table t (x integer)")
        setup.commit()
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    yield path, holder
    if holder.in_transaction:
        holder.execute("ROLLBACK")
    holder.close()


def insert_into(path, attempts):
    """A write that waits at most 50 ms for the lock; counts its attempts."""
    def write():
        attempts.append(time.time())
        with contextlib.closing(sqlite3.connect(path, timeout=0.05)) as c:
            c.execute("insert into t values (1)")
            c.commit()
    return write


def test_retrying_waits_out_a_locked_database(locked_db):
    path, holder = locked_db
    threading.Timer(0.5, holder.execute, ("COMMIT",)).start()  # the other writer finishes
    attempts = []
    tracking.retrying(insert_into(path, attempts), attempts=10, delay=0.1)
    assert len(attempts) > 1  # the first one found the database locked
    with contextlib.closing(sqlite3.connect(path)) as c:
        assert c.execute("select count(*) from t").fetchone() == (1,)  # written once


def test_retrying_gives_up_after_its_attempts_and_at_once_on_other_errors(locked_db):
    path, holder = locked_db
    attempts = []
    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        tracking.retrying(insert_into(path, attempts), attempts=3, delay=0.01)
    assert len(attempts) == 3
    holder.execute("ROLLBACK")  # unlocked: what fails now fails for good
    calls = []

    def missing_table():
        calls.append(1)
        with contextlib.closing(sqlite3.connect(path, timeout=0.05)) as c:
            c.execute("select * from no_such_table")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        tracking.retrying(missing_table, attempts=5, delay=0.01)
    assert len(calls) == 1


@pytest.mark.slow
def test_tracker_writes_through_a_store_locked_longer_than_mlflow_waits(tmp_path, caplog):
    """MLflow waits 20 s for a SQLite lock, then fails; the tracker tries again and the metric
    lands once the other writer lets go."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    tracker = tracking.Tracker(uri, "locked", run_name="locked")
    holder = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    release = threading.Timer(21, holder.execute, ("COMMIT",))
    release.start()
    try:
        started = time.time()
        tracker.log_metrics({"loss": 0.5}, step=1)
        tracker.end()
    finally:
        release.join()
        holder.close()
    assert time.time() - started > 20
    assert "MLflow store busy" in caplog.text  # it failed once, and was tried again
    client = MlflowClient(tracking_uri=uri)
    assert [(m.step, m.value) for m in client.get_metric_history(tracker.run_id, "loss")] == [(1, 0.5)]
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


# -- a sampled sweep runs an interrupted trial's point again


def a_sweep(tmp_path, space, grid):
    """The Sweep a `-m` run with the search space `space` would work with, on a fresh journal."""
    dims, fixed = sweep_space.parse_search_space(None, space)
    location = str(tmp_path / "optuna.journal")
    storage = sweep.open_storage(location)
    study = sweep.open_study(storage, "study", ["maximize"])
    study.sampler = optuna.samplers.RandomSampler(seed=0)
    settings = sweep.SweepSettings(n_trials=None if grid else 3, n_jobs=2, study_name="study", storage=location,
                                   sampler="random", seed=0, sampler_kwargs={}, pruner="none", pruner_kwargs={},
                                   max_failure_rate=0.5)
    return sweep.Sweep(settings=settings, dims=dims, fixed=fixed, base=compose(TINY), sweep_dir=str(tmp_path),
                       location=location, storage=storage, study=study, metrics=["eval/rewards/accuracies"],
                       directions=["maximize"], grid=grid)


def left_running(sw, params):
    """A trial at `params` whose sweeper has died (its owner a pid that has exited)."""
    trial = sweep.ask_at(sw, params, {d.key: d.distribution for d in sw.dims})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    trial.set_user_attr(names.OWNER, f"{socket.gethostname()}:{dead.stdout.strip()}")
    return trial


def test_a_sampled_sweep_asks_an_interrupted_point_again_first(tmp_path):
    sw = a_sweep(tmp_path, ["beta=interval(0.05, 0.5)"], grid=False)
    dims, study = sw.dims, sw.study
    done = study.ask({"beta": dims[0].distribution})
    study.tell(done, 0.5)
    lost = left_running(sw, {"beta": 0.25})
    assert [t.number for t in sweep.recover_interrupted(study, sw.storage)] == [lost.number]

    again, new = sweep.ask_batch(sw, 2)
    assert again.params == lost.params  # the interrupted point first, under a new number
    assert new.params != lost.params and 0.05 <= new.params["beta"] <= 0.5  # then the sampler's
    study.tell(again, 0.7)
    assert sweep.retry_points(sw) == []  # taken up: not asked a third time
    assert sweep.in_space(dims, {"beta": 0.3}) and not sweep.in_space(dims, {"beta": 0.9})
    assert not sweep.in_space(dims, {"beta": 0.3, "loss": "ipo"})


def test_a_reasked_point_starts_from_the_newest_checkpoint_that_fits(tmp_path):
    """Trial 0 was killed at step 4 with a checkpoint; trial 1 took its point up, got the
    checkpoint linked into its folder and was killed before its run started (no .hydra/): trial 2
    goes on from trial 0's checkpoint, with the values trial 0 reported up to step 4."""
    import torch

    sw = a_sweep(tmp_path, ["beta=0.1,0.2"], grid=True)
    first = left_running(sw, {"beta": 0.1})
    first.report(0.25, 2)
    first.report(0.5, 4)
    first.report(0.75, 6)  # after its last checkpoint
    (tmp_path / "0" / ".hydra").mkdir(parents=True)
    (tmp_path / "0" / ".hydra" / "overrides.yaml").write_text("- beta=0.1\n- sweep.trial_number=0\n")
    (tmp_path / "0" / "checkpoint").mkdir()
    torch.save({"step": 4}, tmp_path / "0" / "checkpoint" / "checkpoint.pt")
    left_running(sw, {"beta": 0.1})
    sweep.place_file(str(tmp_path / "0" / "checkpoint" / "checkpoint.pt"),
                     str(tmp_path / "1" / "checkpoint" / "checkpoint.pt"))
    assert sorted(t.number for t in sweep.recover_interrupted(sw.study, sw.storage)) == [0, 1]

    third, other = sweep.ask_batch(sw, 2)
    assert third.params == {"beta": 0.1} and other.params == {"beta": 0.2}  # the grid in order
    job = sweep.trial_overrides(sw, third)
    sweep.resume_from_checkpoint(sw, third, job)
    assert job[-1] == "train.resume=true" and third.user_attrs["sweep.resumed_from"] == 0
    placed = tmp_path / "2" / "checkpoint" / "checkpoint.pt"
    assert torch.load(placed)["step"] == 4 and not (tmp_path / "2" / "checkpoint" / "checkpoint.pt.tmp").exists()
    assert sw.study.trials[2].intermediate_values == {2: 0.25, 4: 0.5}
    untouched = sweep.trial_overrides(sw, other)
    sweep.resume_from_checkpoint(sw, other, untouched)  # its point never ran: from step 0
    assert untouched == sweep.trial_overrides(sw, other) and not (tmp_path / "3").exists()


def test_a_checkpoint_of_other_training_overrides_is_not_resumed(tmp_path):
    folder = tmp_path / "3"
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "overrides.yaml").write_text(
        "- train.max_steps=6\n- beta=0.1\n- sweep.trial_number=3\n- tracking.uri='sqlite:///a.db'\n")
    same = ["beta=0.1", "train.max_steps=6", "sweep.trial_number=7", "hydra.sweep.subdir='7'",
            "tracking.uri='sqlite:///b.db'", "train.device=cuda:1", "train.resume=true"]
    assert sweep.same_training(str(folder), same)  # where it runs and logs does not matter
    assert not sweep.same_training(str(folder), ["beta=0.1", "train.max_steps=12", "sweep.trial_number=7"])
    assert not sweep.same_training(str(tmp_path / "missing"), same)


# -- 4. pruning under torchrun: rank 0 decides, every rank stops


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pruning_under_torchrun_is_rank_0s_decision_on_every_rank(tmp_path):
    from test_distributed import TORCHRUN

    journal = tmp_path / "optuna.journal"
    storage = sweep.open_storage(str(journal))
    study = sweep.open_study(storage, "ddp", ["maximize"])
    study.set_user_attr(names.PRUNER, {"name": "median", "kwargs": {"n_startup_trials": 1}})
    better = study.ask()  # a finished trial far better at every step: the pruner stops the next at step 1
    for step in range(1, 5):
        better.report(2.0, step)
    study.tell(better, 2.0)
    trial = study.ask()
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = TORCHRUN + ["--nproc_per_node=2", f"--master_port={free_port()}", "--redirects=3",
                      f"--log-dir={tmp_path / 'ranks'}", "-m", "dpo_sweep", *TINY, "dataset.eval_size=20",
                      "train.eval_batch_size=10", "train.max_steps=4", "train.eval_every=1", "train.device=cpu",
                      f"hydra.run.dir={tmp_path / 'run'}", f"tracking.uri={uri}", "tracking.run_name=ddp",
                      f"sweep.storage={journal}", "sweep.study_name=ddp", f"sweep.trial_number={trial.number}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=dict(env(), OMP_NUM_THREADS="1", HYDRA_FULL_ERROR="1"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0  # a pruned run raises PrunedTrial
    logs = {p.parent.name: p.read_text() for p in (tmp_path / "ranks").rglob("stderr.log")}
    assert sorted(logs) == ["0", "1"], proc.stderr[-3000:]
    for rank, text in logs.items():  # each rank stopped by itself, at step 1, on rank 0's word
        assert "PrunedTrial: trial 1 pruned" in text and "at step 1" in text, (rank, text[-3000:])
    pruned = optuna.load_study(study_name="ddp", storage=storage).trials[1]
    assert list(pruned.intermediate_values) == [1]
    reports = [json.loads(line) for line in journal.read_text().splitlines()]
    reports = [r for r in reports if "step" in r and r.get("trial_id") == sweep.trial_id(storage, study, 1)]
    assert len(reports) == 1  # reported by rank 0 only
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("dpo-sweep").experiment_id])
    assert run.info.status == "KILLED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [1]


def test_a_killed_job_fails_alone_and_its_finished_batch_mates_count(tmp_path):
    """The joblib launcher gives up on a whole batch when one worker dies: the trial that had
    finished is still COMPLETE (from its metrics.json), the killed one FAIL, and the sweep ends."""
    import psutil

    store = f"sqlite:///{tmp_path}/mlflow.db"
    cmd = command(tmp_path, store, "killed-job", "train.max_steps=2,400", "hydra/launcher=joblib",
                  "hydra.launcher.n_jobs=2", "hydra.sweeper.n_jobs=2")
    proc = start(cmd, tmp_path, "sweep.log")
    slow_log = None
    deadline = time.time() + 180
    try:
        while time.time() < deadline and proc.poll() is None:
            done = [(tmp_path / "sweep" / str(n) / "metrics.json").exists() for n in (0, 1)]
            if done[0] and not done[1]:  # trial 0 (2 steps) finished, trial 1 (400 steps) runs
                slow_log = str(tmp_path / "sweep" / "1")
                break
            time.sleep(POLL)
        assert slow_log, (tmp_path / "sweep.log").read_text()[-3000:]
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
                   if any(f.path.startswith(slow_log) for f in p.open_files())]
        assert len(workers) == 1, workers
        workers[0].kill()
        assert proc.wait(timeout=180) == 0, (tmp_path / "sweep.log").read_text()[-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    states = {t.params["train.max_steps"]: t.state for t in trials_of(tmp_path)}
    assert states == {2: TrialState.COMPLETE, 400: TrialState.FAIL}
    failed = [t for t in trials_of(tmp_path) if t.state == TrialState.FAIL][0]
    assert "job died before it finished" in failed.user_attrs[names.ERROR]
