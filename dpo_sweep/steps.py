"""How a run steps through its data: optimizer steps per epoch, the micro-batches of each epoch
and the eval batches (the same for every backend and number of processes), and the learning-rate
factor at each step."""

from __future__ import annotations

import math
from typing import List, Sequence

import torch
from omegaconf import DictConfig

from dpo_sweep.batching import batch_indices
from dpo_sweep.pairs import Pair
from dpo_sweep.logprobs import PromptSharing


def steps_per_epoch(n_pairs: int, batch_size: int, grad_accum: int, world: int = 1) -> int:
    """Optimizer steps in one epoch: a last incomplete step is dropped, and (with several
    processes) a last batch too small to give every rank a pair."""
    full, rest = divmod(n_pairs, batch_size)
    micro_batches = full + (1 if rest >= world else 0)
    return max(1, micro_batches // grad_accum)


def epoch_order(pairs: Sequence[Pair], t: DictConfig, seed: int, epoch: int, n_steps: int,
                sharing: PromptSharing) -> List[List[int]]:
    """The micro-batches of one epoch, in order: a pure function of the config, (seed, epoch) and
    the data (not of the model or the number of processes), so a resumed run, another backend or
    another number of GPUs sees the same batches. `t` is the train config. Lengths are grouped
    by the layout train.share_prompt asks for (`sharing.requested`)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = batch_indices(pairs, t.batch_size, t.shuffle, t.group_by_length, generator, sharing.requested)
    return order[: n_steps * t.grad_accum]


def eval_batches(pairs: Sequence[Pair], t: DictConfig, sharing: PromptSharing) -> List[List[int]]:
    """The eval batches, in order (length-grouped as `epoch_order`, never shuffled)."""
    return batch_indices(pairs, t.eval_batch_size, shuffle=False, group_by_length=True,
                         shared_prompt=sharing.requested)


def lr_factor(step: int, schedule: str, warmup: int, total: int) -> float:
    """Multiplier of the base lr at optimizer step `step` (0-based): linear warmup from 0, then
    constant, linear decay to 0, or cosine decay to 0 at `total`."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))  # cosine
