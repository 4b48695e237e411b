"""Per-sequence log-probs of responses.

N sequences of T tokens (N = 2B: chosen rows then rejected rows), vocabulary V. For each
sequence the log-prob of its response is the sum over response tokens t of
log p(token_t | tokens_<t): the logits at position t - 1 scored against the label at t.
Prompt and padding positions never count.
"""

from __future__ import annotations

import inspect
from typing import Tuple

import torch
from transformers import PreTrainedModel

Tensor = torch.Tensor


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that count only real tokens, so left padding does not shift them. (N, T)"""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def token_logps(logits: Tensor, labels: Tensor, chunk_size: int = 4096) -> Tensor:
    """log_softmax(logits)[label] in float32, a chunk of rows at a time. (K, V), (K,) -> (K,)"""
    out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
    for start in range(0, labels.shape[0], chunk_size):
        rows = logits[start : start + chunk_size].float()  # (k, V)
        picked = rows.gather(-1, labels[start : start + chunk_size, None]).squeeze(-1)  # (k,)
        out[start : start + chunk_size] = picked - torch.logsumexp(rows, dim=-1)
    return out


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def sequence_logps(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor
) -> Tuple[Tensor, Tensor]:
    """Summed response log-probs and response token counts, each Shape: (N,).

    input_ids, attention_mask, loss_mask: (N, T); loss_mask is True on response tokens.
    Works with left or right padding.
    """
    target_mask = loss_mask[:, 1:]  # (N, T-1): label at t+1 is scored by logits at t
    # Logits are needed only from the first position that predicts a response token.
    first = int(target_mask.any(0).nonzero()[0]) if target_mask.any() else target_mask.shape[1]
    kwargs = {}
    if _accepts_logits_to_keep(model):
        kwargs["logits_to_keep"] = input_ids.shape[1] - first  # the last T - first positions
    else:
        first = 0
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
        **kwargs,
    ).logits  # (N, T - first, V) or (N, T, V)
    logits = logits[:, -(input_ids.shape[1] - first) :][:, :-1]  # (N, T-1-first, V): positions first..T-2
    mask = target_mask[:, first:]  # (N, T-1-first)
    labels = input_ids[:, first + 1 :][mask]  # (K,)
    picked = token_logps(logits[mask], labels)  # (K,)
    rows = mask.nonzero()[:, 0]  # (K,) sequence of each scored token
    logps = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    logps = logps.index_add(0, rows, picked)  # (N,)
    return logps, mask.sum(-1)
