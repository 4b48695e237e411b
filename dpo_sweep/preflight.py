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
import functools
import os
import shlex
import socket
import sys
import traceback
from typing import Any, Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Set, Tuple
from urllib.parse import urlparse

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_sweep.config import ConfigError, validate

SWEEPER = "hydra_plugins.dpo_sweep_sweeper.dpo_optuna_sweeper.DPOOptunaSweeper"
# Most points of a search space checked one by one; past it each dimension is checked alone
# (every value or bound, the others at their first), which still names every bad value.
MAX_POINTS = 2000
EXIT_STATUS = 2  # as argparse's usage errors
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports Ctrl-C
HUB_TIMEOUT_S = 1.5  # one connect to the hub decides whether it can be reached: no long retries


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


def command_line(set_keys: Dict[str, str]) -> str:
    """This process's command line as `python -m dpo_sweep ...`, with the overrides `set_keys`
    replacing any of the same keys: the command that continues what this one started."""
    kept = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") not in set_keys]
    return shlex.join(["python", "-m", "dpo_sweep", *kept, *(f"{k}={v}" for k, v in set_keys.items())])


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



# ---------------------------------------------------------------------------- models and data


class Source(NamedTuple):
    """Something a run loads by name: the config key naming it, the name, what it is."""

    key: str  # model.name_or_path
    name: str  # a hub name, a local folder or a local file
    kind: str  # model | tokenizer | dataset | file
    revision: Optional[str] = None


# Files that make a local folder loadable as each kind (any one of them).
FOLDER_FILES = {"model": ("config.json", "adapter_config.json"),
                "tokenizer": ("tokenizer_config.json", "tokenizer.json", "config.json")}
# How to provide each kind: the config key's value, a download, or a cache that holds it.
EXAMPLE_VALUE = {"model": "/path/to/model", "tokenizer": "/path/to/tokenizer", "dataset": "<hub name>"}


def sources_of(cfg: DictConfig) -> List[Source]:
    """The models, tokenizer, data files or hub data set and reward model `cfg` loads; none for
    the tiny default model and the built-in data set. `dataset=local` without `dataset.path` is a
    ConfigError (the `local` group names no data set of its own)."""
    m, d = cfg.model, cfg.dataset
    found = []
    if m.name_or_path:
        found.append(Source("model.name_or_path", m.name_or_path, "model", m.revision))
    if m.tokenizer and m.tokenizer != "char":
        found.append(Source("model.tokenizer", m.tokenizer, "tokenizer", m.revision))
    path = OmegaConf.select(d, "path", default=None)  # `???` (dataset=local) reads as None
    if path:
        found.append(Source("dataset.path", str(path), "file"))
    elif d.name == "local":
        raise ConfigError("config key 'dataset.path' is required with dataset=local: the data file "
                          "(dataset.path=/data/prefs.jsonl; .jsonl, .json, .parquet or .csv)")
    elif d.name != "builtin":
        found.append(Source("dataset.name", d.name, "dataset"))
    if d.eval_path:
        found.append(Source("dataset.eval_path", str(d.eval_path), "file"))
    if cfg.judge.name == "reward_model" and cfg.judge.name_or_path and cfg.eval.gen.enabled:
        found.append(Source("judge.name_or_path", cfg.judge.name_or_path, "model"))
    return found


def check_sources(sources: Iterable[Source]) -> None:
    """A ConfigError naming each source that cannot be found, then how to provide it: a local
    folder or file that exists (a folder with the files of its kind), a hub name in the Hugging
    Face cache, or a hub name while the hub can be reached (HF_HUB_OFFLINE unset, one short
    connect). Takes a second at most; nothing is downloaded."""
    problems, advice = [], []
    for s in sorted(set(sources)):
        reason = _unresolved(s)
        if reason:
            problems.append(f"config key '{s.key}' = {s.name!r}: {reason[0]}")
            advice += [reason[1]] if reason[1] not in advice else []
    if problems:
        raise ConfigError("; ".join(problems) + "".join(f"; {a}" for a in advice if a))


def _unresolved(s: Source) -> Optional[Tuple[str, str]]:
    """(why `s` cannot be loaded, how to provide it), or None when it can be loaded."""
    name = os.path.expanduser(s.name)
    if s.kind == "file":
        return None if os.path.isfile(name) else (f"data file '{s.name}' does not exist", "")
    if os.path.isdir(name):
        wanted = FOLDER_FILES.get(s.kind)
        if not wanted or any(os.path.exists(os.path.join(name, f)) for f in wanted):
            return None
        return f"the folder holds no {' or '.join(wanted)}", "a folder written by save_pretrained has one"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:  # a path, not a hub name
        return "no such folder", ""
    if _in_hub_cache(s):
        return None
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or (s.kind == "dataset" and _env_flag("HF_DATASETS_OFFLINE")):
        why = "HF_HUB_OFFLINE=1 allows no download"
    elif not _hub_reachable():
        why = f"{urlparse(constants.ENDPOINT).hostname} cannot be reached (no network?)"
    else:
        return None  # the hub can be asked; its own error names what is wrong
    repo_type = "--repo-type dataset " if s.kind == "dataset" else ""
    return (f"not a local folder and not in the Hugging Face cache ({constants.HF_HUB_CACHE})",
            f"{why}: give a local folder ({s.key}={EXAMPLE_VALUE[s.kind]}), download once online "
            f"(hf download {repo_type}<name>), or set HF_HOME to a cache that holds it")


def _in_hub_cache(s: Source) -> bool:
    """Whether the Hugging Face cache holds `s`: a model's or tokenizer's config file in the hub
    cache; a data set's files in the hub cache or its prepared copy in the `datasets` cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    if s.kind == "dataset":
        folder = os.path.join(constants.HF_HUB_CACHE, "datasets--" + s.name.replace("/", "--"), "snapshots")
        prepared = os.path.join(os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets"),
                                s.name.replace("/", "___"))
        return (os.path.isdir(folder) and bool(os.listdir(folder))) or os.path.isdir(prepared)
    for filename in FOLDER_FILES[s.kind]:
        try:
            if isinstance(try_to_load_from_cache(s.name, filename, revision=s.revision), str):
                return True
        except ValueError:  # not a valid hub name (huggingface_hub's HFValidationError)
            return False
    return False


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE")


@functools.lru_cache(maxsize=1)
def _hub_reachable() -> bool:
    """One connect and TLS handshake with the hub's host, HUB_TIMEOUT_S each at most (a proxy
    that accepts any connection but cannot reach the hub fails the handshake)."""
    import ssl

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=HUB_TIMEOUT_S) as conn:
            if url.scheme == "https":
                ssl.create_default_context().wrap_socket(conn, server_hostname=url.hostname).close()
        return True
    except OSError:  # refused, unknown host, timed out, or a certificate not the hub's
        return False
