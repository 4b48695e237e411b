"""`python -m dpo_sweep.reproduce <run folder | MLflow run id>`: rerun a finished run.

The run is rebuilt from the composed config it saved (`<run>/.hydra/config.yaml`, or the `hydra/`
artifacts of its MLflow run), not from today's `conf/`, and trains again into a new folder (and a
new MLflow run tagged `reproduce_of`). The original and the new final metrics are printed side by
side; on CPU, with the same code, they are identical.

    python -m dpo_sweep.reproduce outputs/sweeps/beta-lr/3
    python -m dpo_sweep.reproduce 0123456789abcdef0123456789abcdef --tracking-uri sqlite:////abs/mlflow.db
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from dpo_sweep import credentials, paths, tracking
from dpo_sweep.config import ConfigError
from dpo_sweep.schema import DPOSweepConfig, SweepTrialConfig

RUN_ID = re.compile(r"[0-9a-f]{32}")
SAVED_FILES = ("config.yaml", "overrides.yaml", "hydra.yaml")  # what a run keeps in .hydra/
REPRODUCE_FILE = "reproduce.yaml"  # in a reproduced run's .hydra/: the command, the source run
# Settings added since a run may have been saved, with the value that matches how such a run
# trained: a saved config without the key reruns with this value, not today's default.
BEFORE_THEY_EXISTED = {"train.share_prompt": False, "eval.gen.enabled": False, "sft.enabled": False,
                       "dataset.builtin_version": 1, "judge.name": "none"}


@dataclass
class Original:
    """A finished run to reproduce: its saved .hydra files and its final metrics."""

    label: str  # the folder or "MLflow run <id>"
    hydra_dir: str  # holds config.yaml (and overrides.yaml, hydra.yaml when saved)
    metrics: Dict[str, float]
    objective: object


def from_folder(folder: str) -> Original:
    hydra_dir = paths.hydra_dir(folder)
    if not os.path.isfile(os.path.join(hydra_dir, "config.yaml")):
        raise FileNotFoundError(f"{folder} is not a run folder: it has no .hydra/config.yaml")
    return Original(os.path.abspath(folder), hydra_dir, *_read_metrics(paths.metrics_file(folder)))


def from_run_id(run_id: str, uri: str, scratch: str) -> Original:
    """Download the run's saved config and metrics.json from MLflow into `scratch`."""
    run = tracking.get_run(uri, run_id)
    if run is None:
        raise LookupError(f"no MLflow run {run_id} in {uri}; pass the store with --tracking-uri")
    hydra_dir = tracking.download_artifacts(uri, run_id, "hydra", scratch)
    metrics_file = tracking.download_artifacts(uri, run_id, paths.METRICS_FILE, scratch)
    if not os.path.isfile(os.path.join(hydra_dir, "config.yaml")):
        raise FileNotFoundError(f"MLflow run {run_id} has no hydra/config.yaml artifact: it did not finish")
    return Original(f"MLflow run {run_id} ({run.name})", hydra_dir, *_read_metrics(metrics_file))


def _read_metrics(path: str):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: the run did not finish, there is nothing to compare")
    with open(path) as f:
        saved = json.load(f)
    return saved["metrics"], saved["objective"]


def rerun_config(saved: DictConfig, label: str) -> DictConfig:
    """The saved config on today's schema, detached from its sweep: no study to report to, no
    parent run, a tag naming the original."""
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(DPOSweepConfig), saved)
    except OmegaConfBaseException as e:
        raise ConfigError(f"the saved config of {label} does not fit today's schema: {e}") from e
    absent = object()
    for key, value in BEFORE_THEY_EXISTED.items():
        if OmegaConf.select(saved, key, default=absent) is absent:  # missing, not merely null
            OmegaConf.update(cfg, key, value)
    cfg.sweep = OmegaConf.structured(SweepTrialConfig)
    cfg.tracking.parent_run_id = None
    cfg.tracking.run_name = None
    cfg.tracking.tags = {**cfg.tracking.tags, "reproduce_of": label}
    return cfg


def prepare_folder(out_dir: str, original: Original, cfg: DictConfig, command: str) -> None:
    """The new run folder with its .hydra/: the config it runs; `overrides.yaml` with no override
    (none applied: the whole config is the saved one), headed by the command and the source run;
    `reproduce.yaml` with both, and the source's own overrides for reference."""
    hydra_dir = paths.hydra_dir(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        raise FileExistsError(f"{out_dir} is not empty: reproduce writes into a new folder")
    os.makedirs(hydra_dir)
    OmegaConf.save(cfg, os.path.join(hydra_dir, "config.yaml"))
    with open(os.path.join(hydra_dir, paths.OVERRIDES_FILE), "w") as f:
        f.write(f"# {command}\n# reproduces {original.label}: its saved config.yaml, with no override\n[]\n")
    source = os.path.join(original.hydra_dir, paths.OVERRIDES_FILE)
    record = {"command": command, "source": original.label,
              "source_overrides": OmegaConf.to_container(OmegaConf.load(source)) if os.path.isfile(source) else None}
    with open(os.path.join(hydra_dir, REPRODUCE_FILE), "w") as f:
        yaml.safe_dump(record, f, sort_keys=False)


def compare(original: Dict[str, float], new: Dict[str, float]) -> List[str]:
    """Lines of a side-by-side table of final metrics, and a closing verdict."""
    keys = sorted(set(original) | set(new))
    width = max(len(k) for k in keys + ["metric"])
    lines = [f"{'metric'.ljust(width)}  {'original':>14}  {'reproduced':>14}", "-" * (width + 34)]
    differ = 0
    for key in keys:
        a, b = original.get(key), new.get(key)
        same = a == b
        differ += not same
        cells = [f"{v:>14.8g}" if isinstance(v, (int, float)) else f"{'-':>14}" for v in (a, b)]
        lines.append(f"{key.ljust(width)}  {cells[0]}  {cells[1]}  {'' if same else 'differs'}".rstrip())
    lines.append(f"all {len(keys)} metrics identical" if not differ else f"{differ} of {len(keys)} metrics differ")
    return lines


def default_out_dir() -> str:
    return paths.reproduce_dir(time.strftime("%Y-%m-%d_%H-%M-%S"))


def reproduce(source: str, out_dir: Optional[str] = None, tracking_uri: Optional[str] = None,
              command: Optional[str] = None) -> Dict[str, object]:
    """Rerun `source` (a run folder or an MLflow run id) into `out_dir`; return both results."""
    from dpo_sweep.run import run_trial  # torch and transformers load here

    with tempfile.TemporaryDirectory() as scratch:
        if os.path.isdir(source):
            original = from_folder(source)
        elif RUN_ID.fullmatch(source):
            original = from_run_id(source, tracking.resolve_uri(tracking_uri), scratch)
        else:
            raise FileNotFoundError(f"{source!r} is neither a run folder nor an MLflow run id (32 hex digits)")
        cfg = rerun_config(OmegaConf.load(os.path.join(original.hydra_dir, "config.yaml")), original.label)
        if cfg.tracking.uri is None and tracking_uri:  # log beside the original, not in the cwd's store
            cfg.tracking.uri = tracking_uri
        out_dir = os.path.abspath(out_dir or default_out_dir())
        command = command or " ".join(["python -m dpo_sweep.reproduce", shlex.quote(source)]
                                      + (["--tracking-uri", shlex.quote(tracking_uri)] if tracking_uri else []))
        prepare_folder(out_dir, original, cfg, credentials.mask(command))
    print(f"reproducing {original.label} into {out_dir}", flush=True)
    run_trial(cfg, out_dir=out_dir)
    with open(paths.metrics_file(out_dir)) as f:
        new = json.load(f)
    print("\n".join(compare({"objective": original.objective, **original.metrics},
                            {"objective": new["objective"], **new["metrics"]})), flush=True)
    return {"original": original.metrics, "new": new["metrics"], "out_dir": out_dir}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dpo_sweep.reproduce", description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="a run folder (with .hydra/config.yaml) or an MLflow run id")
    parser.add_argument("--out", help="the new run folder (default: outputs/reproduce/<time>)")
    parser.add_argument("--tracking-uri", help="MLflow store holding the run id (default: $MLFLOW_TRACKING_URI, "
                                               "else sqlite:///<cwd>/outputs/mlflow.db)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    try:
        argv_shown = argv if argv is not None else sys.argv[1:]
        reproduce(args.source, args.out, args.tracking_uri,
                  command=" ".join(["python -m dpo_sweep.reproduce", *map(shlex.quote, argv_shown)]))
    except (FileNotFoundError, FileExistsError, LookupError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
