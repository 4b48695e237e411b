"""Store passwords stay out of every record: a sweep against a password-protected PostgreSQL
study and an MLflow server whose URL carries a password runs, and the password is in no file, no
log line, no MLflow param or tag; a resume from a new shell finds the database through libpq's
$PGPASSWORD."""

import logging
import os
import pathlib
import subprocess
import sys
import tempfile

import optuna
import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST, free_port, postgres_bin_dir
from dpo_sweep import credentials
from test_sweep import env, mlflow_server  # noqa: F401  (a fixture)

SECRET = "Sw0rdf1sh-93"


def test_mask_stash_and_connectable_round_trip(monkeypatch):
    url = f"postgresql+psycopg2://optuna:{SECRET}@db.example:5432/optuna"
    masked = credentials.stash(url)
    assert masked == "postgresql+psycopg2://optuna:***@db.example:5432/optuna"
    assert credentials.connectable(masked) == url  # this process holds the password
    for name in [k for k in os.environ if k.startswith(credentials.ENV_PREFIX)]:
        monkeypatch.delenv(name)
    assert credentials.connectable(masked) == "postgresql+psycopg2://optuna@db.example:5432/optuna"  # libpq's lookup
    text = f"error: could not open 'http://alice:{SECRET}@mlflow:5000' nor {url}"
    assert SECRET not in credentials.mask(text) and credentials.mask(text).count("***") == 2
    assert credentials.mask("sqlite:////tmp/mlflow.db") == "sqlite:////tmp/mlflow.db"
    # MLflow gets a server's URL without user or password (it prints the URLs it is given): they
    # go to its own environment variables.
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)  # restored after the test
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    server = credentials.stash(f"http://alice:{SECRET}@mlflow.example:5000")
    assert credentials.for_mlflow(server) == "http://mlflow.example:5000"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == SECRET


def test_every_log_line_is_masked(caplog):
    credentials.mask_logs()
    with caplog.at_level(logging.INFO):
        logging.getLogger("dpo_sweep.anything").info("opening %s", f"postgresql://u:{SECRET}@h/db")
    assert SECRET not in caplog.text and "postgresql://u:***@h/db" in caplog.text


@pytest.fixture(scope="module")
def password_postgres():
    """A throwaway PostgreSQL server that checks passwords (scram-sha-256), with a user `dpo` whose
    password is SECRET; yields (host, port, database). Skipped where PostgreSQL is not installed."""
    import pwd
    import shutil

    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL is not installed (.ci/run installs it)")
    pytest.importorskip("psycopg2")
    user = {}
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
    root = tempfile.mkdtemp(prefix="dpo-sweep-pgpw-")
    if user:
        os.chown(root, user["user"], user["group"])
    data, log_file, port = os.path.join(root, "data"), os.path.join(root, "server.log"), free_port()
    pwfile = os.path.join(root, "pw")
    with open(pwfile, "w") as f:
        f.write(SECRET)
    if user:
        os.chown(pwfile, user["user"], user["group"])

    def pg(program, *args):
        proc = subprocess.run([os.path.join(bin_dir, program), *args], cwd=root, capture_output=True, text=True,
                              timeout=120, **user)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    try:
        pg("initdb", "-D", data, "-U", "dpo", f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8",
           "--locale=C", "--no-sync")
        os.remove(pwfile)
        pg("pg_ctl", "-D", data, "-l", log_file, "-w", "-t", "60", "start", "-o", f"-h 127.0.0.1 -p {port} -k {root} -F")
        try:
            yield "127.0.0.1", port, "postgres"
        finally:
            pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def files_holding(folder: pathlib.Path, text: str):
    return [str(p) for p in folder.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


def test_a_sweep_keeps_store_passwords_out_of_every_record(tmp_path, password_postgres, mlflow_server):  # noqa: F811
    host, port, database = password_postgres
    storage = f"postgresql+psycopg2://dpo:{SECRET}@{host}:{port}/{database}"
    served = mlflow_server.replace("http://", f"http://alice:{SECRET}@")
    base = [sys.executable, "-m", "dpo_sweep", *FAST, "train.max_steps=2", "train.progress=false",
            "dataset.builtin_size=60", "dataset.eval_size=12", f"hydra.sweep.dir={tmp_path}/sweep",
            "tracking.experiment=secret", "beta=0.1,0.2"]
    first = subprocess.run([*base, f"hydra.sweeper.storage={storage}", f"tracking.uri={served}", "-m"],
                           cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    study = optuna.load_study(study_name="sweep", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]

    assert SECRET not in first.stdout + first.stderr
    # .hydra/*.yaml, multirun.yaml, logs, results, and the MLflow server's database and artifacts
    assert files_holding(tmp_path, SECRET) == []
    assert "dpo:***@" in (tmp_path / "sweep" / "multirun.yaml").read_text()
    client = MlflowClient(tracking_uri=mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name("secret").experiment_id])
    assert len(runs) == 3
    for run in runs:
        for key, value in {**run.data.params, **run.data.tags}.items():
            assert SECRET not in value, (run.info.run_name, key)

    # A new shell: the masked URL as saved, the password from libpq's $PGPASSWORD.
    clean = {k: v for k, v in env().items() if not k.startswith(credentials.ENV_PREFIX)}
    masked = storage.replace(SECRET, "***")
    again = subprocess.run([*base, f"hydra.sweeper.storage={masked}", f"tracking.uri={mlflow_server}", "-m"],
                           cwd=tmp_path, env={**clean, "PGPASSWORD": SECRET}, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert len(optuna.load_study(study_name="sweep", storage=storage).trials) == 2  # finished: nothing ran again
    wrong = subprocess.run([*base, f"hydra.sweeper.storage={masked}", f"tracking.uri={mlflow_server}", "-m"],
                           cwd=tmp_path, env={**clean, "PGPASSWORD": "wrong"}, capture_output=True, text=True,
                           timeout=300)
    assert wrong.returncode != 0 and "password authentication failed" in wrong.stdout + wrong.stderr
