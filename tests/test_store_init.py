"""A fresh SQLite MLflow store opened by several processes at the same moment: MLflow's table
migrations would race (one process dies on "table ... already exists"); the first process
migrates under a lock and the others wait, so every process logs its run."""

import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from test_sweep import env

OPEN_AT = """
import sys, time
from dpo_sweep import tracking
start = float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
tracking.Tracker(sys.argv[1], "race", run_name=sys.argv[3]).end()
"""


def test_processes_opening_a_fresh_store_at_once_all_log(tmp_path):
    store = f"sqlite:///{tmp_path}/fresh/mlflow.db"
    start = time.time() + 8  # after every process has imported MLflow
    procs = [subprocess.Popen([sys.executable, "-c", OPEN_AT, store, str(start), f"run{i}"], env=env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name("race").experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["run0", "run1", "run2", "run3"]
