"""Concurrent sweeps: two started in the same second get their own folders, studies and MLflow
parents; a second sweeper on a folder another sweeper is driving stops at once, naming it."""

import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from conftest import FAST
from test_sweep import env

SMALL = [*FAST, "train.max_steps=2", "train.progress=false", "dataset.builtin_size=60", "dataset.eval_size=12"]
AT = "import sys, time, runpy; t = float(sys.argv.pop(1))\nwhile time.time() < t: time.sleep(0.001)\n" \
     "sys.argv[0] = 'dpo_sweep'; runpy.run_module('dpo_sweep', run_name='__main__')"


def start_at(when, cwd, *args):
    return subprocess.Popen([sys.executable, "-c", AT, str(when), *args], cwd=cwd, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sweeps_started_in_the_same_second_get_their_own_folders(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    when = time.time() + 10  # both after their imports: the same second, to a few milliseconds
    procs = [start_at(when, tmp_path, *SMALL, f"tracking.uri={store}", "tracking.experiment=twins", f"beta={b}", "-m")
             for b in (0.1, 0.2)]
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    folders = sorted((tmp_path / "outputs" / "sweeps").iterdir())
    assert len(folders) == 2 and folders[0].name[:19] == folders[1].name[:19]  # the same second
    for folder in folders:
        assert (folder / "optuna.journal").exists() and (folder / "0" / "metrics.json").exists()
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("twins").experiment_id])
    parents = [r for r in runs if r.data.tags.get("sweep.role") == "parent"]
    assert len(parents) == 2 and {r.data.tags["sweep.folder"] for r in parents} == {str(f) for f in folders}


def test_a_second_sweeper_on_a_folder_in_use_stops_naming_it(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    args = [*SMALL, f"tracking.uri={store}", f"hydra.sweep.dir={tmp_path}/sweep", "beta=0.1,0.2,0.3",
            "train.max_steps=40", "-m"]
    first = start_at(0, tmp_path, *args)
    deadline = time.time() + 120
    while not (tmp_path / "sweep" / "0").exists():  # the first sweeper has begun its first trial
        assert first.poll() is None and time.time() < deadline, first.communicate()[1][-3000:]
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-m", "dpo_sweep", *args], cwd=tmp_path, env=env(), capture_output=True,
                            text=True, timeout=120)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode != 0
    assert f"sweep folder {tmp_path}/sweep is in use by another sweeper" in second.stderr + second.stdout
    assert f":{first.pid}" in second.stderr + second.stdout  # names the process holding it
