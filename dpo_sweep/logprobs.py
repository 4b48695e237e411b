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
from torch.utils.checkpoint import checkpoint
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


# Models whose logits are exactly lm_head(decoder(x).last_hidden_state): no softcapping, scaling
# or other post-processing. For these the head runs only on response positions, in chunks.
HEAD_ONLY_MODELS = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "olmo", "olmo2"})
HEAD_CHUNK_ELEMENTS = 2**24  # logits per chunk (64 MiB in float32): rows = this // V


def _chunk_logps(head: torch.nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """(k, H), (k,) -> (k,): log-probs of labels under head(hidden), in float32."""
    logits = head(hidden).float()  # (k, V)
    return logits.gather(-1, labels[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def head_logps(head: torch.nn.Module, hidden: Tensor, labels: Tensor) -> Tensor:
    """Log-probs of labels from hidden states (K, H) -> (K,), never holding more than one chunk of
    (rows, V) logits: in training each chunk is recomputed in backward instead of kept."""
    rows = max(1, HEAD_CHUNK_ELEMENTS // head.weight.shape[0])
    out = []
    for start in range(0, hidden.shape[0], rows):
        h, y = hidden[start : start + rows], labels[start : start + rows]
        if torch.is_grad_enabled() and (h.requires_grad or head.weight.requires_grad):
            out.append(checkpoint(_chunk_logps, head, h, y, use_reentrant=False))
        else:
            out.append(_chunk_logps(head, h, y))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


def _uses_head_only(model: PreTrainedModel) -> bool:
    return (
        getattr(model.config, "model_type", None) in HEAD_ONLY_MODELS
        and hasattr(model, "get_decoder")
        and isinstance(model.get_output_embeddings(), torch.nn.Linear)
    )


def _accepts_logits_to_keep(model: PreTrainedModel) -> bool:
    return "logits_to_keep" in inspect.signature(model.forward).parameters


def _is_right_padded(attention_mask: Tensor) -> bool:
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def sequence_logps(
    model: PreTrainedModel, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, head_only: bool = True
) -> Tuple[Tensor, Tensor]:
    """Summed response log-probs and response token counts, each Shape: (N,).

    input_ids, attention_mask, loss_mask: (N, T); loss_mask is True on response tokens.
    Works with left or right padding. `head_only=False` always goes through the model's own
    forward (FSDP needs its root module called). With right padding no attention mask is passed: under a
    causal mask a real token never sees the padding after it, and the model can use its plain
    causal attention kernel.
    """
    N, T = input_ids.shape
    target_mask = loss_mask[:, 1:]  # (N, T-1): label at t+1 is scored by logits at t
    # Logits are needed only from the first position that predicts a response token.
    first = int(target_mask.any(0).nonzero()[0]) if target_mask.any() else T - 1
    inputs = {"input_ids": input_ids, "use_cache": False}
    if not _is_right_padded(attention_mask):
        inputs.update(attention_mask=attention_mask, position_ids=position_ids_from_mask(attention_mask))
    mask = target_mask[:, first:]  # (N, T-1-first)
    labels = input_ids[:, first + 1 :][mask]  # (K,)
    if head_only and _uses_head_only(model):
        hidden = model.get_decoder()(**inputs).last_hidden_state  # (N, T, H)
        picked = head_logps(model.get_output_embeddings(), hidden[:, first:-1][mask], labels)  # (K,)
    else:
        if _accepts_logits_to_keep(model):
            inputs["logits_to_keep"] = T - first  # the last T - first positions
        logits = model(**inputs).logits  # (N, T - first, V) or (N, T, V)
        logits = logits[:, -(T - first) :][:, :-1]  # (N, T-1-first, V): positions first..T-2
        picked = token_logps(logits[mask], labels)  # (K,)
    rows = mask.nonzero()[:, 0]  # (K,) sequence of each scored token
    logps = torch.zeros(N, dtype=torch.float32, device=input_ids.device).index_add(0, rows, picked)  # (N,)
    return logps, mask.sum(-1)
