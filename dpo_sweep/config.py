"""The config: the typed schema (`schema.py`) registered in Hydra's ConfigStore, and its validation.

Hydra merges `conf/config.yaml` and the group files onto the schema's dataclasses, so an unknown
key or a value of the wrong type fails at composition, naming the key. `validate` then checks
ranges and cross-field rules before any model or data set is loaded; the `auto` settings (judge,
SFT stage, objective metric) are resolved here.
"""

from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Tuple

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dpo_sweep.schema import DatasetConfig, DPOSweepConfig  # noqa: F401 (DatasetConfig: importable from here)

SCHEMA_NAME = "dpo_sweep_schema"  # not "config": a saved .hydra/config.yaml must be rerunnable


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names the key."""


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
    "dataset.builtin_version": (1, 2, 3),
}


# The metrics a run returns at its end (`Trainer.fit`, and the TRL backend under the same names):
# the per-pair metrics of losses.reward_metrics and the loss, prefixed train/ and eval/; the
# optimizer's state at the last step; the generation eval's (gen_eval.py) when it runs, its
# reward metrics only when a judge gives rewards.
PAIR_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")
STEP_METRICS = ("train/grad_norm", "train/lr", "train/epoch")
GEN_METRICS = ("eval/gen/kl", "eval/gen/length")
JUDGED_METRICS = ("eval/gen/reward", "eval/gen/win_rate", "eval/gen/ref_reward")
NO_LABEL_SMOOTHING = ("ipo", "hinge")  # losses with no label_smoothing term (losses.py)


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
    _check_objective_metrics(cfg)


Need = Callable[[bool, str, str], None]  # (holds, key, what was expected)


def finite(value: Any) -> bool:
    """A real number other than inf, -inf and nan (every range check below starts with this)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_loss_and_optimizer(cfg: DictConfig, need: Need) -> None:
    need(finite(cfg.beta) and cfg.beta > 0, "beta", "a finite number > 0")
    smoothing = cfg.loss.label_smoothing
    need(0 <= smoothing < 0.5, "loss.label_smoothing", "0 <= value < 0.5")
    need(smoothing == 0 or cfg.loss.name not in NO_LABEL_SMOOTHING, "loss.label_smoothing",
         f"0 with loss.name={cfg.loss.name} (the {' and '.join(NO_LABEL_SMOOTHING)} losses have no label smoothing; "
         "loss=cdpo or loss=robust use it)")
    o = cfg.optimizer
    need(finite(o.lr) and o.lr > 0, "optimizer.lr", "a finite number > 0")
    need(finite(o.weight_decay) and o.weight_decay >= 0, "optimizer.weight_decay", "a finite number >= 0")
    need(finite(o.eps) and o.eps > 0, "optimizer.eps", "a finite number > 0")
    need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optimizer.betas", "two numbers in [0, 1)")


def _check_train(cfg: DictConfig, need: Need) -> None:
    t = cfg.train
    for key in ("batch_size", "eval_batch_size", "grad_accum", "log_every", "epochs"):
        need(t[key] >= 1, f"train.{key}", "an integer >= 1")
    need(t.max_steps == -1 or t.max_steps >= 1, "train.max_steps", "-1 (use epochs) or >= 1")
    need(t.max_length >= 2, "train.max_length", "an integer >= 2")
    need(1 <= t.max_prompt_length < t.max_length, "train.max_prompt_length",
         f"1 <= value < train.max_length ({t.max_length})")
    need(finite(t.max_grad_norm), "train.max_grad_norm", "a finite number (<= 0: no clipping)")
    need(t.warmup_steps >= 0, "train.warmup_steps", "an integer >= 0")
    need(0 <= t.warmup_ratio < 1, "train.warmup_ratio", "0 <= value < 1")
    steps = max_total_steps(cfg)
    need(steps is None or t.warmup_steps <= steps, "train.warmup_steps",
         f"at most the run's optimizer steps ({steps}: train.max_steps, or train.epochs times the steps of an epoch)")
    need(t.eval_every >= 0, "train.eval_every", "an integer >= 0 (0: only at the end)")
    need(t.checkpoint_every >= 0, "train.checkpoint_every", "an integer >= 0 (0: no checkpoints)")
    if t.fsdp:
        need(t.checkpoint_every == 0 and not t.resume, "train.checkpoint_every",
             "0 with train.fsdp=true (sharded checkpoints are not written; use DDP to checkpoint)")
        need(not cfg.model.lora.enabled, "model.lora.enabled", "false with train.fsdp=true")


def max_total_steps(cfg: DictConfig) -> Optional[int]:
    """The run's optimizer steps as far as the config tells them before any data loads: exactly
    `train.max_steps` when set; else an upper bound from the train pairs the data can give (the
    built-in set's size less its eval rows, or `dataset.max_train_samples`; rows dropped later
    only lower it), as `steps.steps_per_epoch` counts them; None when only the data can tell."""
    t, d = cfg.train, cfg.dataset
    if t.max_steps > 0:
        return t.max_steps
    bounds = [d.max_train_samples] if d.max_train_samples else []
    if uses_builtin_data(cfg) and finite(d.eval_size) and d.eval_size >= 0:
        n_eval = 0 if d.eval_path else int(d.eval_size if d.eval_size >= 1 else round(d.eval_size * d.builtin_size))
        bounds.append(max(0, d.builtin_size - n_eval))
    if not bounds or t.batch_size < 1 or t.grad_accum < 1:
        return None
    micro_batches = -(-min(bounds) // t.batch_size)  # a last short batch counts
    return t.epochs * max(1, micro_batches // t.grad_accum)


def _check_dataset(d: DictConfig, need: Need) -> None:
    need(finite(d.eval_size) and d.eval_size >= 0, "dataset.eval_size", "a number >= 0 (fraction if < 1, else rows)")
    need(d.builtin_size >= 10, "dataset.builtin_size", "an integer >= 10")
    for key in ("max_train_samples", "max_eval_samples"):
        need(d[key] is None or d[key] >= 1, f"dataset.{key}", "null or an integer >= 1")
    if d.name == "builtin" and not d.path and not d.eval_path and d.eval_size >= 1:
        need(d.eval_size < d.builtin_size, "dataset.eval_size",
             f"fewer eval rows than the built-in set's dataset.builtin_size ({d.builtin_size})")


def _check_eval_and_sft(cfg: DictConfig, need: Need) -> None:
    g = cfg.eval.gen
    for key in ("prompts", "samples", "max_new_tokens", "batch_size"):
        need(g[key] >= 1, f"eval.gen.{key}", "an integer >= 1")
    need(finite(g.temperature) and g.temperature >= 0, "eval.gen.temperature", "a number >= 0 (0: greedy)")
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
    need(finite(s.lr) and s.lr > 0, "sft.lr", "a finite number > 0")
    need(0 <= s.rejected_share <= 1, "sft.rejected_share", "0 <= value <= 1")


def run_metrics(cfg: DictConfig) -> List[str]:
    """The final metrics this run returns, sorted: what `objective.metric` can name."""
    names = [f"{split}/{m}" for split in ("train", "eval") for m in PAIR_METRICS] + list(STEP_METRICS)
    if generates(cfg):
        names += GEN_METRICS
        if judge_name(cfg) != "none":
            names += JUDGED_METRICS
    return sorted(names)


def _check_objective_metrics(cfg: DictConfig) -> None:
    """Every objective metric is one the run returns (a typo fails now, not after training)."""
    known = run_metrics(cfg)
    metric = cfg.objective.metric
    for name, _ in objective_spec(cfg):
        if name not in known:
            value = f"{list(metric)!r}: {name!r} is" if OmegaConf.is_list(metric) else f"{name!r}:"
            raise ConfigError(f"config key 'objective.metric' = {value} not a metric this run logs; "
                              f"expected one of {', '.join(known)}")


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
