"""Every folder and file name of runs, sweeps and caches, and where the Hydra configs live.

A run folder (`outputs/runs/<time>/`, or `<sweep folder>/<trial number>/` in a sweep) holds:

    .hydra/             the composed config, the overrides, Hydra's config
    metrics.json        final metrics and the objective (METRICS_FILE)
    checkpoint/         checkpoint.pt while the run trains (train.checkpoint_every)
    model/              the trained model (train.save_model)

A sweep folder holds `multirun.yaml`, `optuna.journal` (the default study storage),
`optimization_results.yaml` and one run folder per trial, named by its trial number.
"""

import os
from typing import Optional

_HERE = os.path.dirname(os.path.abspath(__file__))

OUTPUTS = "outputs"  # under the folder a run starts in: the store, the caches, the default run folders
METRICS_FILE = "metrics.json"
HYDRA_DIR = ".hydra"
OVERRIDES_FILE = "overrides.yaml"
CHECKPOINT_DIR = "checkpoint"
CHECKPOINT_FILE = "checkpoint.pt"
MODEL_DIR = "model"
MULTIRUN_FILE = "multirun.yaml"
JOURNAL_FILE = "optuna.journal"  # the default study storage
RESULTS_FILE = "optimization_results.yaml"
SWEEPER_LOCK = "sweeper.lock"  # held by the one sweeper process driving a sweep folder
SEARCH_SPACE_FILE = "search_space.yaml"
STORE_FILE = "mlflow.db"


def conf_dir() -> str:
    """`dpo_sweep/conf` in an installed wheel, `conf/` in a checkout."""
    packaged = os.path.join(_HERE, "conf")
    return packaged if os.path.isdir(packaged) else os.path.join(os.path.dirname(_HERE), "conf")


def outputs_dir(cwd: Optional[str] = None) -> str:
    return os.path.join(cwd or os.getcwd(), OUTPUTS)


def cache_dir(cwd: Optional[str] = None) -> str:
    """Reference log-probs (and other caches shared by the runs started from `cwd`)."""
    return os.path.join(outputs_dir(cwd), "cache")


def reproduce_dir(stamp: str, cwd: Optional[str] = None) -> str:
    """Where `python -m dpo_sweep.reproduce` reruns a run by default (relative to `cwd` if given)."""
    return os.path.join(cwd, OUTPUTS, "reproduce", stamp) if cwd else os.path.join(OUTPUTS, "reproduce", stamp)


def default_store(cwd: Optional[str] = None) -> str:
    """The MLflow SQLite file used when no tracking URI is set."""
    return os.path.abspath(os.path.join(outputs_dir(cwd), STORE_FILE))


def metrics_file(run_dir: str) -> str:
    return os.path.join(run_dir, METRICS_FILE)


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINT_DIR)


def checkpoint_file(run_dir: str) -> str:
    return os.path.join(checkpoint_dir(run_dir), CHECKPOINT_FILE)


def model_dir(run_dir: str) -> str:
    return os.path.join(run_dir, MODEL_DIR)


def hydra_dir(run_dir: str) -> str:
    return os.path.join(run_dir, HYDRA_DIR)


def overrides_file(run_dir: str) -> str:
    return os.path.join(hydra_dir(run_dir), OVERRIDES_FILE)


def trial_dir(sweep_dir: str, number: int) -> str:
    """A trial's run folder: named by its trial number, so a resumed sweep never reuses one."""
    return os.path.join(sweep_dir, str(number))


def journal_file(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, JOURNAL_FILE)


def multirun_file(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, MULTIRUN_FILE)


def results_file(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, RESULTS_FILE)


def shown(path: str, cwd: Optional[str] = None) -> str:
    """`path` as a person reads it: relative to `cwd` (default: the working directory) when it
    lies under it, so reports and messages hold no machine's absolute path; else unchanged. A
    `sqlite:///` URI keeps its scheme."""
    prefix = "sqlite:///"
    if path.startswith(prefix):
        return prefix + shown(path[len(prefix):], cwd)
    if not os.path.isabs(path):
        return path
    base = os.path.abspath(cwd or os.getcwd())
    try:
        inside = os.path.commonpath([base, os.path.abspath(path)]) == base
    except ValueError:  # another drive
        return path
    return os.path.relpath(path, base) if inside else path
