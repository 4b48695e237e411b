"""The command line as a newcomer meets it, through real `python -m dpo_sweep` processes: what
cannot be found stops at once with a hint; config and data errors and Ctrl-C end in one line
without a traceback; a run and a sweep say where their results went; trainer=trl is quiet."""

import os
import signal
import subprocess
import sys
import time

from conftest import FAST, REPO, write_jsonl

SMALL = [*FAST, "train.max_steps=3", "dataset.builtin_size=60", "dataset.eval_size=12", "train.progress=false"]


def env():
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path, OMP_NUM_THREADS="1")


def cli(tmp, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "dpo_sweep", *args], cwd=tmp, env=env(), capture_output=True,
                          text=True, timeout=timeout)


def lines(text):
    return [line for line in text.splitlines() if line.strip()]


def test_unknown_model_stops_run_and_sweep_at_once(tmp_path):
    for args in (["model.name_or_path=some/unknown-model"],
                 ["-m", "model.name_or_path=some/unknown-model", "beta=0.1,0.5"]):
        start = time.time()
        proc = cli(tmp_path, *args)
        assert time.time() - start < 5
        assert proc.returncode == 2
        assert "Traceback" not in proc.stderr
        [line] = lines(proc.stderr)
        assert line.startswith("error: config key 'model.name_or_path' = 'some/unknown-model'")
        assert "HF_HUB_OFFLINE=1" in line and "hf download" in line and "HF_HOME" in line
        assert not os.path.exists(tmp_path / "outputs")  # no run or sweep folder, no MLflow store


def test_local_dataset_needs_its_path(tmp_path):
    start = time.time()
    proc = cli(tmp_path, "dataset=local")
    assert time.time() - start < 5 and proc.returncode == 2
    [line] = lines(proc.stderr)
    assert "'dataset.path' is required with dataset=local" in line


def test_malformed_row_is_one_line(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(20)]
    del rows[3]["rejected"]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    proc = cli(tmp_path, *SMALL, "dataset=local", f"dataset.path={data}", "tracking.enabled=false")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    [line] = [x for x in lines(proc.stderr) if x.startswith("error:")]
    assert "prefs.jsonl: row 4: missing field 'rejected'" in line  # rows count from 1


def test_local_model_run_says_where_results_went_and_trl_is_as_quiet(tmp_path):
    from conftest import make_tiny_llama

    from dpo_sweep.models import char_tokenizer

    tokenizer = char_tokenizer()
    make_tiny_llama(tokenizer).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    native = cli(tmp_path, *SMALL, f"model.name_or_path={tmp_path / 'tiny'}")
    assert native.returncode == 0, native.stderr[-2000:]
    out = native.stdout
    assert "final eval: eval/gen/reward=" in out and "(objective)" in out
    assert "run folder: outputs/runs/" in out
    assert "MLflow run: " in out
    assert "mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db" in out
    assert "?workflowType=machine_learning" in out and "http://127.0.0.1:5000/#/experiments/" in out

    trl = cli(tmp_path, *SMALL, f"model.name_or_path={tmp_path / 'tiny'}", "trainer=trl")
    assert trl.returncode == 0, trl.stderr[-2000:]
    assert len(lines(trl.stdout + trl.stderr)) <= len(lines(native.stdout + native.stderr)) + 1
    assert "Warning" not in trl.stderr and "{'loss'" not in trl.stdout


def test_sweep_footer(tmp_path):
    proc = cli(tmp_path, "-m", *SMALL, "beta=0.1", f"hydra.sweep.dir={tmp_path}/sweep")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "sweep folder: sweep" in proc.stdout
    assert "MLflow parent run: " in proc.stdout and "workflowType=machine_learning" in proc.stdout
    assert "report: python -m dpo_sweep.report sweep" in proc.stdout


def interrupt(tmp, args, checkpoint_glob):
    """Start `python -m dpo_sweep args`, send SIGINT once a checkpoint exists; (rc, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "dpo_sweep", *args], cwd=tmp, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 90
    while not list(tmp.glob(checkpoint_glob)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]  # still training
    time.sleep(0.5)  # in the steps after that checkpoint, not inside its save
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


def test_ctrl_c_run_says_how_to_resume(tmp_path):
    long = [*SMALL, "train.max_steps=100000", "train.checkpoint_every=2", "eval.gen.enabled=false",
            "hydra.run.dir=outputs/run"]
    rc, err = interrupt(tmp_path, long, "outputs/run/checkpoint/checkpoint.pt")
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    [line] = [x for x in lines(err) if not x.startswith("20")]  # MLflow's own lines creating the store
    assert line.startswith("interrupted: saved the run folder outputs/run with its checkpoint")
    assert "python -m dpo_sweep " in line and "train.resume=true hydra.run.dir=outputs/run" in line


def test_ctrl_c_sweep_says_how_to_resume(tmp_path):
    long = ["-m", *SMALL, "train.max_steps=100000", "train.checkpoint_every=2", "eval.gen.enabled=false",
            "beta=0.1,0.5", "hydra.sweep.dir=sweep"]
    rc, err = interrupt(tmp_path, long, "sweep/0/checkpoint/checkpoint.pt")
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    [line] = [x for x in lines(err) if x.startswith("interrupted")]
    assert "sweep folder sweep (no finished trial)" in line
    assert line.endswith("hydra.sweep.dir=sweep") and "python -m dpo_sweep -m " in line
