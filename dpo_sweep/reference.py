"""Reference log-probs: from a live frozen model, precomputed once and cached on disk, or none.

A precomputed cache is keyed by a fingerprint of the reference weights, the tokenised pairs and
the settings that change log-probs (precision), so trials of a sweep that differ only in beta,
lr or loss share it, and a changed model or data set never reuses a stale one.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
from transformers import PreTrainedModel

from dpo_sweep import cache_files, distributed
from dpo_sweep.batching import batch_indices, collate, collate_shared
from dpo_sweep.pairs import Pair
from dpo_sweep.logprobs import batch_logps, shares_prompt

log = logging.getLogger(__name__)
Tensor = torch.Tensor
# (chosen_logps, rejected_logps, chosen_counts, rejected_counts), each (B,)
RefOutput = Tuple[Tensor, Tensor, Tensor, Tensor]


def _split(logps: Tensor, counts: Tensor) -> RefOutput:
    B = logps.shape[0] // 2
    return logps[:B], logps[B:], counts[:B], counts[B:]


class LiveReference:
    """Runs the frozen reference model on each batch."""

    def __init__(self, model: PreTrainedModel, autocast: Callable[[], ContextManager], head_only: bool = True):
        self.model = model
        self.autocast = autocast
        self.head_only = head_only  # False for an FSDP-sharded model

    @torch.no_grad()
    def logps(self, batch: Dict[str, Tensor], split: str, idx: Sequence[int]) -> RefOutput:
        with self.autocast():
            logps, counts = batch_logps(self.model, batch, self.head_only)
        return _split(logps, counts)


class AdapterOffReference(LiveReference):
    """LoRA: the reference is the policy itself with its adapters disabled (no second copy)."""

    @torch.no_grad()
    def logps(self, batch: Dict[str, Tensor], split: str, idx: Sequence[int]) -> RefOutput:
        with self.model.disable_adapter():
            return super().logps(batch, split, idx)


class NoReference:
    """Reference-free DPO: the reference log-probs are 0."""

    def logps(self, batch: Dict[str, Tensor], split: str, idx: Sequence[int]) -> RefOutput:
        counts = batch["counts"]  # (2B,)
        B = counts.shape[0] // 2
        zeros = torch.zeros(B, device=counts.device)
        return zeros, zeros, counts[:B], counts[B:]


class PrecomputedReference:
    """Log-probs of every pair of every split, computed once; looked up by pair index."""

    def __init__(self, tables: Dict[str, Tensor]):
        self.tables = tables  # split -> (n_pairs, 4): chosen, rejected, chosen_n, rejected_n

    def logps(self, batch: Dict[str, Tensor], split: str, idx: Sequence[int]) -> RefOutput:
        rows = self.tables[split][torch.as_tensor(list(idx))].to(batch["input_ids"].device)  # (B, 4)
        return rows[:, 0], rows[:, 1], rows[:, 2].long(), rows[:, 3].long()


def fingerprint(model: PreTrainedModel, splits: Dict[str, List[Pair]], settings: str) -> str:
    """sha256 of the model's weights and config, the token ids of every pair, and settings."""
    h = hashlib.sha256()
    h.update(settings.encode())
    h.update(model.config.to_json_string(use_diff=False).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        tensor = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor  # FSDP: gather it
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for split, pairs in sorted(splits.items()):
        h.update(split.encode())
        for p in pairs:
            h.update(repr((p.prompt_ids, p.chosen_ids, p.rejected_ids)).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def compute_tables(
    model: PreTrainedModel,
    splits: Dict[str, List[Pair]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], ContextManager],
) -> Dict[str, Tensor]:
    sharded = any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP: use the model's forward
    if hasattr(model, "peft_config"):
        live = AdapterOffReference(model, autocast)
    else:
        live = LiveReference(model, autocast, head_only=not sharded)
    shared = shares_prompt(model)  # the model takes one row per pair (run.build_trainer)
    tables = {}
    for split, pairs in splits.items():
        table = torch.zeros(len(pairs), 4)
        for idx in batch_indices(pairs, batch_size, shuffle=False, group_by_length=True, shared_prompt=shared):
            rows = [pairs[i] for i in idx]
            batch = {k: v.to(device) for k, v in (collate_shared if shared else collate)(rows, pad_id).items()}
            out = live.logps(batch, split, idx)
            table[torch.as_tensor(idx)] = torch.stack([t.float().cpu() for t in out], dim=-1)
        tables[split] = table
    return tables


def precomputed(
    model: PreTrainedModel,
    splits: Dict[str, List[Pair]],
    pad_id: int,
    batch_size: int,
    device: torch.device,
    autocast: Callable[[], ContextManager],
    cache_dir: Optional[str],
    settings: str,
    write: bool = True,
) -> Tuple[PrecomputedReference, bool]:
    """The reference's log-probs of all pairs, from the cache when present. Returns
    (reference, whether the cache was hit)."""
    path = None
    settings += f";shared_prompt={shares_prompt(model)}"  # the layouts agree to ~1e-6, not bit for bit
    if cache_dir:
        path = os.path.join(cache_dir, f"reflogps-{fingerprint(model, splits, settings)}.safetensors")
        tables = cache_files.load_tensors(path, "reference log-prob")
        if tables is not None and set(tables) == set(splits):
            log.info("reference log-probs from cache %s", path)
            return PrecomputedReference(tables), True
    was_training = model.training
    model.eval()
    tables = compute_tables(model, splits, pad_id, batch_size, device, autocast)
    distributed.reshard(model)
    model.train(was_training)
    if path and write:
        cache_files.save_tensors(path, tables)
        log.info("reference log-probs cached at %s", path)
    return PrecomputedReference(tables), False


def autocast_for(device: torch.device, precision: str) -> Callable[[], ContextManager]:
    """A factory of the autocast context for this device and precision."""
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext
