"""The SFT stage: fine-tune the starting model on the data set's responses with the plain
next-token loss (prompt tokens masked) before DPO. The result is both the DPO reference and the
policy's initial weights, as in the DPO paper's recipe (SFT, then preference training).

Its weights are cached in `outputs/cache/sft-<key>.safetensors`, keyed by the starting weights,
the tokenised train pairs and every SFT setting, so the trials of a sweep train it once and each
later trial loads it. `sft.rejected_share` makes that share of the rows teach the rejected answer
instead of the chosen one: a reference that is right only part of the time.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from typing import Callable, ContextManager, List, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from dpo_sweep import cache_files, distributed, paths
from dpo_sweep.batching import collate
from dpo_sweep.config import sft_enabled
from dpo_sweep.logprobs import sequence_logps
from dpo_sweep.pairs import Pair
from dpo_sweep.reference import fingerprint

log = logging.getLogger(__name__)


def targets(pairs: Sequence[Pair], rejected_share: float, seed: int) -> List[Pair]:
    """Each pair's SFT row: prompt + chosen, or prompt + rejected for a seeded `rejected_share`
    of them (as a Pair whose two answers are that one answer)."""
    rng = random.Random(seed)
    rows = []
    for p in pairs:
        answer = p.rejected_ids if rng.random() < rejected_share else p.chosen_ids
        rows.append(Pair(p.prompt_ids, answer, answer, p.row))
    return rows


def sft_loss(model, batch, n: int) -> torch.Tensor:
    """Mean over rows of the per-token negative log-likelihood of the answer tokens."""
    logps, counts = sequence_logps(model, batch["input_ids"][:n], batch["attention_mask"][:n], batch["loss_mask"][:n])
    return -(logps / counts[:n].clamp(min=1)).mean()


def train_sft(model, rows: Sequence[Pair], s: DictConfig, pad_id: int, device: torch.device,
              autocast: Callable[[], ContextManager]) -> float:
    """`s.steps` AdamW steps on random batches of `rows` (warmup over the first 10%); the last loss."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr)
    warmup = max(1, s.steps // 10)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    rng = random.Random(s.seed)
    model.train()
    loss = torch.tensor(float("nan"))
    for _ in range(s.steps):
        batch_rows = [rows[rng.randrange(len(rows))] for _ in range(s.batch_size)]
        batch = {k: v.to(device) for k, v in collate(batch_rows, pad_id).items()}
        with autocast():
            loss = sft_loss(model, batch, len(batch_rows))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
    model.zero_grad(set_to_none=True)  # DPO starts from the weights alone, as from the cache
    return float(loss.detach())


def cache_key(model, pairs: Sequence[Pair], s: DictConfig, settings: str) -> str:
    """sha256 of the starting weights and config, the train pairs, the SFT settings and `settings`."""
    h = hashlib.sha256()
    h.update(fingerprint(model, {"train": list(pairs)}, settings).encode())
    h.update(OmegaConf.to_yaml(s).encode())
    return h.hexdigest()[:32]


def apply_sft(model, pairs: Sequence[Pair], s: DictConfig, pad_id: int, device: torch.device,
              autocast: Callable[[], ContextManager], cache_dir: Optional[str], settings: str = "") -> bool:
    """Give `model` (on any device, moved to `device` for training) its SFT weights: from the
    cache, or trained here and cached. Returns whether the cache was hit."""
    path = os.path.join(cache_dir, f"sft-{cache_key(model, pairs, s, settings)}.safetensors") if cache_dir else None
    home = next(model.parameters()).device
    state = cache_files.load_tensors(path, "SFT weight", device=str(home)) if path else None
    if state is not None:
        model.load_state_dict(state)
        log.info("SFT weights from cache %s", path)
        return True
    model.to(device)
    loss = train_sft(model, targets(pairs, s.rejected_share, s.seed), s, pad_id, device, autocast)
    model.to(home)
    log.info("SFT: %d steps, final loss %.4f", s.steps, loss)
    if path:
        cache_files.save_tensors(path, model.state_dict())
        log.info("SFT weights cached at %s", path)
    return False


def sft_stage(cfg: DictConfig, run, cwd: Optional[str]):
    """The SFT stage as a step on the base model (`models.load_policy(prepare_base=...)`), or None
    when `sft.enabled` is off. `run` is the run's `setup.RunSetup`. Under torchrun rank 0 trains
    and caches it, the others then load it."""
    if not sft_enabled(cfg):
        return None

    def prepare_base(model) -> None:
        args = (run.data.train, cfg.sft, run.tokenizer.pad_token_id, run.device, run.autocast, paths.cache_dir(cwd),
                f"precision={run.precision}")
        if not distributed.is_main():
            distributed.barrier()
            apply_sft(model, *args)
            return
        apply_sft(model, *args)
        distributed.barrier()

    return prepare_base
