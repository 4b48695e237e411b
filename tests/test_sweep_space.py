"""The sweeper's pieces that need no training: search space from overrides, grid, settings,
samplers and pruners, override quoting, the objective spec. Fast, in process."""

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from conftest import compose
from dpo_sweep.config import ConfigError, objective_spec, validate
from dpo_sweep.run import objective_values
from dpo_sweep.sweep import SweepSettings, build_pruner, build_sampler, check_grid
from dpo_sweep.sweep.space import grid_points, override_text, parse_search_space


def space(*arguments, params=None):
    dims, fixed = parse_search_space(params, arguments)
    return {d.key: d for d in dims}, fixed


def test_lists_and_choice_are_categorical_in_order():
    dims, fixed = space("beta=0.1,0.5", "loss=choice(sigmoid,ipo)", "train.max_steps=3")
    assert dims["beta"].distribution == CategoricalDistribution((0.1, 0.5))
    assert dims["beta"].values == (0.1, 0.5)
    assert dims["loss"].values == ("sigmoid", "ipo")
    assert fixed == ["train.max_steps=3"]  # passes through to every trial


def test_range_is_exclusive_like_hydra():
    dims, _ = space("train.max_steps=range(1,4)", "seed=range(10,0,-5)", "beta=range(0.1,0.4,0.1)")
    assert dims["train.max_steps"].values == (1, 2, 3)
    assert dims["train.max_steps"].distribution == IntDistribution(1, 3, step=1)
    assert dims["seed"].values == (10, 5)
    assert dims["seed"].distribution == IntDistribution(5, 10, step=5)
    assert dims["beta"].values == (0.1, 0.2, 0.3)  # counted, not summed: no 0.30000000000000004, no 0.4
    assert isinstance(dims["beta"].distribution, CategoricalDistribution)


def test_interval_int_and_log_tags():
    dims, _ = space("optimizer.lr=tag(log, interval(1e-5, 1e-2))", "beta=interval(0.05, 0.5)",
                    "train.max_steps=int(interval(2, 8))", "train.batch_size=tag(log, int(interval(2, 16)))")
    assert dims["optimizer.lr"].distribution == FloatDistribution(1e-5, 1e-2, log=True)
    assert dims["beta"].distribution == FloatDistribution(0.05, 0.5)
    assert dims["train.max_steps"].distribution == IntDistribution(2, 8)
    assert dims["train.batch_size"].distribution == IntDistribution(2, 16, log=True)
    assert all(d.values is None for d in dims.values())  # intervals are sampled, never a grid


def test_config_params_and_command_line_merge_with_the_command_line_winning():
    dims, fixed = space("beta=0.2,0.3", params={"beta": "interval(0.01, 1)", "optimizer.lr": "1e-3,1e-4", "seed": "3"})
    assert dims["beta"].values == (0.2, 0.3)
    assert dims["optimizer.lr"].values == (1e-3, 1e-4)
    assert fixed == ["seed=3"]


@pytest.mark.parametrize("override, expected", [
    ("beta=tag(log, interval(0, 1))", "low > 0 for a log scale"),
    ("beta=tag(linear, interval(0.1, 1))", "no tag but 'log'"),
    ("beta=interval(0.5, 0.1)", "low < high"),
    ("beta=tag(log, choice(0.1, 0.5))", "only on interval()"),
    ("train.max_steps=range(3,3)", "at least one value"),
])
def test_unusable_sweeps_name_the_key(override, expected):
    with pytest.raises(ConfigError, match=expected) as e:
        space(override)
    assert f"'{override.split('=')[0]}'" in str(e.value)


def test_grid_is_the_product_in_order():
    dims, _ = parse_search_space(None, ["beta=0.1,0.5", "loss=sigmoid,ipo,hinge"])
    points = grid_points(dims)
    assert len(points) == 6
    assert points[:2] == [{"beta": 0.1, "loss": "sigmoid"}, {"beta": 0.1, "loss": "ipo"}]
    assert grid_points([]) == [{}]  # no swept key: one trial with the fixed overrides


def settings(**changes):
    base = {"n_trials": None, "n_jobs": 1, "study_name": None, "storage": None, "max_failure_rate": 0.5,
            "sampler": {"name": "tpe", "seed": 0, "kwargs": {}}, "pruner": {"name": "median", "kwargs": {}},
            "params": None}
    return SweepSettings.from_config(OmegaConf.merge(base, changes))


def test_a_grid_needs_finite_dimensions():
    dims, _ = parse_search_space(None, ["beta=0.1,0.5", "optimizer.lr=interval(1e-4, 1e-2)"])
    with pytest.raises(ConfigError, match="'hydra.sweeper.n_trials' = None.*optimizer.lr=interval"):
        check_grid(dims, settings(), grid=True)
    with pytest.raises(ConfigError, match="'hydra.sweeper.sampler.name' = 'grid'"):
        check_grid(dims, settings(n_trials=4, sampler={"name": "grid"}), grid=True)
    check_grid(dims, settings(n_trials=4), grid=False)


@pytest.mark.parametrize("changes, key", [
    ({"n_jobs": 0}, "n_jobs"), ({"n_trials": 0}, "n_trials"), ({"max_failure_rate": 1.5}, "max_failure_rate"),
    ({"sampler": {"name": "bayes"}}, "sampler.name"), ({"pruner": {"name": "early"}}, "pruner.name"),
])
def test_bad_settings_name_the_key(changes, key):
    with pytest.raises(ConfigError, match=f"'hydra.sweeper.{key}'"):
        settings(**changes)


@pytest.mark.parametrize("name", ["tpe", "random", "grid", "gp", "nsgaii"])
def test_every_sampler_builds_and_its_seed_repeats_the_points(name):
    def first_points(seed):
        study = optuna.create_study(sampler=build_sampler(name, seed, {}))
        return [study.ask({"beta": FloatDistribution(0.01, 1.0)}).params["beta"] for _ in range(3)]

    assert first_points(7) == first_points(7) != first_points(8)


def test_sampler_and_pruner_arguments_are_checked():
    assert type(build_sampler("tpe", 0, {"n_startup_trials": 3})).__name__ == "TPESampler"
    with pytest.raises(ConfigError, match="'hydra.sweeper.sampler.kwargs'"):
        build_sampler("tpe", 0, {"n_startup": 3})
    with pytest.raises(ConfigError, match="'hydra.sweeper.pruner.kwargs'"):
        build_pruner("median", {"patience": 2})
    names = {n: type(build_pruner(n, {})).__name__ for n in ("median", "successive_halving", "hyperband", "none")}
    assert names == {"median": "MedianPruner", "successive_halving": "SuccessiveHalvingPruner",
                     "hyperband": "HyperbandPruner", "none": "NopPruner"}


@pytest.mark.parametrize("value", ["1", "a b", "it's", "x,y", "C:\\dir\\", "sqlite:////tmp/a.db", 0.30000000000000004,
                                   1e-05, 3, True, None, [0.9, 0.99], "ipo"])
def test_override_text_reads_back_as_the_same_value(value):
    parsed = OverridesParser.create().parse_override(f"key={override_text(value)}").value()
    assert parsed == value and type(parsed) is type(value)


def test_objective_spec_single_and_multi():
    cfg = compose(["objective.metric=[eval/rewards/accuracies,eval/loss]", "objective.direction=[maximize,minimize]"])
    assert objective_spec(cfg) == [("eval/rewards/accuracies", "maximize"), ("eval/loss", "minimize")]
    assert objective_values(cfg, {"eval/rewards/accuracies": 0.7, "eval/loss": 0.6}) == (0.7, 0.6)
    assert objective_values(compose(), {"eval/gen/reward": 0.4, "eval/rewards/accuracies": 0.7}) == 0.4  # the default
    with pytest.raises(ConfigError, match="'objective.direction'.*a list of 2 directions"):
        validate(compose(["objective.metric=[eval/rewards/accuracies,eval/loss]"]))
    with pytest.raises(ConfigError, match="'objective.direction' = 'up'"):
        validate(compose(["objective.direction=up"]))
    with pytest.raises(ConfigError, match="'objective.metric' = 'eval/nope'"):
        objective_values(compose(["objective.metric=eval/nope"]), {"eval/loss": 0.6})
