"""The typed config schema: one dataclass per group or section, every default on its own line
with what it does. Hydra merges `conf/config.yaml` and the group files onto it (registered by
`config.register`), so an unknown key or a value of the wrong type fails at composition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


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
    # The built-in set's generator (dpo_sweep/tasks.py): 3 makes every rejected answer the
    # non-answer "not sure"; 1 and 2 are earlier sets (runs saved with them reproduce with them).
    builtin_version: int = 3


@dataclass
class OptimizerConfig:
    name: str = "adamw"
    lr: float = 2e-4
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
    # With resume: go on from a checkpoint written with other settings (the differences are logged);
    # false: such a resume is refused, naming each key that differs (old -> new).
    resume_override: bool = False
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
    rejected_share: float = 0.5
    seed: int = 0


@dataclass
class TrackingConfig:
    enabled: bool = True
    # MLflow tracking URI; null: $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/outputs/mlflow.db.
    uri: Optional[str] = None
    experiment: str = "dpo-sweep"
    run_name: Optional[str] = None
    # MLflow's system metrics (CPU, memory, disk, network, GPU) every `system_metrics_interval`
    # seconds, as `system/*` curves of the run.
    system_metrics: bool = False
    # A name: the best trial's model (logged by each trial with train.save_model=true) is registered
    # as a version of this registered model, with the alias `best`, at the end of a sweep.
    register_best: Optional[str] = None
    system_metrics_interval: float = 10.0
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
    # Packed trials (hydra.sweeper.pack): the numbers of the other trials of this sweep that this
    # process trains beside this one, over one frozen base model; their configs are in their folders.
    pack: Optional[List[int]] = None
    # Trials of the pack that go through the model together (hydra.sweeper.pack_forward); null:
    # all of them on a GPU, one at a time on a CPU.
    pack_forward: Optional[int] = None


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
