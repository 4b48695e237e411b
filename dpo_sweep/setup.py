"""What a run needs before any model loads, the same for both trainers (ours and TRL's):
the device, the precision and its autocast, the tokenizer, and the preference data, checked and
counted. Data errors therefore stop a run before a model is loaded."""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from omegaconf import DictConfig

from dpo_sweep import models, reference
from dpo_sweep.data import PreferenceData, load_preference_data

log = logging.getLogger(__name__)


def precision_for(device: torch.device, precision: str) -> str:
    """`train.precision` resolved: auto is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


@dataclass
class RunSetup:
    device: torch.device
    precision: str  # fp32 | bf16
    autocast: Callable[[], ContextManager]
    tokenizer: Any
    data: PreferenceData


def log_datasets(tracker, d: DictConfig, data) -> None:
    """The train and eval splits as the run's MLflow inputs, each with a digest of its pairs."""
    if d.get("path"):
        kind, location, name = "file", str(d.path), os.path.basename(str(d.path))
    elif d.name == "builtin":
        kind, location, name = "builtin", f"dpo_sweep.tasks version {d.builtin_version}", f"builtin-v{d.builtin_version}"
    else:
        kind, location, name = "hub", str(d.name), str(d.name)
    for context, pairs in (("train", data.train), ("eval", data.eval)):
        digest = hashlib.sha256(repr([(p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in pairs]).encode())
        tracker.log_dataset(f"{name} ({context})", kind, location, digest.hexdigest()[:8], context)


def log_data(tracker, d: DictConfig, data: PreferenceData) -> None:
    """The data counts as `data/*` params (they describe the run, they are not curves) and the
    splits as the run's inputs."""
    tracker.log_params({"data/train_pairs": len(data.train), "data/eval_pairs": len(data.eval),
                        "data/skipped_rows": data.skipped, "data/dropped_identical": data.dropped_identical,
                        "data/lost_eos": data.lost_eos})
    log_datasets(tracker, d, data)


# glibc's malloc returns a freed block of more than its mmap threshold to the system at once, so
# every large activation of the next step is mapped again, page by page: on some machines that
# costs more than the arithmetic. Large blocks are kept for reuse instead (the peak is unchanged).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_KEEP = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, (1 << 31) - 1), (_M_TOP_PAD, 256 << 20))


def keep_freed_memory() -> bool:
    """On Linux with glibc, keep freed CPU memory for the process's next allocations (training
    on a CPU allocates and frees the same large activations every step); whether it applied."""
    import ctypes
    import ctypes.util
    import sys

    name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc) and all(libc.mallopt(option, value) == 1 for option, value in _KEEP)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False


def prepare_run(cfg: DictConfig, tracker=None, device: Optional[torch.device] = None) -> RunSetup:
    """Device (`device`, else `train.device` resolved), precision, tokenizer and data; the data
    counts go to the log and, as `data/*`, to the tracker."""
    if cfg.eval.gen.enabled and cfg.judge.name == "reward_model":  # before any model loads
        from dpo_sweep.judges.reward_model import check_reward_model

        check_reward_model(cfg.judge.name_or_path)
    device = device or models.resolve_device(cfg.train.device)
    if device.type == "cpu":
        keep_freed_memory()
    precision = precision_for(device, cfg.train.precision)
    tokenizer = models.load_tokenizer(cfg.model)
    data = load_preference_data(cfg.dataset, tokenizer, cfg.train.max_length, cfg.train.max_prompt_length)
    log.info("data: %d train pairs, %d eval pairs, %d rows skipped, %d pairs dropped (chosen and rejected "
             "identical after truncation), %d responses lost their EOS to truncation (train.max_length = %d)",
             len(data.train), len(data.eval), data.skipped, data.dropped_identical, data.lost_eos,
             cfg.train.max_length)
    if tracker:
        log_data(tracker, cfg.dataset, data)
    return RunSetup(device, precision, reference.autocast_for(device, precision), tokenizer, data)
