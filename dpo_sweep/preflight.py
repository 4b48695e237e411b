"""Checks before anything runs: the Hydra callback `Preflight` (registered under `hydra.callbacks`
in conf/config.yaml) validates a run's config, or every point of a sweep's search space, before
Hydra creates a run or sweep folder and before the sweeper opens a study or an MLflow run. It also
checks that every model, tokenizer, data set and reward model named can be found (`check_sources`):
a local folder or file, the Hugging Face cache, or the hub when it can be reached.

Hydra calls `on_run_start` / `on_multirun_start` right after composing the config. A bad value
ends the process there with one line on stderr and exit status 2 (the traceback too with
HYDRA_FULL_ERROR=1). Nothing heavy is imported on this path: no torch, no transformers (optuna
only for a sweep, to read its search space as the sweeper does).
"""

from __future__ import annotations

import copy
import os
import sys
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_sweep.config import ConfigError, validate
from dpo_sweep.sources import Source, check_sources, sources_of

SWEEPER = "hydra_plugins.dpo_sweep_sweeper.dpo_optuna_sweeper.DPOOptunaSweeper"
# Most points of a search space checked one by one; past it each dimension is checked alone
# (every value or bound, the others at their first), which still names every bad value.
MAX_POINTS = 2000
EXIT_STATUS = 2  # as argparse's usage errors


class Preflight(Callback):
    """Validate before Hydra writes anything: a run's config, or every point of a sweep."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        stop_on_error(lambda: (validate(config), check_sources(sources_of(config))))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sources: Set[Source] = set()
        stop_on_error(lambda: (check_sweep(config, sources), check_sources(sources)))


def stop_on_error(check: Callable[[], None]) -> None:
    """Run `check`; on a ConfigError print it as one line on stderr and exit with status 2.
    (Hydra turns an exception raised in a callback into a warning: SystemExit passes through.)"""
    try:
        check()
    except ConfigError as e:
        exit_with(e)


def exit_with(error: BaseException, status: int = EXIT_STATUS) -> None:
    """End the process with `error` as one line on stderr (`error: ...`) and exit status `status`;
    its traceback first with HYDRA_FULL_ERROR=1. Call it from an `except` block."""
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        traceback.print_exc()
    print("error: " + " ".join(str(error).split()), file=sys.stderr, flush=True)
    raise SystemExit(status) from None


# ---------------------------------------------------------------------------- sweeps


def check_sweep(config: DictConfig, sources: Optional[Set["Source"]] = None) -> None:
    """The sweeper's settings and search space as the sweeper will read them (sweep/loop.py
    `prepare`), then the config of every point: each grid point, each bound of an interval. The
    models and data sets the points name are added to `sources`, when given."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    if OmegaConf.select(config, "hydra.sweeper._target_") != SWEEPER:  # another sweeper: its own space
        validate(config)
        if sources is not None:
            sources.update(sources_of(config))
        return
    from dpo_sweep.sweep.settings import SweepSettings, check_grid
    from dpo_sweep.sweep.space import parse_search_space

    settings = SweepSettings.from_config(config.hydra.sweeper)
    arguments = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    try:
        dims, fixed = parse_search_space(settings.params, arguments, loader)
    except OmegaConfBaseException as e:  # a value Hydra's override grammar cannot read
        raise ConfigError(f"config key 'hydra.sweeper.params' = {settings.params!r}: {e}") from e
    check_grid(dims, settings, settings.is_grid())
    check_points(loader, config, arguments, fixed, dims, sources)


def check_points(loader, config: DictConfig, arguments: Sequence[str], fixed: Sequence[str], dims: Sequence,
                 sources: Optional[Set["Source"]] = None) -> None:
    """Validate the config of each point of `dims` (see `space.check_points`). Points that share
    their config-group choices share one composition (Hydra's own, `config`, when the command line
    `arguments` hold every fixed override); the other keys are set on a copy. The models and data
    sets each point names are added to `sources`, when given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from dpo_sweep.sweep.space import check_points as points_of

    parser = OverridesParser.create(config_loader=loader)
    composed = {d.key for d in dims if _needs_composition(parser.parse_override(d.override(d.corners()[0])), loader)}
    bases: Dict[Tuple[str, ...], DictConfig] = {}
    for point in points_of(dims, MAX_POINTS):
        lines = [d.override(point[d.key]) for d in dims]
        group_lines = tuple(line for d, line in zip(dims, lines) if d.key in composed)
        if group_lines not in bases:
            if not group_lines and set(fixed) <= set(arguments):  # Hydra composed this one already
                bases[group_lines] = config
            else:
                bases[group_lines] = _compose(loader, config, [*fixed, *group_lines], point, dims)
        cfg = copy.deepcopy(bases[group_lines])
        for d, line in zip(dims, lines):
            if d.key not in composed:
                _set(cfg, parser.parse_override(line).value(), d, point, dims)
        try:
            validate(cfg)
        except ConfigError as e:
            raise ConfigError(f"sweep point {_label(point, dims)}: {e}") from e
        if sources is not None:
            sources.update(sources_of(cfg))


def _needs_composition(override, loader) -> bool:
    """Whether Hydra must compose the config again for this override: a config group choice, or
    a key added (+), forced (++) or deleted (~), rather than a value set on an existing key."""
    plain = not (override.is_add() or override.is_force_add() or override.is_delete()) and override.package is None
    return not plain or bool(loader.get_group_options(override.key_or_group))


def _compose(loader, config: DictConfig, overrides: List[str], point: Dict[str, Any], dims) -> DictConfig:
    from hydra.errors import HydraException

    try:
        return loader.load_sweep_config(config, overrides)
    except (HydraException, OmegaConfBaseException) as e:
        reason = " ".join(str(e).split()).split(" Config search path:")[0]
        where = f"sweep point {_label(point, dims)}" if dims else "the sweep's fixed overrides"
        raise ConfigError(f"{where}: {reason}") from e


def _set(cfg: DictConfig, value: Any, dim, point: Dict[str, Any], dims) -> None:
    """Set a swept key as Hydra's override would; a key the config lacks or a value of the wrong
    type is a ConfigError naming the sweep parameter."""
    try:
        OmegaConf.update(cfg, dim.key, value, merge=True)
    except AttributeError as e:  # omegaconf's ConfigAttributeError / ConfigKeyError
        raise ConfigError(f"sweep parameter '{dim.key}' = {dim.spec!r}: not a config key (a typo? "
                          f"+{dim.key}=... adds a new key)") from e
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"sweep point {_label(point, dims)}: config key '{dim.key}': {reason}") from e


def _label(point: Dict[str, Any], dims) -> str:
    """`beta=-1, optimizer.lr=0.001`; an interval's value says that it is one of its bounds."""
    parts = []
    for d in dims:
        text = d.override(point[d.key]).split("=", 1)[1]
        parts.append(f"{d.key}={text}" + (f" (a bound of {d.spec})" if d.values is None else ""))
    return ", ".join(parts)
