"""`python -m dpo_sweep.report`: a real small sweep runs in a subprocess, then its report is
checked against what MLflow holds: one row per trial with its params and objective, best first,
and the PNGs are images with the labels a reader needs."""

import dataclasses
import os
import re
import subprocess
import sys

import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import FAST, REPO
from dpo_sweep import report, report_plots

SMALL = [*FAST, "train.max_steps=3", "dataset.builtin_size=60", "dataset.eval_size=10", "train.progress=false"]


def env():
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=path)


def run(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def sweep(tmp, name, *overrides):
    """Run a sweep into `tmp`/`name` with its own store; return (folder, store URI)."""
    folder, store = tmp / name, f"sqlite:///{tmp}/{name}.db"
    proc = run(["dpo_sweep", "-m", *SMALL, f"hydra.sweep.dir={folder}", f"tracking.uri={store}", *overrides], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder, store


def mlflow_trials(store):
    """(parent run, {trial number: child run}) straight from the MLflow client."""
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.data.tags.get("sweep.role") == "parent")
    children = {int(r.data.tags["sweep.trial_number"]): r for r in runs
                if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    return parent, children


def table(markdown):
    """The trials table of results.md as a list of {column: cell}."""
    lines = [line for line in markdown.split("## Trials, best first")[1].splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    header, rows = cells[0], cells[2:]
    return [dict(zip(header, row)) for row in rows]


def check_png(path, min_size=(400, 300)):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] >= min_size[0] and image.size[1] >= min_size[1]
        assert len(set(image.convert("L").getdata())) > 10, f"{path} looks blank"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """A 2 x 2 grid of beta x lr, three steps a trial, and its report written by the command."""
    tmp = tmp_path_factory.mktemp("report")
    folder, store = sweep(tmp, "grid", "beta=0.1,0.5", "optimizer.lr=1e-4,1e-3")
    proc = run(["dpo_sweep.report", str(folder)], tmp)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp, folder, store, proc.stdout


def test_report_files_are_written_into_the_sweep_folder(grid):
    tmp, folder, _, stdout = grid
    for name in ("results.md", "curves.png", "heatmap.png"):
        assert (folder / name).is_file(), name
        assert f" {os.path.relpath(folder / name, tmp)}" in stdout  # relative to where the command ran
    check_png(folder / "curves.png")
    check_png(folder / "heatmap.png")


def test_table_has_every_trial_with_its_params_and_mlflow_values(grid):
    _, folder, store, _ = grid
    rows = table((folder / "results.md").read_text())
    parent, children = mlflow_trials(store)
    assert sorted(int(r["trial"]) for r in rows) == sorted(children) == [0, 1, 2, 3]
    for row in rows:
        run = children[int(row["trial"])]
        assert float(row["beta"]) == float(run.data.params["beta"])
        assert float(row["optimizer.lr"]) == float(run.data.params["optimizer.lr"])
        assert row["state"] == run.data.tags["sweep.state"] == "COMPLETE"
        assert float(row["objective"]) == pytest.approx(run.data.metrics["objective"], rel=1e-3)
        for metric in ("eval/rewards/accuracies", "eval/rewards/margins"):
            assert float(row[metric]) == pytest.approx(run.data.metrics[metric], rel=1e-3, abs=1e-6)
        assert row["duration"].removesuffix(" *").endswith(" s")  # "*": the trial built the shared caches
    points = {(float(r["beta"]), float(r["optimizer.lr"])) for r in rows}
    assert points == {(b, lr) for b in (0.1, 0.5) for lr in (1e-4, 1e-3)}


def test_best_trial_is_first_and_named_as_the_best_setting(grid):
    tmp, folder, store, stdout = grid
    markdown = (folder / "results.md").read_text()
    rows = table(markdown)
    parent, children = mlflow_trials(store)
    objectives = [children[int(r["trial"])].data.metrics["objective"] for r in rows]
    assert objectives[0] == max(objectives)
    assert rows[0]["trial"] == parent.data.tags["best.trial_number"]
    best = markdown.split("## Best setting")[1]
    assert f"**Trial {rows[0]['trial']}**: beta = {rows[0]['beta']}, optimizer.lr = {rows[0]['optimizer.lr']}" in best
    assert f"python -m dpo_sweep.reproduce {os.path.relpath(folder / rows[0]['trial'], tmp)}" in best
    assert stdout.index(f"| {rows[0]['trial']} ") < stdout.index(f"| {rows[-1]['trial']} ")  # printed best first


def test_summary_names_the_sweep_and_its_store(grid):
    _, folder, store, _ = grid
    markdown = (folder / "results.md").read_text()
    parent, _ = mlflow_trials(store)
    assert "- objective: eval/gen/reward (maximize)" in markdown
    assert "- trials: 4 (4 COMPLETE)" in markdown
    assert "`beta=0.1,0.5`; `optimizer.lr=1e-4,1e-3`" in markdown
    assert f"parent run `{parent.info.run_id}`" in markdown and store in markdown
    assert re.search(r"- wall time: [\d.]+ s|- wall time: \d+ min", markdown)


def test_report_by_parent_run_id_matches_the_folder_report(grid):
    tmp, folder, store, _ = grid
    parent, _ = mlflow_trials(store)
    out = tmp / "by_id"
    proc = run(["dpo_sweep.report", parent.info.run_id, "--tracking-uri", store, "--out", str(out)], tmp)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert table((out / "results.md").read_text()) == table((folder / "results.md").read_text())
    check_png(out / "heatmap.png")


def test_grid_plots_are_labelled(grid):
    _, folder, store, _ = grid
    sweep_report = report.load_sweep(str(folder))
    heat = report_plots.objective_figure(sweep_report)
    ax, colourbar = heat.axes
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("optimizer.lr", "beta")
    assert ax.images, "a grid is drawn as a heat map"
    assert "eval/gen/reward" in colourbar.get_ylabel() and "beta x optimizer.lr" in ax.get_title()
    curves = report_plots.curves_figure(sweep_report)
    assert [a.get_ylabel() for a in curves.axes] == ["train/loss", "train/rewards/accuracies", "eval/gen/reward"]
    assert all(a.get_xlabel() == "step" and a.get_title() for a in curves.axes)
    labels = [t.get_text() for t in curves.legends[0].get_texts()]
    assert labels[0].startswith(f"trial {sweep_report.best[0]}: beta=") and len(labels) == 4
    assert all(len(line.get_xdata()) == 3 for line in curves.axes[0].get_lines())  # three steps a trial


def test_fewer_swept_keys_degrade_to_a_line_or_bars(grid):
    """The same trials reported as a sweep of beta only, or of nothing: the objective against
    beta, or per trial."""
    _, folder, _, _ = grid
    sweep_report = report.load_sweep(str(folder))
    line = report_plots.objective_figure(dataclasses.replace(sweep_report, keys=["beta"])).axes[0]
    assert line.get_xlabel() == "beta" and "against beta" in line.get_title()
    bars = report_plots.objective_figure(dataclasses.replace(sweep_report, keys=[])).axes[0]
    assert len(bars.patches) == 4 and "per trial" in bars.get_title()


def test_sampled_sweep_of_other_keys_is_a_scatter(tmp_path):
    """A sampled sweep over a config group and a log-uniform lr: columns for the swept group,
    a scatter coloured by the objective, with a categorical axis for the loss names."""
    folder, store = sweep(tmp_path, "sampled", "loss=sigmoid,ipo", "optimizer.lr=tag(log, interval(1e-4, 1e-2))",
                          "hydra.sweeper.n_trials=3", "train.max_steps=2")
    out = tmp_path / "out"
    assert report.main([str(folder), "--out", str(out)]) == 0
    rows = table((out / "results.md").read_text())
    _, children = mlflow_trials(store)
    assert len(rows) == 3
    for row in rows:
        assert row["loss"] == children[int(row["trial"])].data.params["loss.name"]
        assert float(row["beta"]) == 0.1  # not swept: the fixed value
    check_png(out / "heatmap.png")
    sweep_report = report.load_sweep(str(folder))
    assert {t.param("loss") for t in sweep_report.trials} == {"sigmoid", "ipo"}  # TPE seeded 0 drew both
    ax = report_plots.objective_figure(sweep_report).axes[0]
    assert not ax.images and ax.collections, "sampled trials are drawn as a scatter"
    assert (ax.get_xlabel(), ax.get_xscale(), ax.get_ylabel()) == ("optimizer.lr", "log", "loss")
    assert {t.get_text() for t in ax.get_yticklabels()} == {"sigmoid", "ipo"}


def test_unknown_sources_say_what_was_looked_for(grid, tmp_path, capsys):
    _, folder, store, _ = grid
    assert report.main([str(tmp_path)]) == 2
    assert f"{tmp_path} is not a sweep folder: it has no multirun.yaml" in capsys.readouterr().err
    missing = "0" * 32
    assert report.main([missing, "--tracking-uri", store]) == 2
    assert f"no MLflow run {missing} in {store}" in capsys.readouterr().err
    _, children = mlflow_trials(store)
    child = children[0]
    assert report.main([child.info.run_id, "--tracking-uri", store]) == 2
    assert f"is a trial of the sweep whose parent run is {child.data.tags['mlflow.parentRunId']}: pass that id" \
        in capsys.readouterr().err
    moved = tmp_path / "moved"  # a sweep folder the store has no parent run for
    moved.mkdir()
    (moved / "multirun.yaml").write_text((folder / "multirun.yaml").read_text())
    assert report.main([str(moved)]) == 2
    assert f"no sweep in {store} for the folder {moved} (looked for a run tagged sweep.role=parent and " \
           f"sweep.folder={moved})" in capsys.readouterr().err
    assert report.main([str(folder), "--tracking-uri", f"sqlite:///{tmp_path}/none.db"]) == 2
    assert f"no MLflow store at {tmp_path}/none.db" in capsys.readouterr().err
    assert report.main(["not-a-sweep"]) == 2
    assert "neither a sweep folder" in capsys.readouterr().err


def test_help_names_the_outputs():
    proc = run(["dpo_sweep.report", "--help"], REPO, timeout=60)
    assert proc.returncode == 0
    assert "--tracking-uri" in proc.stdout and "--out" in proc.stdout and "heatmap.png" in proc.stdout


def test_paths_are_shown_relative_to_where_the_command_runs(tmp_path):
    from dpo_sweep.paths import shown
    assert shown(str(tmp_path / "sweeps" / "a" / "3"), str(tmp_path)) == os.path.join("sweeps", "a", "3")
    assert shown(f"sqlite:///{tmp_path}/outputs/mlflow.db", str(tmp_path)) == "sqlite:///outputs/mlflow.db"
    assert shown("/elsewhere/run", str(tmp_path)) == "/elsewhere/run"  # outside: unchanged
    assert shown("outputs/runs/x", str(tmp_path)) == "outputs/runs/x"
    assert shown("http://127.0.0.1:5000", str(tmp_path)) == "http://127.0.0.1:5000"


def test_a_heatmap_cell_shows_its_best_value_with_its_failures_beside_it():
    """A cell where one trial completed and another at the same point failed (a sampled sweep can
    ask a point twice) shows the completed value, with the failure counted under it."""
    from dpo_sweep.report_data import SweepReport, Trial
    from dpo_sweep.tracking import RunSummary

    def trial(number, beta, lr, state, value=None):
        run = RunSummary(f"r{number}", f"t{number}", "FINISHED", {}, {"beta": beta, "optimizer.lr": lr}, {})
        return Trial(number, state, {"beta": beta, "optimizer.lr": lr}, None if value is None else [value], run=run)

    trials = [trial(0, "0.1", "0.001", "COMPLETE", 0.61), trial(1, "0.1", "0.001", "FAIL"),
              trial(2, "0.5", "0.001", "COMPLETE", 0.4), trial(3, "0.1", "0.01", "FAIL"),
              trial(4, "0.5", "0.01", "COMPLETE", 0.3)]
    parent = RunSummary("p", "sweep-x", "FINISHED", {"sweep.study_name": "x"}, {}, {})
    sweep = SweepReport("sqlite:///x.db", parent, ["eval/gen/reward"], ["maximize"], ["beta", "optimizer.lr"],
                        trials, [0])
    fig = report_plots.objective_figure(sweep)
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert "0.61\n(+1 fail)" in texts  # the best value, not a failure mark over it
    assert "fail" in texts and "0.4" in texts and "0.3" in texts
