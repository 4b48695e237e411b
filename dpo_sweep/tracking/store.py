"""The MLflow store: its URI, the client that opens it (a fresh SQLite store under a lock), and
the retries that let parallel processes share one SQLite file."""

from __future__ import annotations

import functools
import logging
import os
import random
import time
from typing import Any, Callable, Optional, TypeVar


from dpo_sweep import credentials, paths

log = logging.getLogger(__name__)

MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
# SQLite takes one writer at a time: parallel trials sharing a store can find it locked (MLflow
# waits 20 s on a lock, then fails). Such a call is tried again, up to RETRIES times in all.
RETRIES = 6
RETRY_DELAY = 0.5  # seconds before the first retry; doubled before each next one (with jitter)
T = TypeVar("T")
TRANSIENT = ("database is locked", "database table is locked", "database is busy", "database schema has changed",
             "unable to open database file")


def default_uri(cwd: Optional[str] = None) -> str:
    return "sqlite:///" + paths.default_store(cwd)


def resolve_uri(uri: Optional[str], cwd: Optional[str] = None, create: bool = True) -> str:
    """The absolute store URI: `uri`, else $MLFLOW_TRACKING_URI, else outputs/mlflow.db; a
    relative SQLite path is taken from `cwd` (the folder the run started in). `create` makes the
    SQLite store's folder."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_uri(cwd)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path = uri[len("sqlite:///") :]
        uri = "sqlite:///" + os.path.abspath(os.path.join(cwd or os.getcwd(), path))
    if create and uri.startswith("sqlite:///"):
        os.makedirs(os.path.dirname(uri[len("sqlite:///") :]), exist_ok=True)
    return credentials.stash(uri)  # a password ($MLFLOW_TRACKING_URI's too) is kept out of every record


def is_transient(error: BaseException) -> bool:
    """Whether a store error goes away by itself: SQLite's "database is locked" (or busy), a schema
    changed under a prepared statement by another process, a file briefly not openable, as sqlite3,
    SQLAlchemy or MLflow (TEMPORARILY_UNAVAILABLE, the cause chained) raise them."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        text = str(error).lower()
        if any(s in text for s in TRANSIENT):
            return True
        error = error.__cause__ or error.__context__
    return False


def retrying(call: Callable[[], T], attempts: int = RETRIES, delay: float = RETRY_DELAY) -> T:
    """`call()`, tried again after a transient store error (`is_transient`) with a growing pause,
    `attempts` times in all; any other error, or the last one, is raised. A locked SQLite write
    is rolled back, so trying it again never writes twice."""
    attempt = 1
    while True:
        try:
            return call()
        except Exception as e:
            if attempt >= attempts or not is_transient(e):
                raise
            pause = delay * 2 ** (attempt - 1) * random.uniform(0.5, 1.5)  # jitter: writers do not retry in step
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            attempt += 1
            log.warning("MLflow store busy (%s); try %d of %d in %.1fs", reason, attempt, attempts, pause)
            time.sleep(pause)


_READY_STORES: set = set()  # SQLite stores this process has opened (and so initialised)


def _open_client(uri: str) -> Any:
    """An MlflowClient of `uri`. A SQLite store is opened for the first time under an exclusive
    lock on `<db>.init.lock`: MLflow creates the tables of a fresh store with migrations that two
    processes running at once break ("table ... already exists", "Online migration expected to
    match one row"). The first process migrates; the others wait for the lock and find the
    tables made."""
    from mlflow.tracking import MlflowClient

    def client() -> Any:
        return retrying(lambda: MlflowClient(tracking_uri=credentials.for_mlflow(uri)))

    if not uri.startswith("sqlite:///") or uri in _READY_STORES:
        return client()
    import fcntl

    db = uri[len("sqlite:///") :]
    os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
    with open(db + ".init.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            opened = client()
            retrying(lambda: opened.search_experiments(max_results=1))  # opens the store: migrates a fresh one
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _READY_STORES.add(uri)
    return opened


class RetryingClient:
    """An MlflowClient whose every call (and its creation, which opens the store) goes through
    `retrying`: parallel trials can share one SQLite store without losing a metric."""

    def __init__(self, uri: str):
        self.tracking_uri = uri
        self._client = _open_client(uri)

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args: Any, **kwargs: Any) -> Any:
            return retrying(lambda: attr(*args, **kwargs))

        return call
