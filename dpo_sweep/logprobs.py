"""Per-sequence log-probs of responses.

N sequences of T tokens (N = 2B: chosen rows then rejected rows), vocabulary V. For each
sequence the log-prob of its response is the sum over response tokens t of
log p(token_t | tokens_<t): the logits at position t - 1 scored against the label at t.
Prompt and padding positions never count.

A batch comes in one of two layouts (`data.collate`, `data.collate_shared`); `batch_logps`
takes either. In the shared-prompt layout each pair is one row, prompt + chosen + rejected, so
every layer's projections and MLP run on the prompt once instead of twice; only attention sees
the two sequences apart (`SharedPrompt`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

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


def batch_logps(model: PreTrainedModel, batch: Dict[str, Tensor], head_only: bool = True) -> Tuple[Tensor, Tensor]:
    """Summed response log-probs and scored token counts of a batch in either layout, each (2B,),
    chosen first."""
    if "merge_index" in batch:
        return shared_prompt_logps(model, batch)
    logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"], head_only)
    return logps, batch["counts"]


# ---------------------------------------------------------------------------- shared prompt

# The HEAD_ONLY_MODELS also take position ids for their rotary embeddings and pass extra forward
# keywords down to the attention function: tests/test_logprobs.py checks each in this layout.
SHARED_PROMPT_ATTENTION = "dpo_sweep_shared_prompt"


class SharedPrompt:
    """Attention over the shared-prompt layout (`data.collate_shared`).

    The decoder computes queries, keys and values of the B rows (prompt + chosen + rejected); this
    gathers them into the 2B right-padded sequences prompt + chosen and prompt + rejected (in
    groups of similar length), runs plain causal SDPA on each group (no mask, so the fast causal
    kernel), and gathers the outputs back to the rows. The rejected tokens never see the chosen
    ones; the prompt's keys and values serve both, and its gradient is the sum over both, as with
    two separate rows.
    """

    def __init__(self, batch: Dict[str, Tensor]):
        self.groups = []  # (n_g, T_g) each, in order: merge_index counts their outputs end to end
        while f"attention_index_{len(self.groups)}" in batch:
            self.groups.append(batch[f"attention_index_{len(self.groups)}"])
        self.merge_index = batch["merge_index"]  # (B, L)

    def attend(self, module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor, **kwargs) -> Tuple[Tensor, None]:
        """query (B, heads, L, d), key and value (B, kv_heads, L, d) -> (B, L, heads, d)."""
        kwargs.pop("is_causal", None)
        outs = []
        for index in self.groups:
            def spread(x: Tensor) -> Tensor:  # (B, h, L, d) -> (n_g, h, T_g, d)
                B, h, L, d = x.shape
                rows = x.transpose(1, 2).reshape(B * L, h * d).index_select(0, index.reshape(-1))
                return rows.reshape(*index.shape, h, d).transpose(1, 2)

            out, _ = sdpa_attention_forward(module, spread(query), spread(key), spread(value), None,
                                            is_causal=True, **kwargs)  # (n_g, T_g, heads, d)
            outs.append(out.reshape(-1, out.shape[-2] * out.shape[-1]))
        B, L = self.merge_index.shape
        heads, d = out.shape[-2:]
        merged = torch.cat(outs).index_select(0, self.merge_index.reshape(-1))  # (B * L, heads * d)
        return merged.reshape(B, L, heads, d), None


def _shared_prompt_attention(module, query, key, value, attention_mask, shared_prompt: Optional[SharedPrompt] = None,
                             **kwargs):
    """The model's attention: SDPA, or SharedPrompt's when the forward was given one."""
    if shared_prompt is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    return shared_prompt.attend(module, query, key, value, **kwargs)


AttentionInterface.register(SHARED_PROMPT_ATTENTION, _shared_prompt_attention)
AttentionMaskInterface.register(SHARED_PROMPT_ATTENTION, sdpa_mask)  # plain forwards: SDPA's masks


def prompt_sharing_blocker(model: PreTrainedModel, max_length: Optional[int] = None) -> Optional[str]:
    """Why this model cannot take the shared-prompt layout for sequences of up to `max_length`
    tokens (None: any length), or None when it can."""
    config = model.config
    if not _uses_head_only(model):
        return f"model type {getattr(config, 'model_type', None)!r} is not one of {sorted(HEAD_ONLY_MODELS)}"
    if config._attn_implementation not in ("sdpa", SHARED_PROMPT_ATTENTION):
        return f"attention is {config._attn_implementation!r}, not 'sdpa'"
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and (max_length is None or window < max_length):  # a window >= every sequence never binds
        return f"the model's sliding attention window ({window}) is shorter than train.max_length ({max_length})"
    return None


@dataclass(frozen=True)
class PromptSharing:
    """Whether a run uses the shared-prompt layout, decided once by `decide_prompt_sharing`.

    `requested` (train.share_prompt) decides how batches are grouped by length: by the one-row
    length when asked, whether or not the model can take it, so that the batch order is a function
    of the config and the data alone (one process, DDP, FSDP and the TRL backend see the same
    batches). `layout` is what the model takes: one row per pair, or two rows a pair; `reason`
    says why not when it was asked and is not.
    """

    requested: bool
    layout: bool
    reason: Optional[str] = None


def decide_prompt_sharing(model: Optional[PreTrainedModel], requested: bool, max_length: Optional[int] = None,
                          fsdp: bool = False) -> PromptSharing:
    """The one decision on prompt sharing: asked for (`train.share_prompt`), not under FSDP (its
    sharded forward is the model's own), and a model that can take it (`prompt_sharing_blocker`).
    `model=None` decides for a trainer that never takes the layout (TRL's)."""
    if not requested:
        return PromptSharing(False, False, "train.share_prompt=false")
    if fsdp:
        return PromptSharing(True, False, "FSDP runs the model's own forward (train.fsdp=true)")
    if model is None:
        return PromptSharing(True, False, "the trainer takes two rows a pair")
    blocker = prompt_sharing_blocker(model, max_length)
    return PromptSharing(True, blocker is None, blocker)


def apply_prompt_sharing(model: PreTrainedModel, sharing: PromptSharing) -> None:
    """Switch the model's attention to one that also takes the shared-prompt layout when the
    decision says so (plain forwards still get SDPA)."""
    if sharing.layout:
        model.set_attn_implementation(SHARED_PROMPT_ATTENTION)


def enable_prompt_sharing(model: PreTrainedModel, max_length: Optional[int] = None) -> Optional[str]:
    """Decide and apply in one call; returns why the model cannot take the layout, or None."""
    sharing = decide_prompt_sharing(model, True, max_length)
    apply_prompt_sharing(model, sharing)
    return sharing.reason


def shares_prompt(model: PreTrainedModel) -> bool:
    """Whether the model was switched by `enable_prompt_sharing` (its batches use that layout)."""
    return model.config._attn_implementation == SHARED_PROMPT_ATTENTION


def shared_prompt_logps(model: PreTrainedModel, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
    """`batch_logps` for the shared-prompt layout: (2B,) summed log-probs, (2B,) counts."""
    if not shares_prompt(model):
        raise RuntimeError("a shared-prompt batch needs the model prepared by enable_prompt_sharing()")
    input_ids = batch["input_ids"]  # (B, L)
    B = input_ids.shape[0]
    # A 4D mask is passed through untouched; SharedPrompt ignores it. Without one, the decoder
    # would read the position ids (which restart at the rejected response) as packed sequences.
    unused_mask = torch.ones(B, 1, 1, 1, dtype=torch.bool, device=input_ids.device)
    hidden = model.get_decoder()(input_ids=input_ids, position_ids=batch["position_ids"], attention_mask=unused_mask,
                                 use_cache=False, shared_prompt=SharedPrompt(batch)).last_hidden_state  # (B, L, H)
    picked = head_logps(model.get_output_embeddings(), hidden.reshape(-1, hidden.shape[-1]).index_select(
        0, batch["score_index"]), batch["score_labels"])  # (K,)
    logps = torch.zeros(2 * B, dtype=torch.float32, device=input_ids.device).index_add(0, batch["score_seq"], picked)
    return logps, batch["counts"]
