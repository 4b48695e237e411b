"""No judge: no reward; the generation metrics keep the KL and the length."""

from __future__ import annotations

from typing import Optional, Sequence


class NoJudge:
    name = "none"

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> Optional[list]:
        return None
