"""What a run says to the person who started it, at its end: where its results are and how to
look at them, or after Ctrl-C what was saved and the command that goes on from there."""

from __future__ import annotations

import os
import shlex
import sys
from typing import Any, Dict, List

from omegaconf import DictConfig

from dpo_sweep import paths
from dpo_sweep.config import objective_spec

INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports Ctrl-C


def command_line(set_keys: Dict[str, str]) -> str:
    """This process's command line as `python -m dpo_sweep ...`, with the overrides `set_keys`
    replacing any of the same keys: the command that continues what this one started."""
    kept = [a for a in sys.argv[1:] if a.split("=", 1)[0].lstrip("+~") not in set_keys]
    return shlex.join(["python", "-m", "dpo_sweep", *kept, *(f"{k}={v}" for k, v in set_keys.items())])


def interrupted_message(cfg: DictConfig, out_dir: str) -> str:
    """After Ctrl-C: what the run left on disk and the command that goes on from there."""

    folder = paths.shown(os.path.abspath(out_dir))
    saved = paths.checkpoint_file(out_dir)
    if cfg.trainer == "dpo_sweep" and os.path.exists(saved):
        what = f"the run folder {folder} with its checkpoint {paths.shown(os.path.abspath(saved))}"
    else:
        what = f"the run folder {folder} (no checkpoint: train.checkpoint_every=0; a resume starts at step 0)"
    command = command_line({"train.resume": "true", "hydra.run.dir": folder})
    return f"interrupted: saved {what}; resume with: {command}"


def run_summary(cfg: DictConfig, record: Dict[str, Any]) -> str:
    """Final eval metrics (the objective and eval/gen/*), the run folder, the MLflow run and how
    to open it."""
    metrics = record.get("metrics", {})
    wanted = [m for m, _ in objective_spec(cfg)]
    wanted += sorted(k for k in metrics if k.startswith("eval/gen/") and k not in wanted)
    shown = ", ".join(f"{k}={metrics[k]:.4g}" + (" (objective)" if i < len(objective_spec(cfg)) else "")
                      for i, k in enumerate(wanted) if k in metrics)
    lines = [f"final eval: {shown}", f"run folder: {paths.shown(os.path.abspath(record['out_dir']))}"]
    if record.get("run_id"):
        lines += [f"MLflow run: {record['run_id']}"]
        lines += mlflow_ui_lines(record["uri"], record["experiment_id"], record["run_id"])
    else:
        lines += ["MLflow: off (tracking.enabled=false)"]
    return "\n".join(lines)


def mlflow_ui_lines(uri: str, experiment_id: str, run_id: str) -> List[str]:
    """How to look at run `run_id` in MLflow's UI: the command that serves the store `uri` (none
    for a tracking server) and the run's URL. `workflowType=machine_learning`: MLflow 3's UI
    otherwise opens on its GenAI overview."""
    from dpo_sweep.credentials import mask

    page = f"#/experiments/{experiment_id}/runs/{run_id}?workflowType=machine_learning"
    if uri.startswith(("http://", "https://")):
        return [f"open: {mask(uri).rstrip('/')}/{page}"]
    store = paths.shown(uri) if uri.startswith("sqlite:///") else mask(uri)
    return [f"open: mlflow ui --backend-store-uri {store}", f"  then http://127.0.0.1:5000/{page}"]
