"""Generation-based evaluation through a real sweep of the default: every trial logs the
eval/gen/* metrics and its samples, the SFT stage is trained once and loaded by the other trials,
the parent run and the report get frontier.png; a two-objective sweep marks its Pareto trials."""

import json
import math
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from test_sweep import env

QUICK = ["train.progress=false", "dataset.builtin_size=80", "dataset.eval_size=16", "train.max_steps=6",
         "train.eval_every=3", "sft.steps=20", "eval.gen.prompts=6", "eval.gen.max_new_tokens=8"]
GEN = ("eval/gen/reward", "eval/gen/win_rate", "eval/gen/kl", "eval/gen/length", "eval/gen/ref_reward")


def sweep(tmp, name, *args):
    store = f"sqlite:///{tmp}/mlflow.db"
    cmd = [sys.executable, "-m", "dpo_sweep", "-m", *QUICK, f"hydra.sweep.dir={tmp}/{name}", f"tracking.uri={store}",
           f"tracking.experiment={name}", *args]
    proc = subprocess.run(cmd, cwd=tmp, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    return client, parent, [r for r in runs if r is not parent], proc


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gen")
    return (tmp, *sweep(tmp, "grid", "beta=0.1,0.5", "optimizer.lr=1e-4,1e-3"))


def test_every_trial_logs_the_generation_metrics_and_its_samples(grid):
    tmp, client, _, trials, _ = grid
    assert len(trials) == 4
    for run in trials:
        assert set(GEN) <= set(run.data.metrics), run.data.metrics
        assert math.isfinite(run.data.metrics["eval/gen/kl"]) and run.data.metrics["eval/gen/length"] >= 1
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "eval/gen/reward")]
        assert steps == [3, 6]  # at every eval
        tables = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
        assert tables == {"samples/step_000003.json", "samples/step_000006.json"}
        folder = tmp / "grid" / run.data.tags["sweep.trial_number"]
        rows = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and {"prompt", "reference_answer", "policy_answer", "policy_reward"} <= set(rows[0])
        assert sum(r["policy_reward"] for r in rows) / 6 == pytest.approx(run.data.metrics["eval/gen/reward"])


def test_the_sft_stage_trains_once_for_the_sweep(grid):
    tmp, *_ = grid
    assert len(list((tmp / "outputs" / "cache").glob("sft-*.safetensors"))) == 1
    logs = {n: (tmp / "grid" / str(n) / "__main__.log").read_text() for n in range(4)}
    assert "SFT: 20 steps" in logs[0]
    assert all("SFT weights from cache" in logs[n] and "SFT: 20 steps" not in logs[n] for n in (1, 2, 3))
    assert len(list((tmp / "outputs" / "cache").glob("refsamples-*.json"))) == 1  # the reference's samples too


def test_the_parent_run_and_the_report_draw_the_frontier(grid):
    tmp, client, parent, _, _ = grid
    assert "plots/frontier.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep.report", str(tmp / "grid"), "--out", str(tmp / "report")],
                          cwd=tmp, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp / "report" / "frontier.png").stat().st_size > 10_000
    header = next(line for line in (tmp / "report" / "results.md").read_text().splitlines() if line.startswith("| trial"))
    assert "eval/gen/reward" in header and "eval/gen/kl" in header


def test_two_objectives_mark_the_pareto_trials(tmp_path):
    _, parent, trials, _ = sweep(tmp_path, "pareto", "beta=0.1,0.5", "optimizer.lr=1e-3",
                                 "objective.metric=[eval/gen/reward,eval/gen/kl]",
                                 "objective.direction=[maximize,minimize]")
    front = parent.data.tags["best.trial_numbers"].split(",")
    assert 1 <= len(front) <= 2
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep.report", str(tmp_path / "pareto")], cwd=tmp_path,
                          env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split("|") for line in (tmp_path / "pareto" / "results.md").read_text().splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    marked = {r[1].strip() for r in rows if r[2].strip() == "yes"}
    assert marked == set(front)
    assert (tmp_path / "pareto" / "frontier.png").exists()
