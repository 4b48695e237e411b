"""Sampling answers from a model, batched, with a KV cache: the prompt runs through the model once,
then each new token is one single-position forward over the cached keys and values.

B prompts, left-padded to P tokens; N = max_new_tokens. Sampling draws from its own seeded
generator, so the same seed gives the same samples and training's random state is untouched.
"""

from __future__ import annotations

import inspect
from typing import Callable, ContextManager, List, Optional, Sequence

import torch
from transformers import PreTrainedModel

from dpo_sweep.logprobs import position_ids_from_mask

Tensor = torch.Tensor


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: torch.device):
    """(input_ids, attention_mask), each (B, P), prompts aligned to the right."""
    P = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), P), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, P - len(p):] = 1
    return ids.to(device), mask.to(device)


def next_tokens(logits: Tensor, temperature: float, generators: Sequence[Optional[torch.Generator]]) -> Tensor:
    """(B, V) -> (B,): argmax at temperature 0, else a draw from softmax(logits / temperature);
    the rows in len(generators) equal blocks, each drawn with its own generator."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    blocks = probs.chunk(len(generators)) if len(generators) > 1 else [probs]
    draws = [torch.multinomial(block, 1, generator=g).squeeze(-1) for block, g in zip(blocks, generators)]
    return torch.cat(draws).to(logits.device)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    prompts: Sequence[Sequence[int]],
    eos_id: int,
    pad_id: int,
    max_new_tokens: int,
    temperature: float = 1.0,
    seed: int = 0,
    use_cache: bool = True,
    autocast: Optional[Callable[[], ContextManager]] = None,
    groups: int = 1,
) -> List[List[int]]:
    """Each prompt's answer as token ids, up to and including EOS (or `max_new_tokens` tokens).

    `use_cache=False` runs the whole sequence again at every step (the slow reference the cached
    path is tested against). `groups`: the prompts are that many equal blocks (a packed model's
    trials, each block through its own adapter), each sampled with a generator of its own seeded
    `seed`, so that each block's answers are those it would get alone."""
    device = next(model.parameters()).device
    generators = [torch.Generator().manual_seed(seed) if temperature > 0 else None for _ in range(groups)]
    ids, mask = left_pad(prompts, pad_id, device)  # (B, P)
    B = ids.shape[0]
    out = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)  # (B, N)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    context = autocast() if autocast else torch.autocast(device.type, enabled=False)
    was_training = model.training
    model.eval()
    try:
        with context:
            logits, past = _forward(model, ids, mask, None, use_cache)
            for t in range(max_new_tokens):
                token = next_tokens(logits, temperature, generators)  # (B,)
                token = torch.where(done, torch.full_like(token, pad_id), token)
                out[:, t] = token
                done |= token == eos_id
                if bool(done.all()) or t == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, (~done | (token == eos_id)).long()[:, None]], dim=1)  # (B, P + t + 1)
                ids = torch.cat([ids, token[:, None]], dim=1)
                logits, past = _forward(model, ids, mask, past, use_cache)
    finally:
        model.train(was_training)
    return [_trim(row, eos_id, pad_id) for row in out.tolist()]


def _forward(model, ids: Tensor, mask: Tensor, past, use_cache: bool):
    """Logits of the last position (B, V) and the cache; with a cache only the newest token runs."""
    positions = position_ids_from_mask(mask)  # (B, T)
    if use_cache and past is not None:
        result = model(input_ids=ids[:, -1:], attention_mask=mask, position_ids=positions[:, -1:],
                       use_cache=True, **{_cache_keyword(model): past})
    else:
        result = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache)
    if not use_cache:
        return result.logits[:, -1].float(), None
    return result.logits[:, -1].float(), getattr(result, "cache", None) or result.past_key_values


def _cache_keyword(model) -> str:
    """transformers 5 names the KV cache argument `cache` (earlier: `past_key_values`)."""
    forward = getattr(model, "forward")
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _trim(row: List[int], eos_id: int, pad_id: int) -> List[int]:
    """The answer's tokens: up to and including the first EOS; trailing padding dropped."""
    if eos_id in row:
        return row[: row.index(eos_id) + 1]
    while row and row[-1] == pad_id:
        row = row[:-1]
    return row
