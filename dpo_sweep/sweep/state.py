"""What one `-m` invocation works with, shared by the sweep's modules."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import optuna
from omegaconf import DictConfig

from dpo_sweep import tracking
from dpo_sweep.sweep.settings import SweepSettings
from dpo_sweep.sweep.space import Dimension


class SweepError(RuntimeError):
    """The sweep cannot go on (too many failed trials, a job folder already in use)."""


@dataclass
class Sweep:
    """Everything one `-m` invocation works with."""

    settings: SweepSettings
    dims: List[Dimension]
    fixed: List[str]  # fixed overrides, passed to every trial
    base: DictConfig  # the composed config with the fixed overrides: objective, tracking
    sweep_dir: str
    location: str  # Optuna storage
    storage: Any
    study: optuna.Study
    metrics: List[str]
    directions: List[str]
    grid: bool  # every point of a finite space once, rather than the sampler's choice
    parent: Optional[tracking.Tracker] = None
    asked: List[int] = field(default_factory=list)  # trial numbers launched by this invocation
    interrupted: List[int] = field(default_factory=list)  # trials a dead sweeper left running

    @property
    def multi(self) -> bool:
        return len(self.metrics) > 1
