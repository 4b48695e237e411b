"""Passwords in store URLs (`postgresql://user:secret@host/db`, `http://user:secret@mlflow:5000`)
never reach a file, a log line, an MLflow param or tag, a report or an error message.

At the start of every run and sweep (the Hydra callback `MaskCredentials`, before anything is
written) each password in the config is moved into this process's environment, under a name
derived from the URL's scheme, user, host and port, and the URL is rewritten with `***` in its
place. Everything downstream sees and records only the masked URL; `connectable(url)` puts the
password back at the moment a store is opened. Trials launched by the sweeper inherit the
environment, so they connect too.

A later process (a resume in a new shell, `python -m dpo_sweep.reproduce`) holds only the masked
URL: `connectable` then leaves the password out, and the client library finds it where it looks
by itself: libpq's `~/.pgpass` or `$PGPASSWORD` for PostgreSQL, `$MLFLOW_TRACKING_USERNAME` and
`$MLFLOW_TRACKING_PASSWORD` for an MLflow server. Or give the full URL again on the command line.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from typing import Any, Callable, Optional

MASK = "***"
ENV_PREFIX = "DPO_SWEEP_SECRET_"
# scheme://user:password@ ; the password has no "@", "/" or whitespace (URL-encode those)
URL_PASSWORD = re.compile(r"(?P<head>\b[a-zA-Z][a-zA-Z0-9+.-]*://(?P<user>[^:/@\s'\"]*)):(?P<password>[^@/\s'\"]+)@"
                          r"(?P<host>[^/\s'\"?#]*)")


def mask(text: Any) -> Any:
    """`text` with every URL password replaced by `***`; anything not a string unchanged."""
    if not isinstance(text, str) or "://" not in text:
        return text
    return URL_PASSWORD.sub(lambda m: f"{m['head']}:{MASK}@{m['host']}", text)


def _env_name(match: "re.Match[str]") -> str:
    key = f"{match['head']}@{match['host']}".encode()
    return ENV_PREFIX + hashlib.sha256(key).hexdigest()[:16].upper()


def stash(text: Any) -> Any:
    """Move every URL password in `text` into the environment; return `text` masked."""
    if not isinstance(text, str) or "://" not in text:
        return text
    for m in URL_PASSWORD.finditer(text):
        if m["password"] != MASK:
            os.environ[_env_name(m)] = m["password"]
    return mask(text)


def connectable(url: Optional[str]) -> Optional[str]:
    """The URL to open a store with: a masked password put back from the environment, or left
    out (user@host) when this process does not hold it, for the client library's own lookup."""
    if not url or MASK not in url:
        return url

    def fill(m: "re.Match[str]") -> str:
        if m["password"] != MASK:
            return m.group(0)
        secret = os.environ.get(_env_name(m))
        return f"{m['head']}:{secret}@{m['host']}" if secret else f"{m['head']}@{m['host']}"

    return URL_PASSWORD.sub(fill, url)


def for_mlflow(uri: Optional[str]) -> Optional[str]:
    """The tracking URI to give MLflow. An MLflow server's URL (http, https) loses its user and
    password, which go to MLflow's own `$MLFLOW_TRACKING_USERNAME` / `$MLFLOW_TRACKING_PASSWORD`
    (MLflow prints the URLs it is given); a database URL is `connectable`."""
    if not uri or not uri.startswith(("http://", "https://")):
        return connectable(uri)
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(connectable(uri) or uri)
    if parts.username is None:
        return uri
    if parts.password not in (None, MASK):
        os.environ["MLFLOW_TRACKING_USERNAME"] = parts.username
        os.environ["MLFLOW_TRACKING_PASSWORD"] = parts.password
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def mask_config(cfg) -> None:
    """Stash and mask, in place, every string of a DictConfig (its hydra node too)."""
    from omegaconf import DictConfig, ListConfig, OmegaConf, flag_override

    def walk(node) -> None:
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else enumerate(node)
        for key, _ in list(items):
            if OmegaConf.is_missing(node, key) or (isinstance(node, DictConfig) and OmegaConf.is_interpolation(node, key)):
                continue
            value = node[key]
            if isinstance(value, (DictConfig, ListConfig)):
                walk(value)
            elif isinstance(value, str) and "://" in value:
                masked = stash(value)
                if masked != value:
                    node[key] = masked

    with flag_override(cfg, ["struct", "readonly"], [False, False]):
        walk(cfg)


def _masking_factory(previous: Callable[..., logging.LogRecord]) -> Callable[..., logging.LogRecord]:
    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it to logging's own error report
            return record
        if "://" in message:
            masked = mask(message)
            if masked != message:
                record.msg, record.args = masked, None
        return record

    factory.masks_credentials = True  # type: ignore[attr-defined]
    return factory


def mask_logs() -> None:
    """Mask URL passwords in every log record of this process, whoever logs it."""
    current = logging.getLogRecordFactory()
    if not getattr(current, "masks_credentials", False):
        logging.setLogRecordFactory(_masking_factory(current))


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - Hydra is a dependency
    Callback = object  # type: ignore[assignment,misc]


class MaskCredentials(Callback):  # type: ignore[misc,valid-type]
    """Hydra callback: before a run or a sweep writes anything, move the config's passwords into
    the environment and mask them (`.hydra/*.yaml`, `multirun.yaml`, the trials' overrides, MLflow
    params and tags then hold `***`), and mask them in every log line."""

    def on_run_start(self, config, **kwargs: Any) -> None:
        mask_logs()
        mask_config(config)

    def on_multirun_start(self, config, **kwargs: Any) -> None:
        mask_logs()
        mask_config(config)

    def on_job_start(self, config, **kwargs: Any) -> None:  # a trial of a sweep, in its own process
        mask_logs()
        mask_config(config)
