"""The data types every data module shares: a tokenised pair, a loaded data set, a data error."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple


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
