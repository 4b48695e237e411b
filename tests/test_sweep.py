"""Sweeps end to end: `python -m dpo_sweep ... -m` in a subprocess, checked in the Optuna study,
the sweep folder and MLflow. Trials are shrunk to two steps on 80 pairs of the built-in set."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import FAST, REPO

SMALL = [*FAST, "train.max_steps=2", "train.progress=false", "dataset.builtin_size=100", "dataset.eval_size=20",
         "train.eval_batch_size=20"]


def env():
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)


def sweep_command(tmp, store, experiment, *args):
    """The command line of a sweep into `tmp`/sweep, logging to `store` under `experiment`."""
    return [sys.executable, "-m", "dpo_sweep", "-m", *SMALL, f"hydra.sweep.dir={tmp}/sweep",
            f"tracking.uri={store}", f"tracking.experiment={experiment}", *args]


def run_sweep(tmp, store, experiment, *args, timeout=300):
    return subprocess.run(sweep_command(tmp, store, experiment, *args), cwd=tmp, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def load_study(tmp):
    storage = JournalStorage(JournalFileBackend(str(tmp / "sweep" / "optuna.journal")))
    return optuna.load_study(study_name="sweep", storage=storage)


def runs_of(store, experiment):
    """(parent, children) of a sweep, from the MLflow client."""
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1, [r.info.run_name for r in parents]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == len(runs) - 1
    return parents[0], children


def by_trial(children):
    return {int(r.data.tags["sweep.trial_number"]): r for r in children}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module (creating one takes seconds); each test has its experiment."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(scope="module")
def grid_sweep(tmp_path_factory, store):
    tmp = tmp_path_factory.mktemp("grid")
    proc = run_sweep(tmp, store, "grid", "beta=0.1,0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc


def test_grid_runs_each_point_once(grid_sweep):
    tmp, _ = grid_sweep
    trials = load_study(tmp).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert sorted(t.params["beta"] for t in trials) == [0.1, 0.5]
    for t in trials:  # job folders named by trial number, each a complete run folder
        folder = tmp / "sweep" / str(t.number)
        saved = json.loads((folder / "metrics.json").read_text())
        assert saved["objective"] == t.value
        assert yaml.safe_load((folder / ".hydra" / "config.yaml").read_text())["beta"] == t.params["beta"]


def test_grid_logs_one_parent_and_a_child_per_trial(grid_sweep, store):
    tmp, _ = grid_sweep
    parent, children = runs_of(store, "grid")
    assert len(children) == 2
    trials = {t.number: t for t in load_study(tmp).trials}
    for number, run in by_trial(children).items():
        assert run.data.params["beta"] == str(trials[number].params["beta"])
        assert run.data.tags["sweep.study_name"] == "sweep"
        assert run.data.tags["sweep.state"] == "COMPLETE"
        assert run.data.metrics["objective"] == pytest.approx(trials[number].value)
        assert run.info.status == "FINISHED"
    client = MlflowClient(tracking_uri=store)
    assert {a.path for a in client.list_artifacts(children[0].info.run_id)} == {"hydra", "metrics.json", "samples",
                                                                               "samples.jsonl"}
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["space.beta"] == "0.1,0.5"
    best = max(trials.values(), key=lambda t: t.value)
    assert parent.data.tags["best.trial_number"] == str(best.number)
    assert parent.data.tags["best.beta"] == str(best.params["beta"])
    assert parent.data.metrics["best_value"] == pytest.approx(best.value)
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"search_space.yaml", "optimization_results.yaml", "multirun.yaml", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/optimization_history.png" in plots
    assert "plots/param_importances.png" not in plots  # two trials: importances would be noise


def test_grid_writes_results_and_prints_a_table_best_first(grid_sweep):
    tmp, proc = grid_sweep
    study = load_study(tmp)
    results = yaml.safe_load((tmp / "sweep" / "optimization_results.yaml").read_text())
    assert results["best_params"] == study.best_params
    assert results["best_value"] == study.best_value
    assert results["trials"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 0}
    lines = proc.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["trial", "beta"])
    assert lines[header].split() == ["trial", "beta", "objective", "state", "duration"]
    rows = [lines[header + 2].split(), lines[header + 3].split()]
    assert rows[0][0] == str(study.best_trial.number) and rows[0][3] == "COMPLETE"
    assert float(rows[0][2]) >= float(rows[1][2])


def test_tpe_over_intervals_runs_in_parallel_through_joblib(tmp_path, store):
    proc = run_sweep(tmp_path, store, "tpe", "optimizer.lr=tag(log, interval(1e-4, 1e-2))", "beta=interval(0.05, 0.5)",
                     "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2", "hydra/launcher=joblib",
                     "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = load_study(tmp_path).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 4
    assert all(1e-4 <= t.params["optimizer.lr"] <= 1e-2 and 0.05 <= t.params["beta"] <= 0.5 for t in trials)
    assert len({t.params["optimizer.lr"] for t in trials}) == 4
    assert all((tmp_path / "sweep" / str(t.number) / "metrics.json").is_file() for t in trials)
    parent, children = runs_of(store, "tpe")
    runs = by_trial(children)
    assert sorted(runs) == [0, 1, 2, 3]
    first, second = trials[0], trials[1]  # one batch of two: both asked before either was told
    assert first.datetime_start < second.datetime_complete and second.datetime_start < first.datetime_complete
    plots = {a.path for a in MlflowClient(tracking_uri=store).list_artifacts(parent.info.run_id, "plots")}
    assert "plots/contour_beta_lr.png" in plots


def test_killed_sweep_resumes_without_rerunning_or_overwriting(tmp_path, store):
    # Thirty steps a trial (seconds): time enough to catch trial 2 running. No checkpoints: it
    # starts again from step 0 (tests/test_faults.py resumes a killed trial from its checkpoint).
    command = sweep_command(tmp_path, store, "resume", "beta=0.1,0.2,0.3,0.4", "train.max_steps=30")
    with open(tmp_path / "first.log", "w") as out:
        first = subprocess.Popen(command, cwd=tmp_path, env=env(), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for_third_trial(tmp_path, store, first)
        finally:
            first.kill()  # SIGKILL: no cleanup, trial 2 is left RUNNING
            first.wait()
    before = {t.number: snapshot(tmp_path, t.number) for t in load_study(tmp_path).trials
              if t.state == TrialState.COMPLETE}
    assert sorted(before) == [0, 1]

    proc = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 trials to run" in proc.stdout  # the two finished ones count
    trials = load_study(tmp_path).trials
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(t.params["beta"] for t in complete) == [0.1, 0.2, 0.3, 0.4]  # each point once
    assert {n: snapshot(tmp_path, n) for n in before} == before  # finished folders untouched
    interrupted = trials[2]
    assert interrupted.state == TrialState.FAIL and interrupted.user_attrs["sweep.interrupted"]
    assert not (tmp_path / "sweep" / "2" / "metrics.json").exists()
    assert sorted(t.number for t in complete) == [0, 1, 3, 4]  # new numbers, new folders
    parent, children = runs_of(store, "resume")
    assert parent.info.status == "FINISHED"
    statuses = sorted((int(r.data.tags["sweep.trial_number"]), r.info.status) for r in children)
    assert statuses == [(0, "FINISHED"), (1, "FINISHED"), (2, "KILLED"), (3, "FINISHED"), (4, "FINISHED")]


def wait_for_third_trial(tmp, store, proc, timeout=240):
    """Wait until trials 0 and 1 are told COMPLETE and trial 2 runs and has its MLflow run."""
    client, deadline = None, time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, (tmp / "first.log").read_text()[-3000:]
        states = [t.state for t in trials_so_far(tmp)]
        if states[:3] == [TrialState.COMPLETE, TrialState.COMPLETE, TrialState.RUNNING]:
            client = client or MlflowClient(tracking_uri=store)  # the sweeper has created the store
            exp = client.get_experiment_by_name("resume")
            if client.search_runs([exp.experiment_id], "tags.`sweep.trial_number` = '2'"):
                return
        time.sleep(0.1)
    raise TimeoutError("the first sweep never reached its third trial")


def trials_so_far(tmp):
    try:
        return load_study(tmp).trials
    except (KeyError, FileNotFoundError):  # the study is not created yet
        return []


def snapshot(tmp, number):
    folder = tmp / "sweep" / str(number)
    return {name: (os.stat(folder / name).st_mtime_ns, (folder / name).read_bytes())
            for name in ("metrics.json", ".hydra/config.yaml")}


@pytest.fixture(scope="module")
def mixed_sweep(tmp_path_factory, store):
    """A grid of three learning rates: 1e30 (non-finite gradients: FAIL), 1e-2 (learns), and 1e-20
    (a step that changes no weight: never moves off the reference, accuracy stays 0: clearly bad,
    pruned; 0 itself is refused before the sweep starts)."""
    tmp = tmp_path_factory.mktemp("mixed")
    proc = run_sweep(tmp, store, "mixed", "optimizer.lr=1e30,1e-2,1e-20", "train.max_steps=4", "train.eval_every=1",
                     "hydra.sweeper.pruner.name=median", "+hydra.sweeper.pruner.kwargs.n_startup_trials=1",
                     "objective.metric=eval/rewards/accuracies")  # 4 steps: no answer is right yet, all tie
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, proc


def test_a_failing_trial_is_fail_and_the_sweep_goes_on(mixed_sweep, store):
    tmp, proc = mixed_sweep
    failed, good, _ = load_study(tmp).trials
    assert failed.state == TrialState.FAIL and "non-finite" in failed.user_attrs["sweep.error"]
    assert good.state == TrialState.COMPLETE  # the trials after it ran
    parent, children = runs_of(store, "mixed")
    runs = by_trial(children)
    assert runs[0].info.status == "FAILED" and runs[0].data.tags["sweep.state"] == "FAIL"
    assert runs[1].info.status == "FINISHED"
    assert parent.info.status == "FINISHED"
    assert "trial 0: TrainingError: non-finite" in proc.stdout  # the table says why it failed


def test_pruner_stops_a_clearly_bad_trial(mixed_sweep, store):
    tmp, _ = mixed_sweep
    _, good, bad = load_study(tmp).trials
    assert good.state == TrialState.COMPLETE and sorted(good.intermediate_values) == [1, 2, 3, 4]
    assert bad.state == TrialState.PRUNED and bad.last_step < 4
    _, children = runs_of(store, "mixed")
    pruned = by_trial(children)[2]
    assert pruned.info.status == "KILLED" and pruned.data.tags["sweep.state"] == "PRUNED"
    steps = [m.step for m in MlflowClient(tracking_uri=store).get_metric_history(pruned.info.run_id, "train/loss")]
    assert max(steps) == bad.last_step  # it stopped training there


def test_too_many_failures_stop_the_sweep_and_fail_its_parent(tmp_path, store):
    proc = run_sweep(tmp_path, store, "stopped", "optimizer.lr=1e30,1e-3", "hydra.sweeper.max_failure_rate=0")
    assert proc.returncode != 0
    assert "hydra.sweeper.max_failure_rate=0.0" in proc.stderr + proc.stdout
    assert [t.state for t in load_study(tmp_path).trials] == [TrialState.FAIL]  # the second never started
    parent, children = runs_of(store, "stopped")
    assert parent.info.status == "FAILED" and len(children) == 1


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free port of 127.0.0.1, stopped at the end."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(tmp_path / "server.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path}/s.db", "--artifacts-destination", str(tmp_path / "artifacts")],
        cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{url}/health", server, tmp_path / "server.log")
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def wait_for_http(url, process, log_file, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, log_file.read_text()[-3000:]
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


def rest(url, path, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{url}/api/2.0/mlflow/{path}", data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.loads(r.read())


def test_sweep_against_a_tracking_server_over_http(tmp_path, mlflow_server):
    proc = run_sweep(tmp_path, mlflow_server, "served", "beta=0.1,0.5")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    query = urllib.parse.urlencode({"experiment_name": "served"})
    experiment = rest(mlflow_server, f"experiments/get-by-name?{query}")["experiment"]
    runs = rest(mlflow_server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
    tags = {r["info"]["run_id"]: {t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs["runs"]}
    (parent_id,) = [run_id for run_id, t in tags.items() if t.get("sweep.role") == "parent"]
    children = [r for r in runs["runs"] if tags[r["info"]["run_id"]].get("mlflow.parentRunId") == parent_id]
    betas = sorted({p["key"]: p["value"] for p in r["data"]["params"]}["beta"] for r in children)
    assert betas == ["0.1", "0.5"]
    assert {r["info"]["status"] for r in runs["runs"]} == {"FINISHED"}
    artifacts = rest(mlflow_server, f"artifacts/list?run_id={children[0]['info']['run_id']}")
    assert "metrics.json" in {f["path"] for f in artifacts["files"]}  # uploaded through the server
