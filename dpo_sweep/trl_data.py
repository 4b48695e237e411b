"""Our tokenised pairs as TRL's DPOTrainer reads them: the train rows laid out in the order our
Trainer visits them (one row per visit), read in our micro-batches, and the eval rows in our eval
batch order (see dpo_sweep.trl_backend)."""

from __future__ import annotations

from typing import List, Sequence

from omegaconf import DictConfig

from dpo_sweep.pairs import Pair
from dpo_sweep.logprobs import PromptSharing
from dpo_sweep.steps import epoch_order, eval_batches, steps_per_epoch

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def total_steps(cfg: DictConfig, n_pairs: int) -> int:
    t = cfg.train
    return t.max_steps if t.max_steps > 0 else t.epochs * steps_per_epoch(n_pairs, t.batch_size, t.grad_accum)


def train_batches(pairs: Sequence[Pair], cfg: DictConfig, steps: int, sharing: PromptSharing) -> List[List[int]]:
    """Pair indices of each micro-batch our Trainer trains on over `steps` optimizer steps."""
    t = cfg.train
    per_epoch = steps_per_epoch(len(pairs), t.batch_size, t.grad_accum)
    batches: List[List[int]] = []
    epoch = 0
    while len(batches) < steps * t.grad_accum:
        batches += epoch_order(pairs, t, cfg.seed, epoch, per_epoch, sharing)
        epoch += 1
    return batches[: steps * t.grad_accum]


def consecutive(batches: Sequence[Sequence[int]]) -> List[List[int]]:
    """Row numbers of each batch once the batches are laid out one after another:
    [[7, 2], [5]] -> [[0, 1], [2]]."""
    out, start = [], 0
    for idx in batches:
        out.append(list(range(start, start + len(idx))))
        start += len(idx)
    return out


def eval_order(pairs: Sequence[Pair], t: DictConfig, sharing: PromptSharing) -> List[int]:
    """Pair indices in our eval batch order (Trainer.evaluate); `t` is the train config."""
    return [i for idx in eval_batches(pairs, t, sharing) for i in idx]


def to_dataset(pairs: Sequence[Pair], order: Sequence[int]):
    """A datasets.Dataset of tokenised pairs in `order`, one row per visit, with TRL's columns."""
    from datasets import Dataset

    return Dataset.from_dict({col: [list(getattr(pairs[i], col)) for i in order] for col in TOKEN_COLUMNS})
