"""The sweeper's settings (`hydra.sweeper.*`), typed and checked before anything runs.

The schema Hydra composes lives with the plugin (hydra_plugins/dpo_sweep_sweeper/config.py);
this is the checked, plain form the sweep works with.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from dpo_sweep.config import ConfigError
from dpo_sweep.sweep.space import Dimension

SAMPLERS = ("tpe", "random", "grid", "cmaes", "gp", "nsgaii")
PRUNERS = ("median", "successive_halving", "hyperband", "none")


@dataclass
class SweepSettings:
    """`hydra.sweeper.*`, checked."""

    n_trials: Optional[int]
    n_jobs: int
    study_name: Optional[str]
    storage: Optional[str]
    sampler: str
    seed: Optional[int]
    sampler_kwargs: Dict[str, Any]
    pruner: str
    pruner_kwargs: Dict[str, Any]
    max_failure_rate: float
    params: Dict[str, Any] = field(default_factory=dict)
    pack: int = 1  # LoRA trials trained together in one process (dpo_sweep.packing)
    pack_forward: Optional[int] = None  # of them through the model together; None: the device decides

    @classmethod
    def from_config(cls, cfg: DictConfig) -> "SweepSettings":
        s = OmegaConf.to_container(cfg, resolve=True)
        settings = cls(
            n_trials=s.get("n_trials"), n_jobs=s.get("n_jobs", 1), study_name=s.get("study_name"),
            storage=s.get("storage"), sampler=s["sampler"]["name"], seed=s["sampler"].get("seed"),
            sampler_kwargs=s["sampler"].get("kwargs") or {}, pruner=s["pruner"]["name"],
            pruner_kwargs=s["pruner"].get("kwargs") or {}, max_failure_rate=s.get("max_failure_rate", 0.5),
            params=s.get("params") or {}, pack=s.get("pack", 1),
            pack_forward=s.get("pack_forward"),
        )
        settings.check()
        return settings

    def check(self) -> None:
        def need(ok: bool, key: str, value: Any, expected: str) -> None:
            if not ok:
                raise ConfigError(f"config key 'hydra.sweeper.{key}' = {value!r}: expected {expected}")

        need(self.n_trials is None or self.n_trials >= 1, "n_trials", self.n_trials, "null (the full grid) or >= 1")
        need(self.n_jobs >= 1, "n_jobs", self.n_jobs, "an integer >= 1")
        need(self.pack >= 1, "pack", self.pack, "an integer >= 1 (1: each trial its own run)")
        need(self.pack_forward is None or self.pack_forward >= 1, "pack_forward", self.pack_forward,
             "null (the device decides) or an integer >= 1")
        need(self.sampler in SAMPLERS, "sampler.name", self.sampler, "one of " + ", ".join(SAMPLERS))
        need(self.pruner in PRUNERS, "pruner.name", self.pruner, "one of " + ", ".join(PRUNERS))
        need(0 <= self.max_failure_rate <= 1, "max_failure_rate", self.max_failure_rate, "0 <= value <= 1")
        need(self.study_name is None or bool(self.study_name), "study_name", self.study_name, "null or a name")

    def is_grid(self) -> bool:
        """Every point of a finite space once, rather than the sampler's choice."""
        return self.sampler == "grid" or self.n_trials is None


def check_grid(dims: Sequence[Dimension], settings: SweepSettings, grid: bool) -> None:
    """A grid needs every dimension finite."""
    continuous = [d for d in dims if d.values is None]
    if grid and continuous:
        key = "sampler.name" if settings.sampler == "grid" else "n_trials"
        value = settings.sampler if settings.sampler == "grid" else settings.n_trials
        raise ConfigError(
            f"config key 'hydra.sweeper.{key}' = {value!r}: a grid needs every dimension finite (a list, choice() "
            f"or range()), but {continuous[0].key}={continuous[0].spec} is an interval; set hydra.sweeper.n_trials"
        )
