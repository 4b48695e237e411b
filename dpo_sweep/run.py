"""One training run from a composed config: `run_trial(cfg) -> objective`.

Order matters for fast failure: the config is validated, then data is loaded and checked, and
only then is a model loaded.
"""

from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from dpo_sweep import models, reference, tracking
from dpo_sweep.config import ConfigError, validate
from dpo_sweep.data import load_preference_data
from dpo_sweep.trainer import EvalCallback, Trainer

log = logging.getLogger(__name__)
METRICS_FILE = "metrics.json"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def hydra_dirs() -> tuple[Optional[str], Optional[str]]:
    """(output dir, original cwd) of the running Hydra job, or (None, None) outside Hydra."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None, None
    hc = HydraConfig.get()
    return hc.runtime.output_dir, hc.runtime.cwd


def precision_for(device: torch.device, precision: str) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def cache_dir(cwd: Optional[str]) -> str:
    return os.path.join(cwd or os.getcwd(), "outputs", "cache")


def build_reference(cfg: DictConfig, policy, data, pad_id: int, device, autocast, cwd: Optional[str]):
    mode = cfg.train.reference
    if mode == "none":
        return reference.NoReference()
    if mode == "copy":
        return reference.LiveReference(models.make_reference(policy), autocast)
    settings = f"precision={precision_for(device, cfg.train.precision)}"
    ref, hit = reference.precomputed(
        policy, {"train": data.train, "eval": data.eval}, pad_id, cfg.train.eval_batch_size,
        device, autocast, cache_dir(cwd), settings,
    )
    return ref


def run_trial(cfg: DictConfig, out_dir: Optional[str] = None, on_eval: Sequence[EvalCallback] = ()) -> float:
    """Train once as `cfg` says; write metrics.json (and the model) to the run folder, log to
    MLflow; return the objective."""
    validate(cfg)
    hydra_out, cwd = hydra_dirs()
    out_dir = out_dir or hydra_out or os.getcwd()
    os.makedirs(out_dir, exist_ok=True)
    seed_everything(cfg.seed)
    tracker = tracking.start_run(cfg, run_name=os.path.basename(out_dir), cwd=cwd)
    status = "FAILED"
    try:
        if tracker:
            tracker.log_params(tracking.flatten(cfg))
            tracker.set_tags({"run_dir": os.path.abspath(out_dir)})
        metrics = _train(cfg, out_dir, cwd, tracker, on_eval)
        objective = metrics.get(cfg.objective.metric)
        if objective is None:
            raise ConfigError(
                f"config key 'objective.metric' = {cfg.objective.metric!r}: not a metric of this run; "
                f"expected one of {', '.join(sorted(metrics))}"
            )
        result = {"objective": objective, "objective_metric": cfg.objective.metric, "metrics": metrics}
        with open(os.path.join(out_dir, METRICS_FILE), "w") as f:
            json.dump(result, f, indent=2)
        if tracker:
            tracker.log_artifact(os.path.join(out_dir, METRICS_FILE))
            tracker.log_artifact(os.path.join(out_dir, ".hydra"), "hydra")
            tracker.log_metrics({"objective": objective}, step=0)
        status = "FINISHED"
        return objective
    finally:
        if tracker:
            tracker.end(status)


def build_trainer(cfg: DictConfig, cwd: Optional[str] = None, tracker=None, on_eval=()) -> Tuple[Trainer, Any]:
    """Tokenizer, data (checked before any model loads), policy, reference, and the Trainer."""
    device = models.resolve_device(cfg.train.device)
    autocast = reference.autocast_for(device, precision_for(device, cfg.train.precision))
    tokenizer = models.load_tokenizer(cfg.model)
    data = load_preference_data(cfg.dataset, tokenizer, cfg.train.max_length, cfg.train.max_prompt_length)
    log.info("data: %d train pairs, %d eval pairs, %d rows skipped", len(data.train), len(data.eval), data.skipped)
    if tracker:
        tracker.log_metrics({"data/train_pairs": len(data.train), "data/eval_pairs": len(data.eval),
                             "data/skipped_rows": data.skipped}, step=0)
    policy = models.load_policy(cfg.model, tokenizer, cfg.seed).to(device)
    ref = build_reference(cfg, policy, data, tokenizer.pad_token_id, device, autocast, cwd)
    trainer = Trainer(
        cfg, policy, ref, data.train, data.eval, tokenizer.pad_token_id, device, autocast,
        log_metrics=tracker.log_metrics if tracker else (lambda m, s: None), on_eval=on_eval,
    )
    return trainer, tokenizer


def _train(cfg: DictConfig, out_dir: str, cwd: Optional[str], tracker, on_eval) -> Dict[str, float]:
    trainer, tokenizer = build_trainer(cfg, cwd, tracker, on_eval)
    metrics = trainer.fit()
    if cfg.train.save_model:
        path = os.path.join(out_dir, "model")
        trainer.policy.save_pretrained(path)
        tokenizer.save_pretrained(path)
        log.info("model saved to %s", path)
    return metrics


