"""MLflow as its users know it, read back through the MLflow client after real sweeps: the UI
opens the experiment on its runs, parents and trials have readable distinct names, the swept
values are params under short names, data counts are params (not curves), the data sets are run
inputs, each run has a description with its reproduce command, and system metrics on request."""

import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient

from conftest import FAST
from test_sweep import env

SMALL = [*FAST, "train.max_steps=3", "train.progress=false", "dataset.builtin_size=60", "dataset.eval_size=12"]


def sweep(tmp_path, store, *args):
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep", *SMALL, f"tracking.uri={store}",
                           "tracking.experiment=conventions", *args, "-m"], cwd=tmp_path, env=env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def two_sweeps(tmp_path_factory):
    """Two sweeps in default (timestamped) folders; the second samples system metrics."""
    tmp = tmp_path_factory.mktemp("conventions")
    store = f"sqlite:///{tmp}/mlflow.db"
    sweep(tmp, store, "beta=0.1,0.2", "optimizer.lr=1e-4")
    sweep(tmp, store, "beta=0.3", "optimizer.lr=1e-4,2e-4", "tracking.system_metrics=true",
          "tracking.system_metrics_interval=0.2", "train.max_steps=30")  # a few samples long
    client = MlflowClient(tracking_uri=store)
    experiment = client.get_experiment_by_name("conventions")
    return client, experiment, client.search_runs([experiment.experiment_id])


def test_the_experiment_opens_on_its_training_runs(two_sweeps):
    _, experiment, _ = two_sweeps
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_parents_and_trials_have_readable_distinct_names(two_sweeps):
    _, _, runs = two_sweeps
    parents = sorted(r.info.run_name for r in runs if r.data.tags.get("sweep.role") == "parent")
    assert len(parents) == 2 and parents[0][:17] != parents[1][:17]  # distinct where tables cut names
    assert parents[0].startswith("sweep ") and parents[0].endswith(": beta") and parents[1].endswith(": lr")
    trials = sorted(r.info.run_name for r in runs if "mlflow.parentRunId" in r.data.tags)
    assert trials == ["t0 beta=0.1", "t0 lr=0.0001", "t1 beta=0.2", "t1 lr=0.0002"]


def test_swept_values_are_params_under_short_names(two_sweeps):
    _, _, runs = two_sweeps
    by_name = {r.info.run_name: r for r in runs}
    assert by_name["t1 lr=0.0002"].data.params["lr"] == "0.0002"
    assert by_name["t1 lr=0.0002"].data.params["optimizer.lr"] == "0.0002"
    assert by_name["t1 beta=0.2"].data.params["beta"] == "0.2"


def test_data_counts_are_params_and_the_data_sets_are_inputs(two_sweeps):
    client, _, runs = two_sweeps
    trial = next(r for r in runs if r.info.run_name == "t0 beta=0.1")
    assert trial.data.params["data/train_pairs"] == "48" and trial.data.params["data/eval_pairs"] == "12"
    assert not [k for k in trial.data.metrics if k.startswith("data/")]
    inputs = {i.tags[0].value: i.dataset for i in client.get_run(trial.info.run_id).inputs.dataset_inputs}
    assert sorted(inputs) == ["eval", "train"]
    assert inputs["train"].name == "builtin-v3 (train)" and inputs["train"].source_type == "code"
    assert inputs["train"].digest != inputs["eval"].digest


def test_each_run_describes_itself_with_its_reproduce_command(two_sweeps):
    _, _, runs = two_sweeps
    trial = next(r for r in runs if r.info.run_name == "t1 beta=0.2")
    note = trial.data.tags["mlflow.note.content"]
    assert "beta 0.2" in note and "Trial 1 of the sweep" in note
    assert f"python -m dpo_sweep.reproduce {trial.info.run_id} --tracking-uri" in note
    parent = next(r for r in runs if r.info.run_id == trial.data.tags["mlflow.parentRunId"])
    note = parent.data.tags["mlflow.note.content"]
    assert "`beta=0.1,0.2`" in note and "python -m dpo_sweep.report outputs/sweeps/" in note


def test_system_metrics_when_asked(two_sweeps):
    _, _, runs = two_sweeps
    sampled = next(r for r in runs if r.info.run_name == "t0 lr=0.0001")
    assert "system/cpu_utilization_percentage" in sampled.data.metrics
    unsampled = next(r for r in runs if r.info.run_name == "t0 beta=0.1")
    assert not [k for k in unsampled.data.metrics if k.startswith("system/")]


def test_the_trial_that_built_the_shared_caches_says_so(two_sweeps):
    """Its duration includes the SFT stage and the reference caches; the table marks it."""
    from dpo_sweep.report_data import to_trial
    from dpo_sweep.results import DURATION, duration_note
    from dpo_sweep.tracking import get_run

    client, _, runs = two_sweeps
    first, second = (next(r for r in runs if r.info.run_name == n) for n in ("t0 beta=0.1", "t1 beta=0.2"))
    assert first.data.tags["caches_built"] == "reflogps,refsamples,sft" and "caches_built" not in second.data.tags
    uri = client.tracking_uri
    built = to_trial(uri, 0, get_run(uri, first.info.run_id), ["eval/gen/reward"])
    assert DURATION[1](built).endswith(" *") and "SFT weights" in duration_note([built])
