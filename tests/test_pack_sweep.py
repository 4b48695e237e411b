"""Packed trials end to end (`hydra.sweeper.pack`): real sweeps as subprocesses, a real journal
study, a real MLflow store. A pack's trials look like lone trials in MLflow, in the report and on
disk; each reproduces alone; a pack killed mid-way goes on, every unfinished trial from its
checkpoint. (Trials that cannot be packed, and why: tests/test_pack_plan.py, test_pack_folders.py.)"""

import json
import os
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import compose
from dpo_sweep import names, sweep
from test_faults import TINY, assert_consistent, command, finish, kill_when, start
from test_sweep import env

pytest.importorskip("peft")

LORA = ["model.lora.enabled=true", "train.max_steps=8", "train.eval_every=4"]


def children(store, experiment):
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id], max_results=100)
    return {int(r.data.tags[names.TRIAL_NUMBER]): r for r in runs if names.TRIAL_NUMBER in r.data.tags}


def objective(folder):
    return json.loads((folder / "metrics.json").read_text())


def test_one_pack_whose_trials_look_like_lone_trials(tmp_path):
    """`python -m dpo_sweep model.lora.enabled=true beta=0.05,0.1,0.3,0.5 hydra.sweeper.pack=4 -m`
    (shrunk): one pack; its four MLflow runs carry the params, metrics and tags of lone trials;
    the report reads it as any sweep; a member's folder reproduces it alone."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    packed_dir, lone_dir = tmp_path / "packed", tmp_path / "lone"
    packed_dir.mkdir(), lone_dir.mkdir()
    out = finish(command(packed_dir, store, "packed", "beta=0.05,0.1,0.3,0.5", "hydra.sweeper.pack=4", *LORA),
                 packed_dir)
    log = out.stdout + out.stderr
    assert "trials 0-3 packed in one process over one base model (beta differs)" in log
    finish(command(lone_dir, store, "lone", "beta=0.1", *LORA), lone_dir)

    packed, lone = children(store, "packed"), children(store, "lone")
    assert sorted(packed) == [0, 1, 2, 3] and sorted(lone) == [0]
    assert {r.info.status for r in packed.values()} == {"FINISHED"}
    assert {r.data.tags[names.PACK] for r in packed.values()} == {"0,1,2,3"}
    assert len({r.data.tags[names.RUN_OWNER] for r in packed.values()}) == 1  # one process trained them
    assert len({r.data.tags[names.PARENT_RUN_ID] for r in packed.values()}) == 1
    p, q = packed[1], lone[0]  # beta 0.1, packed and alone
    assert p.info.run_name == "t1 beta=0.1" and q.info.run_name.startswith("t0")
    assert p.data.params.keys() == q.data.params.keys()
    assert p.data.metrics.keys() == q.data.metrics.keys()
    assert set(p.data.tags) - {names.PACK, names.CACHES_BUILT} == set(q.data.tags) - {names.CACHES_BUILT}
    ours, theirs = packed_dir / "sweep" / "1", lone_dir / "sweep" / "0"
    assert sorted(os.listdir(ours)) == sorted(os.listdir(theirs))
    assert sorted(os.listdir(ours / ".hydra")) == sorted(os.listdir(theirs / ".hydra"))
    for key, value in objective(theirs)["metrics"].items():
        assert objective(ours)["metrics"][key] == pytest.approx(value, abs=1e-5, rel=1e-5), key

    report = subprocess.run([sys.executable, "-m", "dpo_sweep.report", str(packed_dir / "sweep"), "--out",
                             str(tmp_path / "report")], cwd=packed_dir, env=env(), capture_output=True, text=True)
    assert report.returncode == 0, report.stderr[-3000:]
    rows = [line.split("|")[1:5] for line in report.stdout.splitlines() if line.startswith("| ")]
    assert [[cell.strip() for cell in row] for row in rows[2:]] == [
        [str(n), str(beta), "0.0002", "COMPLETE"] for n, beta in enumerate((0.05, 0.1, 0.3, 0.5))]

    again = subprocess.run([sys.executable, "-m", "dpo_sweep.reproduce", str(packed_dir / "sweep" / "2"), "--out",
                            str(tmp_path / "again")], cwd=packed_dir, env=env(), capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    alone, original = objective(tmp_path / "again"), objective(packed_dir / "sweep" / "2")
    assert alone["objective"] == pytest.approx(original["objective"], abs=1e-5)
    for key, value in original["metrics"].items():
        assert alone["metrics"][key] == pytest.approx(value, abs=1e-5, rel=1e-5), key


def test_a_pack_killed_mid_way_goes_on_every_trial_from_its_checkpoint(tmp_path, monkeypatch):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    steps = ["model.lora.enabled=true", "train.max_steps=12", "train.checkpoint_every=4", "train.eval_every=4"]
    cmd = command(tmp_path, store, "killed", "beta=0.1,0.3", "hydra.sweeper.pack=2", *steps)
    first = start(cmd, tmp_path, "first.log")
    checkpoints = [tmp_path / "sweep" / str(n) / "checkpoint" / "checkpoint.pt" for n in range(2)]
    kill_when(first, lambda _: all(c.exists() for c in checkpoints), tmp_path, "first.log")
    killed_at = [sweep.checkpoint_step(str(c)) for c in checkpoints]
    assert all(4 <= step < 12 for step in killed_at)

    out = finish(cmd, tmp_path)
    log = out.stdout + out.stderr
    trials, runs = assert_consistent(tmp_path, store, "killed", [0.1, 0.3])
    assert sorted(trials) == [0, 1, 2, 3]
    assert "trials 2,3 packed in one process over one base model (beta differs)" in log
    for number, source in ((2, 0), (3, 1)):
        assert trials[number].user_attrs[names.RESUMED_FROM] == source
        assert f"resumes the point of interrupted trial {source} from its checkpoint" in log

    monkeypatch.chdir(tmp_path)  # the caches the sweep built
    from dpo_sweep.run import run_trial

    for number in (2, 3):
        beta = trials[number].params["beta"]
        cfg = compose(TINY + steps + [f"beta={beta}", "tracking.enabled=false"])
        run_trial(cfg, out_dir=str(tmp_path / f"uninterrupted-{number}"))
        resumed = objective(tmp_path / "sweep" / str(number))["metrics"]
        for key, value in objective(tmp_path / f"uninterrupted-{number}")["metrics"].items():
            assert resumed[key] == pytest.approx(value, abs=1e-5, rel=1e-5), (number, key)
