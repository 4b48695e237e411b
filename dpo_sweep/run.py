"""One training run from a composed config: `run_trial(cfg) -> objective`.

Order matters for fast failure: the config is validated, then data is loaded and checked, and
only then is a model loaded.
"""

from __future__ import annotations

import logging
import os
import random
import sys
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

from dpo_sweep import cache_files, checkpoint, console, distributed, models, names, paths, reference, tracking
from dpo_sweep.config import ConfigError, validate
from dpo_sweep.gen_eval import build_gen_eval
from dpo_sweep.logprobs import apply_prompt_sharing, decide_prompt_sharing
from dpo_sweep.outcome import Objective, objective_values, record_results, write_results  # noqa: F401 (importable here)
from dpo_sweep.pairs import DataError
from dpo_sweep.setup import RunSetup, prepare_run
from dpo_sweep.sft import sft_stage
from dpo_sweep.trainer import EvalCallback, Trainer, TrialStopped

log = logging.getLogger(__name__)


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


def build_reference(cfg: DictConfig, policy, run: RunSetup, cwd: Optional[str]):
    mode = cfg.train.reference
    if mode == "none":
        return reference.NoReference()
    if mode == "copy" and models.is_lora(policy):
        return reference.AdapterOffReference(policy, run.autocast)
    if mode == "copy":
        return reference.LiveReference(models.make_reference(policy), run.autocast)
    args = (policy, {"train": run.data.train, "eval": run.data.eval}, run.tokenizer.pad_token_id,
            cfg.train.eval_batch_size, run.device, run.autocast, paths.cache_dir(cwd), f"precision={run.precision}")
    if cfg.train.fsdp:  # the sharded model needs every rank in each forward: all compute it
        return reference.precomputed(*args, write=distributed.is_main())[0]
    if not distributed.is_main():  # rank 0 computes the cache, the other ranks then read it
        distributed.barrier()
        return reference.precomputed(*args)[0]
    ref = reference.precomputed(*args)[0]
    distributed.barrier()
    return ref


def shard_with_reference(cfg: DictConfig, policy, run: RunSetup, cwd: Optional[str]):
    """FSDP: shard the policy over the ranks (in place) and build its reference: a sharded
    frozen copy, or log-probs precomputed by the sharded policy."""
    if distributed.world_size() < 2:
        raise ConfigError("config key 'train.fsdp' = True: expected a run under torchrun with >= 2 processes")
    ref_model = models.make_reference(policy) if cfg.train.reference == "copy" else None
    distributed.shard_model(policy, run.device)
    if ref_model is None:
        return build_reference(cfg, policy, run, cwd)
    distributed.shard_model(ref_model, run.device)
    return reference.LiveReference(ref_model, run.autocast, head_only=False)


def run_trial(cfg: DictConfig, out_dir: Optional[str] = None, on_eval: Sequence[EvalCallback] = (),
              record: Optional[Dict[str, Any]] = None) -> Objective:
    """Train once as `cfg` says; write metrics.json (and the model) to the run folder, then log to
    MLflow; return the objective (a tuple when `objective.metric` is a list). `record`, when
    given, receives where the results went: `out_dir`, `metrics`, and the MLflow `uri`,
    `experiment_id` and `run_id` once the run exists."""
    validate(cfg)
    hydra_out, cwd = hydra_dirs()
    out_dir = out_dir or hydra_out or os.getcwd()
    os.makedirs(out_dir, exist_ok=True)
    seed_everything(cfg.seed)
    if distributed.launched_by_torchrun():
        distributed.init(cfg.train.device)
    main = distributed.is_main()  # under torchrun only rank 0 logs and writes files
    if main and cfg.tracking.enabled:  # a run of this folder whose process was killed ends KILLED
        tracking.end_dead_runs(tracking.resolve_uri(cfg.tracking.uri, cwd), cfg.tracking.experiment, out_dir)
    tracker = tracking.start_run(cfg, run_name=os.path.basename(out_dir), cwd=cwd) if main else None
    record = {} if record is None else record
    record["out_dir"] = out_dir
    if tracker:
        record.update(uri=tracker.uri, experiment_id=tracker.experiment_id, run_id=tracker.run_id)
    status, pruned = "FAILED", False
    try:
        if tracker:
            tracker.set_tags({names.RUN_DIR: os.path.abspath(out_dir), names.RUN_OWNER: tracking.process_owner()})
            tracker.log_params(tracking.flatten(cfg))
        written = len(cache_files.WRITTEN)
        metrics, step, files = _train(cfg, out_dir, cwd, tracker, on_eval)
        built = sorted({cache_files.kind(p) for p in cache_files.WRITTEN[written:]})  # in this run's duration
        record["metrics"] = metrics
        objective = record_results(cfg, out_dir, tracker, metrics, step, files, built, write=main)
        status = "FINISHED"
        distributed.barrier()  # torchrun: no rank leaves while rank 0 still writes
        return objective
    except (TrialStopped, KeyboardInterrupt) as e:  # stopped on purpose: pruned, or Ctrl-C
        status, pruned = "KILLED", isinstance(e, TrialStopped)
        raise
    finally:
        if tracker:
            tracker.end(status)
        if pruned:  # every rank stops at the same step (sweep.trial_reporter); none may exit, and
            distributed.barrier()  # have torchrun end the others, while rank 0 still ends its run
        distributed.close()


# ---------------------------------------------------------------------------- the command line

# Errors that say what to change (a config value, a data row, a file): one line, no traceback.
USER_ERRORS = (ConfigError, DataError, FileNotFoundError, checkpoint.CheckpointError)


def run_from_cli(cfg: DictConfig) -> Objective:
    """`python -m dpo_sweep` without -m: run_trial, then a summary of where the results went.
    A config, data or missing-file error ends it with one `error: ...` line on stderr (exit 2);
    Ctrl-C with one line naming what was saved and the command that resumes (exit 130)."""
    from dpo_sweep.console import INTERRUPTED_STATUS
    from dpo_sweep.preflight import exit_with

    record: Dict[str, Any] = {}
    try:
        objective = run_trial(cfg, record=record)
    except USER_ERRORS as e:
        exit_with(e)
    except KeyboardInterrupt:
        out_dir = record.get("out_dir") or hydra_dirs()[0] or os.getcwd()
        print(console.interrupted_message(cfg, out_dir), file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_STATUS) from None
    if distributed.is_main():
        print(console.run_summary(cfg, record), flush=True)
    return objective


def sweep_callbacks(cfg: DictConfig, total_steps: int) -> List[EvalCallback]:
    """When this run is a trial of a sweep (`sweep.trial_number` set by the sweeper): the callback
    that reports each eval's objective to the study and stops the run if the pruner says so."""
    if OmegaConf.select(cfg, "sweep.trial_number") is None:
        return []
    from dpo_sweep.trial_report import trial_reporter  # imports optuna: only in sweep trials

    return [trial_reporter(cfg, total_steps)]


def build_trainer(cfg: DictConfig, cwd: Optional[str] = None, tracker=None, on_eval=()) -> Tuple[Trainer, Any]:
    """Tokenizer, data (checked before any model loads), policy, reference, and the Trainer."""
    device = distributed.init(cfg.train.device) if distributed.launched_by_torchrun() else None
    run = prepare_run(cfg, tracker, device)
    policy = models.load_policy(cfg.model, run.tokenizer, cfg.seed, sft_stage(cfg, run, cwd)).to(run.device)
    t = cfg.train
    sharing = decide_prompt_sharing(policy, t.share_prompt, t.max_length, t.fsdp)
    apply_prompt_sharing(policy, sharing)  # before the reference: its copy or pass shares it too
    if sharing.requested and not sharing.layout:
        log.info("train.share_prompt: two rows a pair instead, because %s (batches are still grouped by the "
                 "one-row length; train.share_prompt=false groups them by the two-row length)", sharing.reason)
    if t.fsdp:
        ref = shard_with_reference(cfg, policy, run, cwd)
    else:
        ref = build_reference(cfg, policy, run, cwd)
    live = ref.model if isinstance(ref, reference.LiveReference) and not models.is_lora(policy) else None
    gen_eval = build_gen_eval(cfg, policy, run, cwd, live)  # before training: a copy of the policy as it starts
    models.configure_training(policy, t.gradient_checkpointing, t.compile)
    trainer = Trainer(
        cfg, policy, ref, run.data.train, run.data.eval, run.tokenizer.pad_token_id, run.device, run.autocast,
        sharing, log_metrics=tracker.log_metrics if tracker else (lambda m, s: None), on_eval=on_eval,
        gen_eval=gen_eval,
    )
    return trainer, run.tokenizer


def _resume(cfg: DictConfig, trainer: Trainer, out_dir: str, tracker) -> None:
    """Checkpoints go to <run>/checkpoint/; with train.resume, continue from the one there."""
    trainer.checkpoint_dir = paths.checkpoint_dir(out_dir)

    def load(path: str) -> List[Dict[str, float]]:
        trainer.load_checkpoint(path, verified=True)
        return trainer.history

    resume_from_folder(cfg, out_dir, tracker, load)


def resume_from_folder(cfg: DictConfig, out_dir: str, tracker, load: Callable[[str], List[Dict[str, float]]]) -> None:
    """With train.resume, continue from the checkpoint in `out_dir` (`load(path)` restores it and
    returns the history), once verified and found to be of the same settings (or
    train.resume_override). A checkpoint that does not match its manifest (truncated, damaged) is
    an error naming it: the run stops rather than start again from step 0 in the folder of the run
    it was asked to continue."""
    path = paths.checkpoint_file(out_dir)
    if not cfg.train.resume:
        return
    if not os.path.exists(path):
        log.info("train.resume: no checkpoint at %s, starting from step 0", path)
        return
    try:
        record = checkpoint.verify(path)
        check_resume_settings(cfg, path, checkpoint.saved_settings(record))
        history = load(path)
    except checkpoint.CheckpointError as e:  # truncated or damaged: an error, not a silent fresh start
        raise checkpoint.CheckpointError(f"train.resume: {e}; remove {paths.checkpoint_dir(out_dir)} to start "
                                         f"from step 0") from e
    if tracker:  # this MLflow run gets the whole curve, the steps before the checkpoint included
        for step, metrics in enumerate(history, start=1):
            if step % cfg.train.log_every == 0:
                tracker.log_metrics(metrics, step)


def check_resume_settings(cfg: DictConfig, path: str, saved: Optional[Dict[str, str]]) -> None:
    """Refuse to resume from the checkpoint `path`, written with the settings `saved`, when they
    differ from `cfg` (keys that may differ: checkpoint.RESUME_FREE_KEYS and _PREFIXES), unless
    train.resume_override; then the differences are logged."""
    if saved is None:
        log.warning("train.resume: checkpoint %s records no settings (an earlier version wrote it): "
                    "not checked against this run's", path)
        return
    diff = checkpoint.settings_diff(saved, checkpoint.resume_settings(tracking.flatten(cfg)))
    if not diff:
        return
    if not cfg.train.resume_override:
        raise ConfigError(f"config key 'train.resume' = True: checkpoint {path} was written with other settings "
                          f"({'; '.join(diff)}); rerun with its settings, or add train.resume_override=true")
    log.warning("train.resume_override: resuming from %s with other settings: %s", path, "; ".join(diff))


def _train(cfg: DictConfig, out_dir: str, cwd: Optional[str], tracker, on_eval) -> Tuple[Dict[str, float], int, List[str]]:
    """Train; return the final metrics, the final optimizer step and the files to log with the
    results (written here; logged once the results are on disk)."""
    if cfg.trainer == "trl":  # TRL's DPOTrainer on the same config (a cross-check backend)
        from dpo_sweep import trl_backend

        trainer, tokenizer = trl_backend.build_trainer(cfg, out_dir, tracker, on_eval)
    else:
        trainer, tokenizer = build_trainer(cfg, cwd, tracker, on_eval)
    gen_eval = getattr(trainer, "gen_eval", None)
    if gen_eval is not None and tracker:  # each eval's samples, as a table in the MLflow UI
        trainer.on_eval.insert(0, lambda step, _: tracker.log_table(gen_eval.last_rows, f"samples/step_{step:06d}.json"))
    trainer.on_eval.extend(sweep_callbacks(cfg, trainer.total_steps))
    if isinstance(trainer, Trainer):
        _resume(cfg, trainer, out_dir, tracker)
    metrics = trainer.fit()
    step = int(getattr(trainer, "step", trainer.total_steps))
    files = []
    if gen_eval is not None and distributed.is_main():
        files.append(gen_eval.write_samples(out_dir))
    state_dict = None
    if cfg.train.fsdp and cfg.train.save_model:  # gathered by every rank, saved by rank 0
        state_dict = distributed.full_state_dict(trainer.policy)
    if not distributed.is_main():
        return metrics, step, files
    if cfg.train.save_model:
        path = paths.model_dir(out_dir)
        models.save_model(trainer.policy, tokenizer, path, merge=cfg.model.lora.merge, state_dict=state_dict)
        log.info("model saved to %s", path)
    return metrics, step, files
