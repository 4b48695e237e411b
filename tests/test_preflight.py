"""Validation before anything runs: bad values, a misspelled objective metric and bad points of a
search space stop `python -m dpo_sweep` within 2 s, with one line on stderr naming the key and the
value, before Hydra writes a run or sweep folder and before any study or MLflow run exists."""

import os
import subprocess
import sys
import time

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode

from conftest import compose
from dpo_sweep.config import ConfigError, max_total_steps, run_metrics, validate
from dpo_sweep.paths import conf_dir
from dpo_sweep.preflight import check_sweep
from dpo_sweep.sweep.space import check_points, parse_search_space

ALL_METRICS = "eval/gen/kl, eval/gen/length, eval/gen/ref_reward, eval/gen/reward, eval/gen/win_rate"


def cli(cwd, *args, env=None):
    """`python -m dpo_sweep *args` in `cwd`: (exit status, stderr lines, seconds)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dpo_sweep", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, HF_HUB_OFFLINE="1", **(env or {})))
    return proc.returncode, proc.stderr.strip().splitlines(), time.monotonic() - start


def assert_stopped_early(tmp_path, args, *expected, keep=()):
    """The command fails in under 2 s with one line on stderr holding each `expected` text, and
    leaves nothing in `tmp_path` (no run or sweep folder, no mlflow.db, no study journal)."""
    status, lines, seconds = cli(tmp_path, *args)
    assert status != 0, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert seconds < 2, f"{seconds:.2f} s"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)


# ---------------------------------------------------------------------------- one run


@pytest.mark.parametrize("override, expected", [
    ("beta=inf", "config key 'beta' = inf: expected a finite number > 0"),
    ("beta=-1", "config key 'beta' = -1.0: expected a finite number > 0"),
    ("optimizer.lr=inf", "config key 'optimizer.lr' = inf: expected a finite number > 0"),
    ("optimizer.lr=0", "config key 'optimizer.lr' = 0.0: expected a finite number > 0"),
    ("optimizer.eps=inf", "config key 'optimizer.eps' = inf: expected a finite number > 0"),
    ("train.max_grad_norm=nan", "config key 'train.max_grad_norm' = nan: expected a finite number"),
    ("train.warmup_ratio=1.5", "config key 'train.warmup_ratio' = 1.5: expected 0 <= value < 1"),
])
def test_out_of_range_values_stop_at_once(tmp_path, override, expected):
    assert_stopped_early(tmp_path, [override], expected)


def test_a_warmup_longer_than_the_run_stops(tmp_path):
    assert_stopped_early(tmp_path, ["train.max_steps=10", "train.warmup_steps=11"],
                         "config key 'train.warmup_steps' = 11: expected at most the run's optimizer steps (10")
    # epochs: the built-in set's 500 train pairs in batches of 8 are 63 steps an epoch
    assert_stopped_early(tmp_path, ["train.epochs=2", "train.warmup_steps=127"],
                         "config key 'train.warmup_steps' = 127", "(126")


def test_warmup_bound_is_the_trainers_step_count():
    assert max_total_steps(compose()) == 63  # steps.steps_per_epoch(500, 8, 1): 62 full batches and one short
    assert max_total_steps(compose(["train.max_steps=7"])) == 7
    assert max_total_steps(compose(["train.epochs=3", "train.grad_accum=2", "dataset.max_train_samples=40"])) == 6
    assert max_total_steps(compose(["dataset=local", "dataset.path=x.jsonl"])) is None  # only the data can tell
    validate(compose(["train.max_steps=10", "train.warmup_steps=10"]))  # as long as the run: allowed
    validate(compose(["train.warmup_steps=63"]))


@pytest.mark.parametrize("loss", ["ipo", "hinge"])
def test_label_smoothing_is_refused_where_the_loss_ignores_it(tmp_path, loss):
    assert_stopped_early(tmp_path, [f"loss={loss}", "loss.label_smoothing=0.1"],
                         f"config key 'loss.label_smoothing' = 0.1: expected 0 with loss.name={loss}")


def test_label_smoothing_stays_where_the_loss_uses_it():
    for overrides in (["loss=cdpo"], ["loss=robust"], ["loss=ipo"], ["loss=hinge", "loss.label_smoothing=0"]):
        validate(compose(overrides))


def test_a_misspelled_objective_metric_stops_before_training(tmp_path):
    assert_stopped_early(tmp_path, ["objective.metric=eval/acc"],
                         "config key 'objective.metric' = 'eval/acc': not a metric this run logs; expected one of "
                         + ALL_METRICS, "eval/rewards/accuracies", "train/loss")
    assert_stopped_early(tmp_path, ["objective.metric=[eval/loss,eval/acc]", "objective.direction=[minimize,maximize]"],
                         "config key 'objective.metric' = ['eval/loss', 'eval/acc']: 'eval/acc' is not a metric")


def test_objective_metrics_follow_the_judge_and_the_generation_eval():
    assert "eval/gen/reward" in run_metrics(compose())
    assert "eval/gen/reward" not in run_metrics(compose(["judge=none"]))
    assert "eval/gen/kl" in run_metrics(compose(["judge=none"]))
    assert not any(m.startswith("eval/gen/") for m in run_metrics(compose(["eval.gen.enabled=false"])))
    with pytest.raises(ConfigError, match="'objective.metric' = 'eval/gen/length'.*eval.gen.enabled=true"):
        validate(compose(["eval.gen.enabled=false", "objective.metric=eval/gen/length"]))
    for metric in run_metrics(compose()):
        validate(compose([f"objective.metric={metric}"]))


def test_run_metrics_are_the_metrics_a_run_returns(tmp_path, monkeypatch):
    from dpo_sweep.losses import METRIC_NAMES
    from dpo_sweep.run import build_trainer

    monkeypatch.chdir(tmp_path)  # the caches go under ./outputs/cache
    cfg = compose(["train.max_steps=1", "train.progress=false", "tracking.enabled=false", "dataset.builtin_size=40",
                   "dataset.eval_size=10", "eval.gen.prompts=2", "eval.gen.max_new_tokens=4"])
    trainer, _ = build_trainer(cfg)
    assert sorted(trainer.fit()) == run_metrics(cfg)
    assert {f"eval/{m}" for m in METRIC_NAMES} <= set(run_metrics(cfg))


def test_hydra_full_error_keeps_the_traceback(tmp_path):
    status, lines, _ = cli(tmp_path, "beta=inf", env={"HYDRA_FULL_ERROR": "1"})
    assert status != 0 and lines[0].startswith("Traceback") and "ConfigError" in "\n".join(lines)
    assert lines[-1] == "error: config key 'beta' = inf: expected a finite number > 0"
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------- sweeps


@pytest.mark.parametrize("overrides, expected", [
    (["beta=-1,0.5"], "sweep point beta=-1: config key 'beta' = -1.0: expected a finite number > 0"),
    (["optimizer.lr=0,1e-3"], "sweep point optimizer.lr=0: config key 'optimizer.lr' = 0.0"),
    (["beta=0.1,0.5", "optimizer.lr=1e-3,inf"], "sweep point beta=0.1, optimizer.lr=inf: config key 'optimizer.lr'"),
    (["bata=0.1,0.2"], "sweep parameter 'bata' = '0.1,0.2': not a config key"),
    (["beta=abc,0.1"], "sweep point beta='abc': config key 'beta': Value 'abc'"),
    (["beta=interval(-1, 1)", "hydra.sweeper.n_trials=2"],
     "sweep point beta=-1.0 (a bound of interval(-1, 1)): config key 'beta' = -1.0"),
    (["train.batch_size=int(interval(0, 8))", "hydra.sweeper.n_trials=2"], "config key 'train.batch_size' = 0"),
    (["train.max_steps=range(0, 3)"], "sweep point train.max_steps=0: config key 'train.max_steps' = 0"),
    (["loss=choice(sigmoid, dpo)"], "sweep point loss='dpo': In 'config': Could not find 'loss/dpo'"),
    (["loss=sigmoid,ipo", "loss.label_smoothing=0,0.1"],
     "sweep point loss='ipo', loss.label_smoothing=0.1: config key 'loss.label_smoothing' = 0.1"),
    (["train.warmup_ratio=0.1,1.5"], "config key 'train.warmup_ratio' = 1.5"),
    (["beta=0.1,0.5", "objective.metric=eval/acc"], "config key 'objective.metric' = 'eval/acc': not a metric"),
])
def test_bad_points_of_a_search_space_stop_before_the_sweep(tmp_path, overrides, expected):
    assert_stopped_early(tmp_path, [*overrides, "-m"], expected)


def test_a_misspelled_key_in_sweeper_params_stops_before_the_sweep(tmp_path):
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "typo.yaml").write_text(
        "# @package _global_\nhydra:\n  sweeper:\n    params:\n      bata: 0.1,0.2\n      beta: 0.1,0.2\n")
    assert_stopped_early(tmp_path, ["--config-dir", "conf", "+experiment=typo", "-m"],
                         "sweep parameter 'bata' = '0.1,0.2': not a config key", keep=["conf"])


def check(overrides):
    """Run the callback's sweep check on the config Hydra hands it for `<overrides> -m`."""
    with initialize_config_dir(config_dir=conf_dir(), version_base="1.3"):
        check_sweep(GlobalHydra.instance().hydra.compose_config("config", overrides, run_mode=RunMode.MULTIRUN))


@pytest.mark.parametrize("overrides", [
    ["+experiment=tiny_sweep"], ["+experiment=phi2_truthy"],
    ["beta=0.05,0.1,0.3", "loss=sigmoid,ipo,cdpo"],
    ["optimizer.lr=tag(log, interval(1e-5, 1e-2))", "beta=interval(0.05, 0.5)", "hydra.sweeper.n_trials=4"],
    ["train.max_length=64,128", "train.max_prompt_length=32"],
    ["optimizer.betas=choice([0.9,0.99],[0.8,0.9])"],
])
def test_good_search_spaces_pass(overrides):
    check(overrides)


def test_every_point_counts_not_each_value_alone():
    # each value is fine with the defaults, one combination is not
    with pytest.raises(ConfigError, match="train.max_length=128, train.max_prompt_length=200"):
        check(["train.max_length=128,512", "train.max_prompt_length=64,200"])
    # and a value that is bad with the defaults is fine where every point sets its partner
    check(["train.max_length=128,256", "train.max_prompt_length=64,100"])


def test_check_points_are_the_grid_and_the_interval_bounds():
    dims, _ = parse_search_space(None, ["beta=0.1,0.5", "optimizer.lr=tag(log, interval(1e-5, 1e-2))"])
    assert list(check_points(dims, limit=100)) == [
        {"beta": 0.1, "optimizer.lr": 1e-5}, {"beta": 0.1, "optimizer.lr": 1e-2},
        {"beta": 0.5, "optimizer.lr": 1e-5}, {"beta": 0.5, "optimizer.lr": 1e-2}]
    # past the limit, each dimension alone with the others at their first value
    assert list(check_points(dims, limit=3)) == [
        {"beta": 0.1, "optimizer.lr": 1e-5}, {"beta": 0.5, "optimizer.lr": 1e-5},
        {"beta": 0.1, "optimizer.lr": 1e-5}, {"beta": 0.1, "optimizer.lr": 1e-2}]


def test_list_choices_reach_the_trial_as_lists():
    dims, _ = parse_search_space(None, ["optimizer.betas=choice([0.9,0.99],[0.8,0.9])"])
    assert [dims[0].override(v) for v in dims[0].values] == ["optimizer.betas=[0.9,0.99]", "optimizer.betas=[0.8,0.9]"]


def test_a_warmup_longer_than_a_local_data_run_stops_before_training(tmp_path):
    """With a local file the run's length is known once the data is read: checked then, before the
    first step, naming the key."""
    from conftest import write_jsonl
    from dpo_sweep.config import ConfigError
    from dpo_sweep.run import run_trial

    rows = [{"prompt": f"p{i}", "chosen": "yes", "rejected": "no"} for i in range(20)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    cfg = compose([f"dataset.path={path}", "dataset.eval_size=4", "train.batch_size=8", "train.warmup_steps=50",
                   "tracking.enabled=false", "eval.gen.enabled=false", "sft.enabled=false"])
    with pytest.raises(ConfigError, match=r"'train.warmup_steps' = 50: expected at most the run's 2 optimizer steps"):
        run_trial(cfg, out_dir=str(tmp_path / "run"))
