"""Judges score generated answers: `judge.name` picks one, each in its own module.

A judge has `score(prompts, answers) -> list of floats` (higher is better), or returns None when
it gives no reward (`none`). To add one: a module here with a class of that shape, a line in
`JUDGES`, and `conf/judge/<name>.yaml`.

| judge | scores |
| --- | --- |
| `builtin` | the built-in tasks by their rule: 1 for the correct answer, else 0 |
| `reward_model` | any sequence-classification model (a hub name or a local folder) |
| `none` | nothing: the generation metrics keep KL and length only |
"""

from __future__ import annotations

from typing import List, Optional, Protocol, Sequence

import torch
from omegaconf import DictConfig


class Judge(Protocol):
    name: str

    def score(self, prompts: Sequence[str], answers: Sequence[str]) -> Optional[List[float]]:
        ...


JUDGES = ("builtin", "reward_model", "none")


def build_judge(cfg: DictConfig, device: torch.device) -> Judge:
    """The judge `cfg` (the `judge` config group) names, loaded and checked."""
    if cfg.name == "builtin":
        from dpo_sweep.judges.builtin import BuiltinJudge

        return BuiltinJudge()
    if cfg.name == "reward_model":
        from dpo_sweep.judges.reward_model import RewardModelJudge

        return RewardModelJudge(cfg.name_or_path, device, cfg.batch_size, cfg.max_length)
    from dpo_sweep.judges.none import NoJudge

    return NoJudge()
