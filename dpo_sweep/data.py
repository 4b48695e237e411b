"""Preference data: load, normalise, tokenise, collate, batch.

Rows come in three formats (all normalised to prompt text + two response texts):
- standard: {prompt, chosen, rejected} strings, optional `system` (prepended to the prompt, or
  rendered as a system message when the tokenizer has a chat template);
- conversational: `chosen`/`rejected` (and optional `prompt`) are lists of {role, content}
  messages, rendered with the tokenizer's chat template;
- implicit prompt: no `prompt`; the shared prefix of chosen and rejected is the prompt.

Prompt and responses are tokenised separately, so the response mask is exact. Every response
ends with EOS. Truncation keeps the end of the prompt (to `max_prompt_length`) and the start of
each response (to `max_length` in all).
"""

from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


class DataError(ValueError):
    """A row or file cannot be used; the message names the file, the row and the field."""


@dataclass(frozen=True)
class Pair:
    """One tokenised preference pair; `row` is its index in the source file or split."""

    prompt_ids: Tuple[int, ...]
    chosen_ids: Tuple[int, ...]
    rejected_ids: Tuple[int, ...]
    row: int  # 0-based index of the row in its source

    @property
    def length(self) -> int:
        """Positions of the longer of its two sequences (prompt + chosen, prompt + rejected)."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    @property
    def shared_length(self) -> int:
        """Positions of its one row when the prompt is shared: prompt + chosen + rejected."""
        return len(self.prompt_ids) + len(self.chosen_ids) + len(self.rejected_ids)


@dataclass
class PreferenceData:
    train: List[Pair]
    eval: List[Pair]
    skipped: int  # rows dropped by on_bad_row=skip, train and eval together


# ---------------------------------------------------------------------------- built-in set

_WORDS = "apple river stone cloud maple tiger lemon piano rocket garden silver ocean winter".split()


def _upper(rng: random.Random) -> Tuple[str, str, str]:
    text = " ".join(rng.sample(_WORDS, rng.randint(1, 3)))
    good = text.upper()
    if rng.random() < 0.5:
        bad = text  # left unchanged
    else:
        i = rng.choice([k for k, c in enumerate(good) if c != " "])
        bad = good[:i] + good[i].lower() + good[i + 1 :]  # one letter missed
    return f"Uppercase: {text}\nAnswer: ", good, bad


def _sort(rng: random.Random) -> Tuple[str, str, str]:
    digits = [rng.randint(0, 9) for _ in range(rng.randint(4, 6))]
    while digits == sorted(digits):
        rng.shuffle(digits)
    good = sorted(digits)
    bad = list(digits) if rng.random() < 0.5 else sorted(digits, reverse=True)
    if bad == good:
        bad = list(reversed(good))
    fmt = lambda xs: " ".join(map(str, xs))  # noqa: E731
    return f"Sort: {fmt(digits)}\nAnswer: ", fmt(good), fmt(bad)


def _add(rng: random.Random) -> Tuple[str, str, str]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
    return f"Add: {a}+{b}\nAnswer: ", str(a + b), str(abs(wrong))


def _reverse(rng: random.Random) -> Tuple[str, str, str]:
    word = rng.choice(_WORDS)
    good = word[::-1]
    if rng.random() < 0.5:
        bad = word  # copied, not reversed
    else:
        i = rng.randrange(len(good) - 1)
        bad = good[:i] + good[i + 1] + good[i] + good[i + 2 :]  # two letters swapped
        if bad == good:
            bad = word
    return f"Reverse: {word}\nAnswer: ", good, bad


def builtin_rows(n: int, seed: int = 1234) -> List[Dict[str, str]]:
    """`n` standard rows of four small tasks whose chosen answer is the correct one."""
    rng = random.Random(seed)  # fixed: the data set does not change with the run's seed
    tasks = (_upper, _sort, _add, _reverse)
    rows = []
    for i in range(n):
        prompt, chosen, rejected = tasks[i % len(tasks)](rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------- loading


def read_local(path: str) -> List[Dict[str, Any]]:
    """Rows of a local .jsonl/.json/.parquet/.csv file."""
    if not os.path.isfile(path):
        raise DataError(f"data file '{path}' does not exist (from config key dataset.path)")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
        return rows
    if ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
        return data
    if ext in (".parquet", ".csv"):
        import datasets

        return datasets.load_dataset(ext[1:], data_files=path, split="train").to_list()
    raise DataError(f"{path}: unsupported file type '{ext}'; expected one of {', '.join(LOCAL_FORMATS)}")


Rows = List[Dict[str, Any]]


def _load_hub(name: str, split: str, split_key: str) -> Rows:
    """Rows of a split of a Hugging Face hub data set; errors name the config keys."""
    import datasets

    try:
        return datasets.load_dataset(name, split=split).to_list()
    except ValueError as e:
        if "split" in str(e).lower():
            raise DataError(f"config key '{split_key}' = {split!r}: data set '{name}' has no such split ({e})") from e
        raise DataError(f"config key 'dataset.name' = {name!r}: cannot load it from the hub: {e}") from e
    except (OSError, ConnectionError) as e:
        raise DataError(f"config key 'dataset.name' = {name!r}: cannot load it from the hub "
                        f"(no network, or no such data set?): {e}") from e


def load_rows(cfg: DictConfig) -> Tuple[Rows, Rows, str, str, int]:
    """Train rows, eval rows, a name for each source (for messages) and the index in its source
    of the first eval row."""
    eval_rows: Optional[Rows] = None
    eval_offset = 0
    if cfg.path:
        train_rows, train_src = read_local(cfg.path), cfg.path
    elif cfg.name == "builtin":
        train_rows, train_src = builtin_rows(cfg.builtin_size), "builtin"
    else:
        train_rows = _load_hub(cfg.name, cfg.train_split, "dataset.train_split")
        train_src = f"{cfg.name}[{cfg.train_split}]"
        if cfg.eval_split and not cfg.eval_path:
            eval_rows = _load_hub(cfg.name, cfg.eval_split, "dataset.eval_split")
            eval_src = f"{cfg.name}[{cfg.eval_split}]"
    if cfg.eval_path:
        eval_rows, eval_src = read_local(cfg.eval_path), cfg.eval_path
    if not train_rows:
        raise DataError(f"{train_src}: the data set has no rows")
    if eval_rows is None:
        n_eval = int(cfg.eval_size if cfg.eval_size >= 1 else round(cfg.eval_size * len(train_rows)))
        if n_eval >= len(train_rows):
            raise DataError(
                f"{train_src}: {len(train_rows)} rows cannot give {n_eval} eval rows "
                f"(config key dataset.eval_size = {cfg.eval_size})"
            )
        # The last n_eval rows are eval; messages give each row's index in the source.
        eval_offset = len(train_rows) - n_eval
        train_rows, eval_rows, eval_src = train_rows[:eval_offset], train_rows[eval_offset:], train_src
    if cfg.max_train_samples:
        train_rows = train_rows[: cfg.max_train_samples]
    if cfg.max_eval_samples:
        eval_rows = eval_rows[: cfg.max_eval_samples]
    return train_rows, eval_rows, train_src, eval_src, eval_offset


# ---------------------------------------------------------------------------- normalising


def _is_messages(value: Any) -> bool:
    return isinstance(value, list)


def _check_messages(value: List[Any], where: str) -> None:
    for k, m in enumerate(value):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise DataError(f"{where}: message {k}: expected {{'role': str, 'content': str}}, got {m!r:.80}")


def _common_prefix_len(a: Sequence[Any], b: Sequence[Any]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def normalise(row: Dict[str, Any], tokenizer: PreTrainedTokenizerBase, where: str) -> Tuple[str, str, str, bool]:
    """Return (prompt, chosen, rejected, templated) texts of one row of any supported format.

    `templated` tells whether the text came from a chat template (which adds its own BOS).
    """
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with fields prompt, chosen, rejected; got {row!r:.80}")
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field '{key}' (expected fields prompt, chosen, rejected)")
        if not isinstance(row[key], (str, list)):
            raise DataError(f"{where}: field '{key}': expected a string or a list of messages, "
                            f"got {type(row[key]).__name__}")
    prompt, chosen, rejected = row.get("prompt"), row["chosen"], row["rejected"]
    system = row.get("system")
    if prompt is not None and not isinstance(prompt, (str, list)):
        raise DataError(f"{where}: field 'prompt': expected a string or a list of messages, "
                        f"got {type(prompt).__name__}")
    if system is not None and not isinstance(system, str):
        raise DataError(f"{where}: field 'system': expected a string, got {type(system).__name__}")
    if _is_messages(chosen) != _is_messages(rejected):
        raise DataError(f"{where}: fields 'chosen' and 'rejected' must both be strings or both message lists")

    if _is_messages(chosen):
        _check_messages(chosen, f"{where}: field 'chosen'")
        _check_messages(rejected, f"{where}: field 'rejected'")
        if prompt is None:  # implicit prompt: the shared leading messages
            n = _common_prefix_len(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        elif isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        else:
            _check_messages(prompt, f"{where}: field 'prompt'")
        if system:
            prompt = [{"role": "system", "content": system}] + list(prompt)
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            if not msgs or not any(m["content"].strip() for m in msgs):
                raise DataError(f"{where}: field '{key}': the response is empty")
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(f"{where}: conversational row, but the tokenizer has no chat template")
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        texts = []
        for key, msgs in (("chosen", chosen), ("rejected", rejected)):
            full = tokenizer.apply_chat_template(list(prompt) + list(msgs), tokenize=False)
            if not full.startswith(prompt_text):
                raise DataError(f"{where}: field '{key}': the chat template does not render the prompt "
                                "as a prefix of prompt + response")
            texts.append(full[len(prompt_text) :])
        return prompt_text, texts[0], texts[1], True

    if prompt is None:  # implicit prompt: the shared leading text, ending before a space
        n = _common_prefix_len(chosen, rejected)
        if 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1
        prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
    if isinstance(prompt, list):
        raise DataError(f"{where}: field 'prompt' is a message list but the responses are strings")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise DataError(f"{where}: field '{key}': the response is empty")
    if chosen == rejected:
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are identical")
    if system:
        if getattr(tokenizer, "chat_template", None):
            prompt_text = tokenizer.apply_chat_template(
                [{"role": "system", "content": system}, {"role": "user", "content": prompt}],
                tokenize=False,
                add_generation_prompt=True,
            )
            return prompt_text, chosen, rejected, True
        prompt = f"{system}\n\n{prompt}"
    return prompt, chosen, rejected, False


# ---------------------------------------------------------------------------- tokenising


def tokenise(
    prompt: str,
    chosen: str,
    rejected: str,
    templated: bool,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    where: str,
    row: int,
) -> Pair:
    """Token ids of one pair, truncated: prompt from the left, responses from the right."""
    prompt_ids = tokenizer(prompt, add_special_tokens=not templated)["input_ids"]
    prompt_ids = prompt_ids[-max_prompt_length:]
    if not prompt_ids:
        raise DataError(f"{where}: field 'prompt': empty, and the tokenizer adds no BOS token to start from")
    budget = max_length - len(prompt_ids)
    responses = []
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not ids or ids[-1] != tokenizer.eos_token_id:
            ids = ids + [tokenizer.eos_token_id]  # every response ends with EOS
        ids = ids[:budget]
        if not ids:
            raise DataError(f"{where}: field '{key}': the response is empty after truncation "
                            f"(prompt has {len(prompt_ids)} tokens, train.max_length = {max_length})")
        responses.append(tuple(ids))
    return Pair(tuple(prompt_ids), responses[0], responses[1], row)


def prepare(
    rows: List[Dict[str, Any]],
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    on_bad_row: str,
    first_row: int = 0,
) -> Tuple[List[Pair], int]:
    """Normalise and tokenise rows; return the pairs and how many rows were skipped."""
    pairs: List[Pair] = []
    skipped = 0
    for i, row in enumerate(rows):
        index = first_row + i
        where = f"{source}: row {index + 1}"  # 1-based: row N is line N of a .jsonl file
        try:
            texts = normalise(row, tokenizer, where)
            pairs.append(tokenise(*texts, tokenizer, max_length, max_prompt_length, where, index))
        except DataError as e:
            if on_bad_row == "error":
                raise
            skipped += 1
            log.warning("skipping %s", e)
    if not pairs:
        raise DataError(f"{source}: no usable rows ({skipped} skipped)")
    return pairs, skipped


def load_preference_data(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int
) -> PreferenceData:
    train_rows, eval_rows, train_src, eval_src, eval_offset = load_rows(cfg)
    lengths = (tokenizer, max_length, max_prompt_length, cfg.on_bad_row)
    train, skipped_train = prepare(train_rows, train_src, *lengths)
    eval_, skipped_eval = prepare(eval_rows, eval_src, *lengths, first_row=eval_offset)
    if skipped_train + skipped_eval:
        log.warning("skipped %d train and %d eval rows (dataset.on_bad_row=skip)", skipped_train, skipped_eval)
    return PreferenceData(train, eval_, skipped_train + skipped_eval)


# ---------------------------------------------------------------------------- batching


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
        laid end to end (prompt positions take the chosen sequence's; padding: 0);
      score_index, score_labels, score_seq: (K,): for each of the K response tokens, the flat
        position whose output predicts it, the token, and its sequence (chosen b: b, rejected
        b: B + b);
      counts: (2B,) response tokens of each sequence, chosen first.
    """
    B = len(pairs)
    L = max(p.shared_length for p in pairs)
    input_ids = torch.full((B, L), pad_id, dtype=torch.long)
    position_ids = torch.zeros((B, L), dtype=torch.long)
    sequences: List[List[int]] = [[] for _ in range(2 * B)]  # flat row positions of each sequence, chosen first
    score_index, score_labels, score_seq, counts = [], [], [], [0] * (2 * B)
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
            score_index += sequences[seq][first - 1 : P + len(response) - 1]
            score_labels += response[first - P :]
            score_seq += [seq] * (P + len(response) - first)
            counts[seq] = P + len(response) - first
    out = {"input_ids": input_ids, "position_ids": position_ids}
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
    as_tensor = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    out.update(merge_index=as_tensor(merge_index).reshape(B, L), score_index=as_tensor(score_index),
               score_labels=as_tensor(score_labels), score_seq=as_tensor(score_seq), counts=as_tensor(counts))
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


def iterate_batches(
    pairs: Sequence[Pair], indices: List[List[int]], pad_id: int
) -> Iterator[Dict[str, torch.Tensor]]:
    for idx in indices:
        yield collate([pairs[i] for i in idx], pad_id)
