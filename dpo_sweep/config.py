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
    # The built-in set's generator (dpo_sweep/tasks.py): 2 makes every rejected answer a
    # systematic mistake; 1 is the first set (runs saved with it reproduce with it).
    builtin_version: int = 2


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
class GenConfig:
    # Sample answers to held-out prompts at every eval and judge them (dpo_sweep/gen_eval.py).
    enabled: bool = True
    prompts: int = 32  # the first N prompts of the eval split
    samples: int = 1  # answers per prompt
    max_new_tokens: int = 32
    temperature: float = 1.0  # 1: the KL estimate is unbiased; 0: greedy
    seed: int = 0  # the same seed gives the same samples
    batch_size: int = 32  # prompts generated together; higher: more memory


@dataclass
class EvalConfig:
    gen: GenConfig = field(default_factory=GenConfig)


@dataclass
class JudgeConfig:
    # auto (builtin for the built-in set, else none) | builtin (the built-in tasks' rule) |
    # reward_model (name_or_path) | none (no reward: KL and length only)
    name: str = "auto"
    # reward_model: a hub name or local folder of an AutoModelForSequenceClassification.
    name_or_path: Optional[str] = None
    batch_size: int = 16
    max_length: int = 1024


@dataclass
class SFTConfig:
    # Fine-tune the starting model on the data set's responses (next-token loss) before DPO; the
    # result is both the reference and the policy's initial weights, cached in outputs/cache/.
    # null: on for the built-in set (a random tiny model must learn its tasks first), else off.
    enabled: Optional[bool] = None
    steps: int = 1500
    batch_size: int = 16  # rows per step
    lr: float = 1e-3  # AdamW, constant after 10% warmup
    # Share of rows whose SFT target is the rejected answer instead of the chosen one: a reference
    # that is right only part of the time leaves DPO room to improve it.
    rejected_share: float = 0.15
    seed: int = 0


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
    # auto: eval/gen/reward when a judge scores the generated answers, else eval/rewards/accuracies.
    metric: Any = "auto"
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
    eval: EvalConfig = field(default_factory=EvalConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
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
    "judge.name": ("auto", "builtin", "reward_model", "none"),
    "dataset.builtin_version": (1, 2),
}


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=True)


def validate(cfg: DictConfig) -> None:
    """Check ranges and cross-field rules; raise ConfigError naming the first bad key."""

    def need(ok: bool, key: str, expected: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' = {_get(cfg, key)!r}: expected {expected}")

    for key, allowed in CHOICES.items():
        need(_get(cfg, key) in allowed, key, "one of " + ", ".join(map(str, allowed)))
    _check_loss_and_optimizer(cfg, need)
    _check_train(cfg, need)
    _check_dataset(cfg.dataset, need)
    _check_model(cfg.model, need)
    _check_eval_and_sft(cfg, need)
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


def _check_eval_and_sft(cfg: DictConfig, need: Need) -> None:
    g = cfg.eval.gen
    for key in ("prompts", "samples", "max_new_tokens", "batch_size"):
        need(g[key] >= 1, f"eval.gen.{key}", "an integer >= 1")
    need(g.temperature >= 0, "eval.gen.temperature", "a number >= 0 (0: greedy)")
    if g.enabled and cfg.judge.name == "reward_model":
        need(bool(cfg.judge.name_or_path), "judge.name_or_path", "a reward model (hub name or local folder)")
    rewarded = generates(cfg) and judge_name(cfg) != "none"
    for metric, _ in objective_spec(cfg):
        if metric.startswith("eval/gen/"):
            need(generates(cfg), "objective.metric",
                 f"a metric this run logs: {metric} needs eval.gen.enabled=true (and no train.fsdp)")
        if metric in ("eval/gen/reward", "eval/gen/win_rate", "eval/gen/ref_reward"):
            need(rewarded, "objective.metric", f"a metric this run logs: {metric} needs a judge "
                 "(judge=builtin on the built-in set, judge=reward_model elsewhere); or eval/gen/kl, "
                 "eval/rewards/accuracies")
    s = cfg.sft
    need(s.steps >= 1, "sft.steps", "an integer >= 1")
    need(s.batch_size >= 1, "sft.batch_size", "an integer >= 1")
    need(s.lr > 0, "sft.lr", "a number > 0")
    need(0 <= s.rejected_share <= 1, "sft.rejected_share", "0 <= value <= 1")


def generates(cfg: DictConfig) -> bool:
    """Whether the run's evals sample and judge answers (not under FSDP: see gen_eval.build_gen_eval)."""
    return bool(cfg.eval.gen.enabled) and not cfg.train.fsdp


def uses_builtin_data(cfg: DictConfig) -> bool:
    return cfg.dataset.name == "builtin" and not cfg.dataset.path


def judge_name(cfg: DictConfig) -> str:
    """`judge.name` resolved: auto is builtin on the built-in set, else none."""
    if cfg.judge.name == "auto":
        return "builtin" if uses_builtin_data(cfg) else "none"
    return cfg.judge.name


def sft_enabled(cfg: DictConfig) -> bool:
    """`sft.enabled` resolved: null is on for the built-in set, else off."""
    return uses_builtin_data(cfg) if cfg.sft.enabled is None else bool(cfg.sft.enabled)


def _check_model(m: DictConfig, need: Need) -> None:
    need(m.name_or_path is not None or bool(m.config), "model.name_or_path",
         "a hub name or local folder (or set model.config to build a model from scratch)")
    if m.lora.enabled:
        need(m.lora.r >= 1, "model.lora.r", "an integer >= 1")
        need(m.lora.alpha > 0, "model.lora.alpha", "a number > 0")
        need(0 <= m.lora.dropout < 1, "model.lora.dropout", "0 <= value < 1")
    if m.name_or_path is None:
        need("model_type" in m.config, "model.config", "a mapping with a 'model_type' key")


def auto_metric(cfg: DictConfig) -> str:
    """`objective.metric=auto`: what the policy generates, judged (eval/gen/reward), when a judge
    scores this run's answers; else the pairwise eval/rewards/accuracies."""
    judged = generates(cfg) and judge_name(cfg) != "none"
    return "eval/gen/reward" if judged else "eval/rewards/accuracies"


def objective_spec(cfg: DictConfig) -> List[Tuple[str, str]]:
    """The objective as (metric, direction) pairs: one pair, or several for a multi-objective
    sweep. Raise ConfigError naming `objective.metric` or `objective.direction`."""
    metric, direction = cfg.objective.metric, cfg.objective.direction
    several = OmegaConf.is_list(metric)
    metrics = list(metric) if several else [auto_metric(cfg) if metric == "auto" else metric]
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
