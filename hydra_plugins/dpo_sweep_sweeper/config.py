"""The sweeper's settings, registered as `hydra/sweeper: dpo_optuna` (see README "Sweeps")."""

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SamplerConf:
    # tpe | random | grid | cmaes (needs the cmaes package) | gp | nsgaii (multi-objective)
    name: str = "tpe"
    # Seeds the sampler (plus the number of trials already in the study, so that a resumed sweep
    # does not repeat the same points); null: a different sequence every run.
    seed: Optional[int] = 0
    # Extra keyword arguments of the Optuna sampler: +hydra.sweeper.sampler.kwargs.n_startup_trials=5
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PrunerConf:
    # median | successive_halving | hyperband | none. Trials report the objective at every eval
    # (train.eval_every > 0), and the pruner stops bad ones early (state PRUNED).
    name: str = "median"
    # Extra keyword arguments of the Optuna pruner: +hydra.sweeper.pruner.kwargs.n_startup_trials=2
    kwargs: Dict[str, Any] = field(default_factory=dict)


@dataclass
class DPOOptunaSweeperConf:
    _target_: str = "hydra_plugins.dpo_sweep_sweeper.dpo_optuna_sweeper.DPOOptunaSweeper"
    # Trials to finish in the study (a resumed sweep counts those already finished); null: the
    # full grid, each point once, when every dimension is a list, choice() or range().
    n_trials: Optional[int] = None
    # Trials running at a time through hydra/launcher (joblib: in parallel, a new one as soon as one
    # ends; other launchers: in batches).
    n_jobs: int = 1
    # LoRA trials trained together in one process over one frozen base model; 1: each trial its
    # own run. > 1: trials that differ only in beta, loss.*, optimizer.lr, optimizer.weight_decay,
    # model.lora.r or model.lora.alpha share a process, up to this many; batches of pack x n_jobs.
    pack: int = 1
    # Trials of a pack that go through the model together in each forward pass. null: all of them
    # on a GPU (the weights read once for all: the speed-up); one at a time on a CPU, where the
    # products are compute-bound already and K trials' activations at once only cost memory.
    pack_forward: Optional[int] = None
    # null: the sweep folder's name. Rerunning with the same folder (hydra.sweep.dir) resumes.
    study_name: Optional[str] = None
    # null: a journal file <sweep folder>/optuna.journal. A file path: a journal there (shared
    # disk); a URL (postgresql://..., mysql://..., sqlite:///...): an Optuna RDB storage.
    storage: Optional[str] = None
    sampler: SamplerConf = field(default_factory=SamplerConf)
    pruner: PrunerConf = field(default_factory=PrunerConf)
    # The sweep stops (and fails) once more than this share of its trials have failed.
    max_failure_rate: float = 0.5
    # Search space in config, {key: override value}: {beta: "tag(log, interval(0.01, 1))"}.
    # Command-line overrides add to it and win for the same key.
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="dpo_optuna", node=DPOOptunaSweeperConf, provider="dpo_sweep")
