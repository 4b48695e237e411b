"""The typed config schema, registered in Hydra's ConfigStore, and its validation.

Hydra merges `conf/config.yaml` and the group files onto these dataclasses, so an unknown key or
a value of the wrong type fails at composition, naming the key. `validate` then checks ranges and
cross-field rules before any model or data set is loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

SCHEMA_NAME = "dpo_sweep_schema"  # not "config": a saved .hydra/config.yaml must be rerunnable


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names the key."""


@dataclass
class LoraConfig:
    enabled: bool = False  # train LoRA adapters (PEFT) instead of every weight
    r: int = 16  # adapter rank; higher: more capacity, more memory
    alpha: int = 32  # scaling alpha / r
    dropout: float = 0.0  # DPO compares two models: dropout noise biases the rewards
    target_modules: Any = "all-linear"  # "all-linear" or a list of module names
    merge: bool = False  # save the model with adapters merged into the weights (else the adapter alone)


@dataclass
class ModelConfig:
    # Hugging Face hub name or local folder; null builds a random model from `config` instead.
    name_or_path: Optional[str] = None
    # Tokenizer name or folder; null: name_or_path's, or with no name_or_path the built-in "char".
    tokenizer: Optional[str] = None
    # Architecture of a model built from scratch (model_type plus its config keys); used only
    # when name_or_path is null.
    config: Dict[str, Any] = field(default_factory=dict)
    # Weight dtype when loading: auto (float32 on CPU, as saved on CUDA), float32, bfloat16.
    dtype: str = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    # Attention kernel passed to transformers (sdpa, eager, flash_attention_2); null: its default.
    attn_implementation: Optional[str] = None
    # LoRA: the reference is the same weights with the adapters off, so no second copy is held.
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DatasetConfig:
    # "builtin" (generated here), or a Hugging Face hub name loaded with `datasets`.
    name: str = "builtin"
    # Local .jsonl/.json/.parquet/.csv file; when set it replaces `name`.
    path: Optional[str] = None
    # Local eval file; when null the eval split comes from `eval_split` or `eval_size`.
    eval_path: Optional[str] = None
    train_split: str = "train"
    # Split holding eval rows; null carves `eval_size` rows (fraction if < 1) out of train.
    eval_split: Optional[str] = None
    eval_size: float = 0.1
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None
    # What to do with a malformed row: error (stop, naming the row) or skip (count and log it).
    on_bad_row: str = "error"
    # Size of the built-in set (train + eval pairs).
    builtin_size: int = 600


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8


@dataclass
class LossConfig:
    # sigmoid (DPO; cDPO with label_smoothing > 0), ipo, hinge, robust.
    name: str = "sigmoid"
    # Probability that a preference label is flipped (cDPO, robust); 0 <= x < 0.5.
    label_smoothing: float = 0.0
    # Average log-probs over response tokens instead of summing (IPO's definition).
    length_normalize: bool = False


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int = -1  # optimizer steps; > 0 overrides epochs
    batch_size: int = 8  # pairs per micro-batch (each pair is two sequences)
    eval_batch_size: int = 16
    grad_accum: int = 1  # micro-batches per optimizer step
    max_length: int = 512  # prompt + response tokens
    max_prompt_length: int = 256  # prompts are cut from the left to this
    max_grad_norm: float = 1.0  # <= 0 disables clipping
    lr_schedule: str = "linear"  # linear | cosine | constant
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # used when warmup_steps == 0
    eval_every: int = 0  # optimizer steps between evals; 0: only at the end
    log_every: int = 1  # optimizer steps between logged train metrics
    shuffle: bool = True
    group_by_length: bool = True  # batch similar lengths together: less padding
    # One row per pair (prompt + chosen + rejected): the prompt is computed once, not twice.
    # Used where the model can take it (logprobs.prompt_sharing_blocker); else two rows a pair.
    share_prompt: bool = True
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    reference: str = "precomputed"  # precomputed (cached on disk) | copy (a frozen live copy) | none
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory
    compile: bool = False  # torch.compile the decoder
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state over the GPUs
    checkpoint_every: int = 0  # optimizer steps between checkpoints in <run>/checkpoint/; 0: none
    resume: bool = False  # continue from the run folder's checkpoint, if there is one
    save_model: bool = False  # write the trained model + tokenizer (HF format) to the run folder
    progress: bool = True  # tqdm progress bar


@dataclass
class TrackingConfig:
    enabled: bool = True
    # MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db.
    uri: Optional[str] = None
    experiment: str = "dpo-sweep"
    run_name: Optional[str] = None
    # Set by the sweeper: this run is a child of that run.
    parent_run_id: Optional[str] = None
    tags: Dict[str, str] = field(default_factory=dict)


@dataclass
class ObjectiveConfig:
    # Final metric returned to the sweeper; the default does not change scale with beta.
    # A list of metrics ([eval/rewards/accuracies, eval/logps/chosen]) makes a multi-objective
    # sweep: the run returns a tuple, and `direction` is then a list of the same length.
    metric: Any = "eval/rewards/accuracies"
    direction: Any = "maximize"  # maximize | minimize (a list for several metrics)


@dataclass
class SweepTrialConfig:
    """Set by the sweeper on each trial (null in a single run): where the trial reports its
    intermediate objective so that the study's pruner can stop it."""

    storage: Optional[str] = None  # Optuna storage: journal file path or database URL
    study_name: Optional[str] = None
    trial_number: Optional[int] = None


@dataclass
class DPOSweepConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    sweep: SweepTrialConfig = field(default_factory=SweepTrialConfig)
    beta: float = 0.1  # KL strength: higher keeps the policy closer to the reference
    seed: int = 0
    # Which training loop runs the config: dpo_sweep (ours) or trl (TRL's DPOTrainer, for
    # cross-checks; needs the trl extra, see dpo_sweep/trl_backend.py).
    trainer: str = "dpo_sweep"


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=DPOSweepConfig)


LOSS_NAMES = ("sigmoid", "ipo", "hinge", "robust")
DIRECTIONS = ("maximize", "minimize")
CHOICES = {
    "trainer": ("dpo_sweep", "trl"),
    "dataset.on_bad_row": ("error", "skip"),
    "optimizer.name": ("adamw",),
    "loss.name": LOSS_NAMES,
    "train.lr_schedule": ("linear", "cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16"),
    "train.reference": ("copy", "precomputed", "none"),
    "model.dtype": ("auto", "float32", "bfloat16", "float16"),
}


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def validate(cfg: DictConfig) -> None:
    """Check ranges and cross-field rules; raise ConfigError naming the first bad key."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' = {_get(cfg, key)!r}: expected {expected}")

    for key, allowed in CHOICES.items():
        need(_get(cfg, key) in allowed, key, "one of " + ", ".join(allowed))
    _check_loss_and_optimizer(cfg, need)
    _check_train(cfg, need)
    _check_dataset(cfg.dataset, need)
    _check_model(cfg.model, need)
    objective_spec(cfg)


Need = Callable[[bool, str, str], None]  # (holds, key, what was expected)


def _check_loss_and_optimizer(cfg: DictConfig, need: Need) -> None:
    need(cfg.beta > 0, "beta", "a number > 0")
    need(0 <= cfg.loss.label_smoothing < 0.5, "loss.label_smoothing", "0 <= value < 0.5")
    o = cfg.optimizer
    need(o.lr >= 0, "optimizer.lr", "a number >= 0")
    need(o.weight_decay >= 0, "optimizer.weight_decay", "a number >= 0")
    need(o.eps > 0, "optimizer.eps", "a number > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", "two numbers in [0, 1)")


def _check_train(cfg: DictConfig, need: Need) -> None:
    t = cfg.train
    for key in ("batch_size", "eval_batch_size", "grad_accum", "log_every", "epochs"):
        need(t[key] >= 1, f"train.{key}", "an integer >= 1")
    need(t.max_steps == -1 or t.max_steps >= 1, "train.max_steps", "-1 (use epochs) or >= 1")
    need(t.max_length >= 2, "train.max_length", "an integer >= 2")
    need(1 <= t.max_prompt_length < t.max_length, "train.max_prompt_length",
         f"1 <= value < train.max_length ({t.max_length})")
    need(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "0 <= value < 1")
    need(t.eval_every >= 0, "train.eval_every", "an integer >= 0 (0: only at the end)")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "an integer >= 0 (0: no checkpoints)")
    if t.fsdp:
        need(t.checkpoint_every == 0 and not t.resume, "train.checkpoint_every",
             "0 with train.fsdp=true (sharded checkpoints are not written; use DDP to checkpoint)")
        need(not cfg.model.lora.enabled, "model.lora.enabled", "false with train.fsdp=true")


def _check_dataset(d: DictConfig, need: Need) -> None:
    need(d.eval_size >= 0, "dataset.eval_size", "a number >= 0 (fraction if < 1, else rows)")
    need(d.builtin_size >= 10, "dataset.builtin_size", "an integer >= 10")
    for key in ("max_train_samples", "max_eval_samples"):
        need(d[key] is None or d[key] >= 1, f"dataset.{key}", "null or an integer >= 1")


def _check_model(m: DictConfig, need: Need) -> None:
    need(m.name_or_path is not None or bool(m.config), "model.name_or_path",
         "a hub name or local folder (or set model.config to build a model from scratch)")
    if m.lora.enabled:
        need(m.lora.r >= 1, "model.lora.r", "an integer >= 1")
        need(m.lora.alpha > 0, "model.lora.alpha", "a number > 0")
        need(0 <= m.lora.dropout < 1, "model.lora.dropout", "0 <= value < 1")
    if m.name_or_path is None:
        need("model_type" in m.config, "model.config", "a mapping with a 'model_type' key")


def objective_spec(cfg: DictConfig) -> List[Tuple[str, str]]:
    """The objective as (metric, direction) pairs: one pair, or several for a multi-objective
    sweep. Raise ConfigError naming `objective.metric` or `objective.direction`."""
    metric, direction = cfg.objective.metric, cfg.objective.direction
    several = OmegaConf.is_list(metric)
    metrics = list(metric) if several else [metric]
    directions = list(direction) if OmegaConf.is_list(direction) else [direction]
    if not metrics or not all(isinstance(m, str) and m for m in metrics):
        raise ConfigError(f"config key 'objective.metric' = {metric!r}: expected a metric name such as "
                          "eval/rewards/accuracies, or a list of metric names")
    if len(directions) != len(metrics) or OmegaConf.is_list(direction) != several:
        raise ConfigError(f"config key 'objective.direction' = {direction!r}: expected "
                          + (f"a list of {len(metrics)} directions, one per metric" if several
                             else "one of " + ", ".join(DIRECTIONS)))
    for d in directions:
        if d not in DIRECTIONS:
            raise ConfigError(f"config key 'objective.direction' = {direction!r}: expected "
                              + ("each one of " if several else "one of ") + ", ".join(DIRECTIONS))
    return list(zip(metrics, directions))
