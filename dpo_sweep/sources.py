"""What a run loads by name, found before anything loads: every model, tokenizer, data set and
reward model a config names is a local folder or file, in the Hugging Face cache, or on the hub
when it can be reached (one short connect decides; `HF_HUB_OFFLINE=1` means no). Used by the
preflight checks (dpo_sweep/preflight.py)."""

from __future__ import annotations

import functools
import os
import socket
from typing import Iterable, List, NamedTuple, Optional, Tuple
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from dpo_sweep.config import ConfigError

HUB_TIMEOUT_S = 1.5  # one connect to the hub decides whether it can be reached: no long retries


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
