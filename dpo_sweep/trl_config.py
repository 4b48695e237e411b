"""Our config as TRL's DPOTrainer takes it: the settings TRL 1.16 cannot honour (`check_config`,
an error naming the key, before anything loads), the TRL import checked against the versions this
backend is written for (`import_trl`), and TRL's DPOConfig for a run (`dpo_args`). TRL itself is
imported only when `trainer=trl`: `pip install 'dpo-sweep[trl]'`."""

from __future__ import annotations

from omegaconf import DictConfig

from dpo_sweep import distributed
from dpo_sweep.config import ConfigError
from dpo_sweep.setup import RunSetup

TRL_REQUIREMENT = "trl>=1.16,<2"
INSTALL_HINT = f"pip install 'dpo-sweep[trl]' (or pip install '{TRL_REQUIREMENT}')"
# Our lr_schedule -> transformers' lr_scheduler_type. Ours warms up linearly in every schedule,
# so "constant" is transformers' "constant_with_warmup" (its "constant" ignores warmup).
SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


def check_config(cfg: DictConfig) -> None:
    """Raise ConfigError naming the first key whose value TRL 1.16's DPOTrainer cannot honour.

    No TRL import, no model, no data (only torchrun's WORLD_SIZE is read); called before anything
    loads.
    """
    t, loss = cfg.train, cfg.loss
    if t.reference == "none":
        raise ConfigError("config key 'train.reference' = 'none': TRL 1.16's DPOTrainer has no reference-free "
                          "mode; use train.reference=copy or precomputed, or trainer=dpo_sweep")
    if loss.name == "sigmoid" and loss.label_smoothing > 0:
        raise ConfigError(f"config key 'loss.label_smoothing' = {loss.label_smoothing!r}: TRL 1.16 ignores label "
                          "smoothing in its sigmoid loss, so cDPO (loss=cdpo) cannot run there; use loss=robust, "
                          "or trainer=dpo_sweep")
    if loss.length_normalize != (loss.name == "ipo"):
        raise ConfigError(f"config key 'loss.length_normalize' = {loss.length_normalize!r}: TRL 1.16 "
                          f"length-normalises the ipo loss and no other, so loss.name={loss.name} needs "
                          f"loss.length_normalize={str(loss.name == 'ipo').lower()}; or use trainer=dpo_sweep")
    if t.lr_schedule not in SCHEDULES:
        raise ConfigError(f"config key 'train.lr_schedule' = {t.lr_schedule!r}: no transformers scheduler "
                          f"matches it; with trainer=trl expected one of {', '.join(SCHEDULES)}")
    if t.checkpoint_every > 0 or t.resume:
        key = "train.checkpoint_every" if t.checkpoint_every > 0 else "train.resume"
        raise ConfigError(f"config key '{key}' = {t[key.split('.')[1]]!r}: checkpoints and resume are "
                          "our Trainer's (trainer=dpo_sweep); the TRL backend runs start to end")
    if t.fsdp or distributed.launched_by_torchrun():
        key, value = ("train.fsdp", t.fsdp) if t.fsdp else ("trainer", "trl")
        raise ConfigError(f"config key '{key}' = {value!r}: the TRL backend runs in one process (its own "
                          "multi-process batching differs from ours); run it without torchrun, or use "
                          "trainer=dpo_sweep")
    if t.device.startswith("cuda:") and t.device != "cuda:0":
        raise ConfigError(f"config key 'train.device' = {t.device!r}: the transformers Trainer picks the GPU "
                          "itself; use train.device=cuda and CUDA_VISIBLE_DEVICES to choose one")


def import_trl():
    """The trl module, checked against the version range this backend is written for."""
    try:
        import trl
    except ImportError as e:
        raise ConfigError(f"config key 'trainer' = 'trl' needs the trl package ({TRL_REQUIREMENT}), which is not "
                          f"installed: {INSTALL_HINT}") from e
    from packaging.version import Version

    if not Version("1.16") <= Version(trl.__version__) < Version("2"):
        raise ConfigError(f"config key 'trainer' = 'trl' needs {TRL_REQUIREMENT}, found trl {trl.__version__}: "
                          f"{INSTALL_HINT}")
    return trl


def dpo_args(cfg: DictConfig, output_dir: str, run: RunSetup, steps: int, warmup: int):
    """TRL's DPOConfig for this run: our settings, fixed data order, logs every step, no saves."""
    import_trl()
    from trl import DPOConfig

    t = cfg.train
    return DPOConfig(
        output_dir=output_dir,
        max_steps=steps,  # our step count, whatever epochs says: the train rows already span them
        per_device_train_batch_size=t.batch_size,
        per_device_eval_batch_size=t.eval_batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=cfg.optimizer.lr,  # the optimizer is ours; this one is for TRL's own logs
        weight_decay=cfg.optimizer.weight_decay,
        lr_scheduler_type=SCHEDULES[t.lr_schedule],
        warmup_steps=warmup,
        max_grad_norm=max(0.0, t.max_grad_norm),  # 0: no clipping; the norm is still logged
        beta=cfg.beta,
        loss_type=[cfg.loss.name],
        label_smoothing=cfg.loss.label_smoothing,  # used by robust only
        max_length=t.max_length,  # our pairs already fit: TRL's truncation never cuts
        precompute_ref_log_probs=t.reference == "precomputed",
        train_sampling_strategy="sequential",  # unused with batch_rows: our batches, in our order
        seed=cfg.seed,
        bf16=run.precision == "bf16",  # autocast, as ours; TRL's default is on
        use_cpu=run.device.type == "cpu",
        disable_dropout=False,  # models.load_policy already did (LoRA dropout stays, as in ours)
        gradient_checkpointing=False,  # TRL's default is on; train.gradient_checkpointing is applied to
        # the policy by models.configure_training, as for our Trainer
        logging_steps=1,  # per-step metrics; log_every is applied when they reach MLflow
        eval_strategy="no",  # evals are triggered by MetricsBridge, as our Trainer schedules them
        save_strategy="no",
        report_to="none",  # MLflow goes through dpo_sweep.tracking, not transformers' integration
        disable_tqdm=not t.progress,
        dataloader_num_workers=0,
    )
