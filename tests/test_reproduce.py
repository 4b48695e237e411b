"""`python -m dpo_sweep.reproduce`: a finished sweep trial rerun from its folder and from its MLflow
run id gives the same final metrics on CPU, from the saved config rather than today's conf/."""

import json
import subprocess
import sys

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import FAST
from dpo_sweep.reproduce import main
from test_sweep import env, run_sweep


def reproduce(tmp, *args):
    return subprocess.run([sys.executable, "-m", "dpo_sweep.reproduce", *args], cwd=tmp, env=env(),
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def finished_trial(tmp_path_factory):
    """Trial 0 of a one-point sweep: its folder, its MLflow run id, and the store."""
    tmp = tmp_path_factory.mktemp("sweep")
    store = f"sqlite:///{tmp}/mlflow.db"
    proc = run_sweep(tmp, store, "reproduce", "beta=0.3", "loss=ipo", "train.eval_every=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("reproduce").experiment_id],
                                "tags.`sweep.trial_number` = '0'")
    return tmp, tmp / "sweep" / "0", run.info.run_id, store


def final_metrics(folder):
    """metrics.json without `caches_built`: what the run cost (the original built the shared caches
    the rerun loads), not what it reached."""
    saved = json.loads((folder / "metrics.json").read_text())
    saved.pop("caches_built", None)
    return saved


def check_identical(proc, original, new_folder):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert final_metrics(new_folder) == final_metrics(original)  # every metric, bit for bit
    assert "metrics identical" in proc.stdout
    assert "eval/rewards/accuracies" in proc.stdout and "original" in proc.stdout and "reproduced" in proc.stdout


def test_reproduce_from_the_run_folder(finished_trial):
    tmp, folder, _, store = finished_trial
    proc = reproduce(tmp, str(folder), "--out", str(tmp / "again"))
    check_identical(proc, folder, tmp / "again")
    config = yaml.safe_load((tmp / "again" / ".hydra" / "config.yaml").read_text())
    assert config["loss"]["name"] == "ipo" and config["beta"] == 0.3  # the saved config, not conf/'s defaults
    assert config["sweep"] == {"storage": None, "study_name": None, "trial_number": None, "pack": None,
                               "pack_forward": None}  # no study to report to
    overrides = (tmp / "again" / ".hydra" / "overrides.yaml").read_text()
    assert yaml.safe_load(overrides) == []  # nothing overrode the saved config, and no sweep override is kept
    assert f"# python -m dpo_sweep.reproduce {folder} --out {tmp / 'again'}" in overrides
    record = yaml.safe_load((tmp / "again" / ".hydra" / "reproduce.yaml").read_text())
    assert record["command"] == f"python -m dpo_sweep.reproduce {folder} --out {tmp / 'again'}"
    assert record["source"] == str(folder) and "beta=0.3" in record["source_overrides"]
    client = MlflowClient(tracking_uri=store)
    (run,) = client.search_runs([client.get_experiment_by_name("reproduce").experiment_id],
                                f"tags.`reproduce_of` = '{folder}'")
    assert run.info.status == "FINISHED" and "mlflow.parentRunId" not in run.data.tags


def test_reproduce_from_the_mlflow_run_id(finished_trial):
    tmp, folder, run_id, store = finished_trial
    proc = reproduce(tmp, run_id, "--tracking-uri", store, "--out", str(tmp / "from_id"))
    check_identical(proc, folder, tmp / "from_id")


def test_reproduce_refuses_what_it_cannot_rerun(finished_trial, capsys):
    _, folder, _, store = finished_trial
    assert main(["nope"]) == 2 and "neither a run folder nor an MLflow run id" in capsys.readouterr().err
    assert main(["0" * 32, "--tracking-uri", store]) == 2 and "no MLflow run" in capsys.readouterr().err
    assert main([str(folder), "--out", str(folder)]) == 2  # never into an existing run's folder
    assert "not empty" in capsys.readouterr().err


def test_a_run_saved_before_share_prompt_existed_reruns_as_it_ran(tmp_path):
    """Its saved config has no train.share_prompt: it trained two rows a pair, grouped by that
    layout's lengths, and reproduces so (today's default would regroup the batches)."""
    run = tmp_path / "old"
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep", *FAST, "train.max_steps=6", "train.progress=false",
                           "train.share_prompt=false", f"hydra.run.dir={run}",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    del saved["train"]["share_prompt"]
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    check_identical(reproduce(tmp_path, str(run), "--out", str(tmp_path / "again")), run, tmp_path / "again")
    config = yaml.safe_load((tmp_path / "again" / ".hydra" / "config.yaml").read_text())
    assert config["train"]["share_prompt"] is False


def test_a_run_saved_before_generation_eval_and_sft_existed_reruns_as_it_ran(tmp_path):
    """Its saved config has no eval, judge or sft section and no dataset.builtin_version: it ran
    the first built-in set with no SFT stage and no generation eval, and reproduces so."""
    run = tmp_path / "old"
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep", "train.max_steps=6", "train.progress=false",
                           "eval.gen.enabled=false", "sft.enabled=false", "dataset.builtin_version=1",
                           "objective.metric=eval/rewards/accuracies", f"hydra.run.dir={run}",
                           f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    for section in ("eval", "judge", "sft"):
        del saved[section]
    del saved["dataset"]["builtin_version"]
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
    check_identical(reproduce(tmp_path, str(run), "--out", str(tmp_path / "again")), run, tmp_path / "again")
    config = yaml.safe_load((tmp_path / "again" / ".hydra" / "config.yaml").read_text())
    assert config["eval"]["gen"]["enabled"] is False and config["sft"]["enabled"] is False
    assert config["dataset"]["builtin_version"] == 1
