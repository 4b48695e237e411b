"""Preference data: load (local files, a hub set, the built-in set), normalise, tokenise.

This module is the data concern's entry point. Its pieces: `pairs` (the types), `tasks` (the
built-in set), `rows` (row formats to texts: standard, conversational, implicit prompt),
`batching` (collation and length grouping); their public names are importable from here.

Prompt and responses are tokenised separately, so the response mask is exact. Every response
ends with EOS. Truncation keeps the end of the prompt (to `max_prompt_length`) and the start of
each response (to `max_length` in all).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from omegaconf import DictConfig
from transformers import PreTrainedTokenizerBase

from dpo_sweep.batching import ATTENTION_GROUPS, batch_indices, collate, collate_shared  # noqa: F401
from dpo_sweep.pairs import BadRow, DataCounts, DataError, Pair, PreferenceData
from dpo_sweep.rows import normalise
from dpo_sweep.tasks import builtin_rows

log = logging.getLogger(__name__)

LOCAL_FORMATS = (".jsonl", ".json", ".parquet", ".csv")


# ---------------------------------------------------------------------------- loading


def read_local(path: str) -> List[Any]:
    """Rows of a local .jsonl/.json/.parquet/.csv file, read afresh on every call: nothing is
    cached, so a file edited since the last run is never served stale. A row holding bytes that
    are not UTF-8 comes back as a `BadRow` naming its field (checking it raises, or skips it)."""
    if not os.path.isfile(path):
        raise DataError(f"data file '{path}' does not exist (from config key dataset.path)")
    ext = os.path.splitext(path)[1].lower()
    if ext not in LOCAL_FORMATS:
        raise DataError(f"{path}: unsupported file type '{ext}'; expected one of {', '.join(LOCAL_FORMATS)}")
    if ext == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            return pyarrow.parquet.read_table(path).to_pylist()
        except pyarrow.ArrowException as e:
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
    with open(path, "rb") as f:
        text, has_bad_bytes = _decode(f.read(), path)
    rows = {".jsonl": _jsonl_rows, ".json": _json_rows, ".csv": _csv_rows}[ext](text, path)
    return [_mark_bad_bytes(row) for row in rows] if has_bad_bytes else rows


# Bytes that are not UTF-8, as the "surrogateescape" error handler keeps them: byte b is U+DC00 + b.
_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")


def _decode(raw: bytes, path: str) -> Tuple[str, bool]:
    """The text of a UTF-8 file (a leading BOM dropped) and whether some of its bytes were not
    UTF-8; those are kept as escapes so that the rows holding them can be named. A file with a
    UTF-16/32 BOM or NUL bytes is not UTF-8 text at all: one error for the whole file."""
    at = 0 if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) else raw.find(b"\x00")
    if at >= 0:
        line = raw.count(b"\n", 0, at) + 1
        raise DataError(f"{path}: byte {raw[at]:#04x} at offset {at} (line {line}) is not UTF-8 text "
                        "(UTF-16 or binary?); expected a UTF-8 file")
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("utf-8", "surrogateescape"), True


def _mark_bad_bytes(row: Any) -> Any:
    """`row`, or a BadRow naming its first field that holds bytes that are not UTF-8."""
    if not isinstance(row, dict):
        return row
    for key, value in row.items():
        found = _ESCAPED_BYTE.search(str(key)) or _ESCAPED_BYTE.search(json.dumps(value, ensure_ascii=False))
        if found:
            return BadRow(f"field {str(key)!r}: byte {ord(found.group()) - 0xDC00:#04x} is not UTF-8 "
                          "(a latin-1 file?); expected UTF-8 text")
    return row


def _jsonl_rows(text: str, path: str) -> List[Any]:
    rows = []
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {line_no}: invalid JSON ({e.msg})") from None
    return rows


def _json_rows(text: str, path: str) -> List[Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: invalid JSON at line {e.lineno} ({e.msg})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(data).__name__}")
    return data


def _csv_rows(text: str, path: str) -> List[Any]:
    """Rows of a CSV file under its header line. Every cell is text, as a spreadsheet shows it
    (42 is "42"); an empty cell is a missing value."""
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        lines = [cells for cells in reader if cells]  # blank lines are no rows
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: invalid CSV ({e})") from None
    if not lines:
        return []
    header, rows = lines[0], []
    for cells in lines[1:]:
        if len(cells) != len(header):
            rows.append(BadRow(f"{len(cells)} cells; expected {len(header)}, one for each header column "
                               f"({', '.join(header)})"))
        else:
            rows.append({key: cell if cell != "" else None for key, cell in zip(header, cells)})
    return rows


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
    if responses[0] == responses[1] and responses[0][-1] == tokenizer.eos_token_id:  # same, and not cut
        raise DataError(f"{where}: fields 'chosen' and 'rejected' are the same tokens (the tokenizer does "
                        "not tell their differing characters apart); expected different responses")
    return Pair(tuple(prompt_ids), responses[0], responses[1], row)


def prepare(
    rows: List[Dict[str, Any]],
    source: str,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    max_prompt_length: int,
    on_bad_row: str,
    first_row: int = 0,
) -> Tuple[List[Pair], DataCounts]:
    """Normalise and tokenise rows; return the pairs kept and the counts of what was left out or
    cut: bad rows skipped, pairs whose responses truncation cut to the same tokens (they carry no
    preference, so they are dropped), and responses that lost their EOS to truncation."""
    pairs: List[Pair] = []
    counts = DataCounts()
    for i, row in enumerate(rows):
        index = first_row + i
        where = f"{source}: row {index + 1}"  # 1-based: row N is line N of a .jsonl file
        try:
            texts = normalise(row, tokenizer, where)
            pair = tokenise(*texts, tokenizer, max_length, max_prompt_length, where, index)
        except DataError as e:
            if on_bad_row == "error":
                raise
            counts.skipped += 1
            log.warning("skipping %s", e)
            continue
        if pair.chosen_ids == pair.rejected_ids:
            counts.dropped_identical += 1
            log.debug("dropping %s: chosen and rejected are identical after truncation", where)
            continue
        pairs.append(pair)
        counts.lost_eos += sum(ids[-1] != tokenizer.eos_token_id for ids in (pair.chosen_ids, pair.rejected_ids))
    counts.kept = len(pairs)
    if not pairs:
        raise DataError(f"{source}: no usable rows ({counts.skipped} skipped, {counts.dropped_identical} with "
                        f"chosen and rejected identical after truncation to train.max_length = {max_length})")
    return pairs, counts


# Above this share of pairs dropped as identical, truncation is set too tight for the data.
IDENTICAL_WARN_SHARE = 0.10


def load_preference_data(
    cfg: DictConfig, tokenizer: PreTrainedTokenizerBase, max_length: int, max_prompt_length: int
) -> PreferenceData:
    train_rows, eval_rows, train_src, eval_src, eval_offset = load_rows(cfg)
    lengths = (tokenizer, max_length, max_prompt_length, cfg.on_bad_row)
    train, tc = prepare(train_rows, train_src, *lengths)
    eval_, ec = prepare(eval_rows, eval_src, *lengths, first_row=eval_offset)
    if tc.skipped + ec.skipped:
        log.warning("skipped %d train and %d eval rows (dataset.on_bad_row=skip)", tc.skipped, ec.skipped)
    dropped = tc.dropped_identical + ec.dropped_identical
    tokenised = tc.kept + ec.kept + dropped  # the pairs that were tokenised and cut
    if dropped > IDENTICAL_WARN_SHARE * tokenised:
        log.warning("dropped %d of %d pairs (%.0f%%): chosen and rejected are identical after truncation to "
                    "train.max_length = %d tokens (prompts keep up to train.max_prompt_length = %d); raise "
                    "train.max_length or lower train.max_prompt_length", dropped, tokenised,
                    100 * dropped / tokenised, max_length, max_prompt_length)
    return PreferenceData(train, eval_, tc.skipped + ec.skipped, dropped, tc.lost_eos + ec.lost_eos)
