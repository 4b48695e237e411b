"""Preference data: load (local files, a hub set, the built-in set), normalise, tokenise.

This module is the data concern's entry point. Its pieces: `pairs` (the types), `tasks` (the
built-in set), `rows` (row formats to texts: standard, conversational, implicit prompt),
`batching` (collation and length grouping); their public names are importable from here.

Prompt and responses are tokenised separately, so the response mask is exact. Every response
ends with EOS. Truncation keeps the end of the prompt (to `max_prompt_length`) and the start of
each response (to `max_length` in all).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from dpo_sweep.batching import ATTENTION_GROUPS, batch_indices, collate, collate_shared  # noqa: F401
from dpo_sweep.pairs import DataError, Pair, PreferenceData
from dpo_sweep.rows import normalise
from dpo_sweep.tasks import builtin_rows

log = logging.getLogger(__name__)

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


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
        train_rows, train_src = builtin_rows(cfg.builtin_size, version=cfg.builtin_version), "builtin"
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


