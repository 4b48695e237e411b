"""The data types every data module shares: a tokenised pair, a loaded data set, a data error, a
row its file could not give intact."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


class DataError(ValueError):
    """A row or file cannot be used; the message names the file, the row and the field."""


@dataclass(frozen=True)
class BadRow:
    """A row its file could not give intact (bytes that are not UTF-8). `problem` names the field
    and what was expected; checking the row raises it as a DataError that names the row, so
    `dataset.on_bad_row=skip` can skip it."""

    problem: str


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
    dropped_identical: int = 0  # pairs whose chosen and rejected truncation cut to the same tokens
    lost_eos: int = 0  # kept responses whose EOS truncation cut off, train and eval together


@dataclass
class DataCounts:
    """What preparing one split left out or cut."""

    skipped: int = 0  # bad rows skipped (dataset.on_bad_row=skip)
    dropped_identical: int = 0  # pairs dropped: chosen and rejected the same tokens after truncation
    lost_eos: int = 0  # responses of kept pairs whose EOS truncation cut off
    kept: int = 0  # pairs kept
