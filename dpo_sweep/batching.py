"""Batches of tokenised pairs: two rows a pair (`collate`), one row a pair with the prompt shared
(`collate_shared`), and which pairs go in which batch (`batch_indices`, length-grouped)."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from dpo_sweep.pairs import Pair


def collate(pairs: Sequence[Pair], pad_id: int, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Chosen and rejected sequences of B pairs in one batch of 2B rows: chosen first.

    Returns input_ids, attention_mask and loss_mask, each Shape: (2B, T); loss_mask is 1 on
    response tokens, the only positions whose log-probs count; and counts (2B,), the response
    tokens scored in each sequence.
    """
    seqs = [p.prompt_ids + p.chosen_ids for p in pairs] + [p.prompt_ids + p.rejected_ids for p in pairs]
    prompt_lens = [len(p.prompt_ids) for p in pairs] * 2
    T = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)  # (2B, T)
    attention_mask = torch.zeros((len(seqs), T), dtype=torch.long)  # (2B, T)
    loss_mask = torch.zeros((len(seqs), T), dtype=torch.bool)  # (2B, T)
    for i, (seq, n_prompt) in enumerate(zip(seqs, prompt_lens)):
        start = 0 if padding_side == "right" else T - len(seq)
        input_ids[i, start : start + len(seq)] = torch.tensor(seq)
        attention_mask[i, start : start + len(seq)] = 1
        loss_mask[i, start + n_prompt : start + len(seq)] = True
    counts = loss_mask[:, 1:].sum(-1)  # (2B,): a token at position 0 has nothing to score it
    return {"input_ids": input_ids, "attention_mask": attention_mask, "loss_mask": loss_mask, "counts": counts}


ATTENTION_GROUPS = 4  # shared-prompt layout: attention runs on this many length groups of sequences


def collate_shared(pairs: Sequence[Pair], pad_id: int, groups: int = ATTENTION_GROUPS) -> Dict[str, torch.Tensor]:
    """B pairs as B rows of prompt + chosen + rejected: the prompt is computed once per pair.

    Position ids of the rejected response continue from the end of the prompt, as they would in
    the row prompt + rejected. Attention must keep chosen and rejected apart; it does so through
    the index tensors below (`logprobs.SharedPrompt`), which lay the rows out again as the 2B
    sequences prompt + chosen and prompt + rejected, right-padded, for a causal kernel. Those
    sequences are sorted by length and cut into `groups` groups, each padded to its own longest,
    so that attention computes little padding. All indices are flat: position t of row b is
    b * L + t.

    Returns
      input_ids, position_ids: (B, L), right-padded (padding has id `pad_id`, position 0);
      attention_index_<g>: (n_g, T_g) for each group g: the flat row position at each position
        of its sequences (padding repeats the last real position);
      merge_index: (B, L): for each row position, its flat place in the outputs of the groups
        laid end to end (prompt positions take the chosen sequence's; padding takes its row's
        last real position's, so that no output or gradient ever passes from a row to another);
      score_index, score_labels, score_seq: (K,): for each of the K response tokens, the flat
        position whose output predicts it, the token, and its sequence (chosen b: b, rejected
        b: B + b);
      counts: (2B,) response tokens of each sequence, chosen first.
    """
    L = max(p.shared_length for p in pairs)
    out, sequences, scores = _shared_rows(pairs, pad_id, L)
    out.update(_attention_groups(pairs, sequences, groups, L))
    out.update({k: torch.tensor(v, dtype=torch.long) for k, v in scores.items()})
    return out


def _shared_rows(pairs: Sequence[Pair], pad_id: int, L: int):
    """input_ids and position_ids (B, L); the flat row positions of each of the 2B sequences
    (chosen first); and score_index, score_labels, score_seq, counts as lists."""
    B = len(pairs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    sequences: List[List[int]] = [[] for _ in range(2 * B)]
    scores: Dict[str, List[int]] = {"score_index": [], "score_labels": [], "score_seq": [], "counts": [0] * (2 * B)}
    for b, p in enumerate(pairs):
        P, C, R = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
        row = b * L
        input_ids[b, : P + C + R] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
        position_ids[b, : P + C + R] = torch.tensor(list(range(P + C)) + list(range(P, P + R)))
        sequences[b] = list(range(row, row + P + C))  # prompt + chosen
        sequences[B + b] = list(range(row, row + P)) + list(range(row + P + C, row + P + C + R))  # prompt + rejected
        # Token t of a sequence is scored by the output at t - 1 of that sequence.
        for seq, response in ((b, p.chosen_ids), (B + b, p.rejected_ids)):
            first = max(P, 1)  # a response token at position 0 has nothing before it to score it
            scores["score_index"] += sequences[seq][first - 1 : P + len(response) - 1]
            scores["score_labels"] += response[first - P :]
            scores["score_seq"] += [seq] * (P + len(response) - first)
            scores["counts"][seq] = P + len(response) - first
    return {"input_ids": input_ids, "position_ids": position_ids}, sequences, scores


def _attention_groups(pairs: Sequence[Pair], sequences: List[List[int]], groups: int, L: int) -> Dict[str, torch.Tensor]:
    """attention_index_<g> of each length group of the sequences, and merge_index (B, L)."""
    B = len(pairs)
    out: Dict[str, torch.Tensor] = {}
    order = sorted(range(2 * B), key=lambda s: -len(sequences[s]))
    size = -(-2 * B // groups)
    merge_index = [0] * (B * L)
    offset = 0  # of the group's first output
    for g, start in enumerate(range(0, 2 * B, size)):
        members = order[start : start + size]
        T = len(sequences[members[0]])
        index = []
        for i, s in enumerate(members):
            seq = sequences[s]
            index += seq + seq[-1:] * (T - len(seq))
            skip = 0 if s < B else len(pairs[s - B].prompt_ids)  # the prompt's outputs: from the chosen one
            for t in range(skip, len(seq)):
                merge_index[seq[t]] = offset + i * T + t
        out[f"attention_index_{g}"] = torch.tensor(index, dtype=torch.long).reshape(len(members), T)
        offset += len(members) * T
    for b in range(B):  # a row's padding: its own last real output (packed trials' rows stay apart)
        last = sequences[B + b][-1]
        merge_index[last + 1 : (b + 1) * L] = [merge_index[last]] * ((b + 1) * L - last - 1)
    out["merge_index"] = torch.tensor(merge_index, dtype=torch.long).reshape(B, L)
    return out


def batch_indices(
    pairs: Sequence[Pair],
    batch_size: int,
    shuffle: bool,
    group_by_length: bool,
    generator: Optional[torch.Generator] = None,
    shared_prompt: bool = False,
) -> List[List[int]]:
    """Indices of each batch. With group_by_length, pairs of similar length share a batch
    (sorted inside windows of 64 batches), so little of each batch is padding. The length is
    that of the layout the batches will have: `Pair.shared_length` with `shared_prompt`, else
    `Pair.length`."""
    order = torch.randperm(len(pairs), generator=generator).tolist() if shuffle else list(range(len(pairs)))
    if group_by_length:
        window = batch_size * 64
        length = (lambda k: pairs[k].shared_length) if shared_prompt else (lambda k: pairs[k].length)
        order = [
            i
            for w in range(0, len(order), window)
            for i in sorted(order[w : w + window], key=lambda k: -length(k))
        ]
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    if shuffle and group_by_length:  # sorted windows would otherwise give a long-to-short curriculum
        batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
    return batches
