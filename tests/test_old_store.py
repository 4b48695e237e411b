"""A sweep store written by an earlier version (tests/fixtures/old_sweep: 2 trials, the sweeper
SIGKILLed while trial 1 trained) resumes and reports with today's code: the finished trial does
not run again, the interrupted one counts as interrupted everywhere, the parent run goes on."""

import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys

import optuna
import pytest
import yaml
from mlflow.tracking import MlflowClient
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

from conftest import FAST, REPO
from dpo_sweep import results
from test_sweep import env

FIXTURE = os.path.join(REPO, "tests", "fixtures", "old_sweep")
WRITTEN_AT = "/tmp/dpo-sweep-fixture"  # where the store was written; every path in it starts so
OWNER = "vm:2607"  # the sweeper that was killed
PARENT = "9f619dbcd1da4101a7c07ac2d7dfbff0"
OVERRIDES = [*FAST, "train.progress=false", "dataset.builtin_size=60", "dataset.eval_size=10", "beta=0.1,0.5",
             "train.max_steps=400", "train.eval_every=0", "tracking.experiment=old-sweep"]


def dead_pid() -> int:
    """The pid of a process of this machine that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def relocate(root, owner: str) -> None:
    """Rewrite the store's paths (and its dead sweeper's host) to where the copy lies, as if it
    had been written there."""
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            if name == "mlflow.db":
                continue
            text = open(path).read()
            open(path, "w").write(text.replace(WRITTEN_AT, str(root)).replace(OWNER, owner))
    db = sqlite3.connect(os.path.join(root, "mlflow.db"))
    for table, column in (("experiments", "artifact_location"), ("runs", "artifact_uri"), ("tags", "value"),
                          ("params", "value")):
        db.execute(f"UPDATE {table} SET {column} = replace({column}, ?, ?)", (WRITTEN_AT, str(root)))
    db.commit()
    db.close()


@pytest.fixture(scope="module")
def resumed(tmp_path_factory):
    root = tmp_path_factory.mktemp("old") / "store"
    shutil.copytree(FIXTURE, root)
    relocate(root, f"{socket.gethostname()}:{dead_pid()}")
    metrics_0 = (root / "sweep" / "0" / "metrics.json").read_text()
    store = f"sqlite:///{root}/mlflow.db"
    cmd = [sys.executable, "-m", "dpo_sweep", "-m", *OVERRIDES, f"hydra.sweep.dir={root}/sweep", f"tracking.uri={store}"]
    sweep = subprocess.run(cmd, cwd=root, env=env(), capture_output=True, text=True, timeout=600)
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    report = subprocess.run([sys.executable, "-m", "dpo_sweep.report", str(root / "sweep"), "--out", str(root / "report")],
                            cwd=root, env=env(), capture_output=True, text=True, timeout=300)
    assert report.returncode == 0, report.stdout[-3000:] + report.stderr[-3000:]
    return root, store, metrics_0, sweep.stdout, report.stdout


def test_the_finished_trial_does_not_run_again(resumed):
    root, _, metrics_0, _, _ = resumed
    study = optuna.load_study(study_name="sweep", storage=JournalStorage(JournalFileBackend(str(root / "sweep" / "optuna.journal"))))
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == [0, 1, 2]
    assert trials[0].state == TrialState.COMPLETE and trials[0].params == {"beta": 0.1}
    assert (root / "sweep" / "0" / "metrics.json").read_text() == metrics_0  # untouched
    assert trials[1].state == TrialState.FAIL and trials[1].user_attrs["sweep.interrupted"] is True
    assert trials[2].state == TrialState.COMPLETE and trials[2].params == {"beta": 0.5}  # the point ran again
    assert json.loads((root / "sweep" / "2" / "metrics.json").read_text())["objective"] == trials[2].value
    summary = yaml.safe_load((root / "sweep" / "optimization_results.yaml").read_text())
    assert summary["trials"] == {"COMPLETE": 2, "PRUNED": 0, "FAIL": 0}  # the interrupted trial does not count


def test_the_parent_goes_on_and_the_interrupted_run_is_settled(resumed):
    _, store, _, _, _ = resumed
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("old-sweep").experiment_id])
    parent = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert [r.info.run_id for r in parent] == [PARENT] and parent[0].info.status == "FINISHED"
    children = {r.data.tags["sweep.trial_number"]: r for r in runs if r.info.run_id != PARENT}
    assert sorted(children) == ["0", "1", "2"]
    assert all(r.data.tags["mlflow.parentRunId"] == PARENT for r in children.values())
    killed = children["1"]
    assert killed.info.status == "KILLED" and killed.data.tags["sweep.state"] == "FAIL"
    assert killed.data.tags["sweep.interrupted"] == "True"
    assert killed.data.tags["sweep.error"] == "interrupted: its sweeper died"
    history = {m.key: m.value for m in client.get_metric_history(PARENT, "trials/interrupted")}
    assert history == {"trials/interrupted": 1.0}


def test_the_interrupted_trial_counts_as_interrupted_in_the_table_and_the_report(resumed):
    root, _, _, sweep_stdout, _ = resumed
    table = sweep_stdout[sweep_stdout.index("study sweep:"):].splitlines()
    row = next(line for line in table if line.split()[:1] == ["1"])
    assert row.split()[1:5] == ["0.5", "-", "FAIL", "(interrupted)"]  # beta, objective, state
    markdown = (root / "report" / "results.md").read_text()
    assert "- trials: 3 (2 COMPLETE, 1 FAIL (interrupted))" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| 1 ")]
    assert len(rows) == 1 and "| FAIL (interrupted) |" in rows[0]
    assert "- trial 1: interrupted: its sweeper died" in markdown


def test_a_store_without_the_interrupted_tag_still_reads_as_interrupted():
    """Runs tagged before `sweep.interrupted` existed say so in their error alone."""
    assert results.is_interrupted("FAIL", {"sweep.error": "interrupted: its sweeper died"})
    assert results.is_interrupted("FAIL", {"sweep.interrupted": "True", "sweep.error": "not finished: KeyboardInterrupt: "})
    assert results.is_interrupted("FAIL", {"sweep.interrupted": True})
    assert not results.is_interrupted("FAIL", {"sweep.error": "not finished: SweepError: job folder in use"})
    assert not results.is_interrupted("FAIL", {"sweep.error": "TrainingError: non-finite loss"})
    assert not results.is_interrupted("PRUNED", {"sweep.interrupted": "True"})
