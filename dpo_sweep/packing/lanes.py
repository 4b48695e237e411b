"""A packed trial (a lane): its settings, adapter, optimizer, progress and outcome; and the live
reference that the lanes of a pack share."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig

from dpo_sweep.packing.lora import LaneView
from dpo_sweep.trainer import DPOObjective, EvalCallback

Tensor = torch.Tensor
LaneLogps = Tuple[Tensor, Tensor]  # one lane's (logps (2B,), counts (2B,)), chosen first


@dataclass
class Lane:
    """One trial of the pack: what it trains with and how far it got."""

    cfg: DictConfig
    name: str  # its adapter
    label: str  # "trial 5", for the log
    objective: DPOObjective
    params: List[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    log_metrics: Callable[[Dict[str, float], int], None]
    on_eval: List[EvalCallback]
    gen_eval: object = None  # a gen_eval.GenEvaluator of its own (the reference samples shared)
    step: int = 0
    history: List[Dict[str, float]] = field(default_factory=list)
    checkpoint_dir: Optional[str] = None
    error: Optional[BaseException] = None  # why it left the pack (TrialStopped: pruned)
    metrics: Dict[str, float] = field(default_factory=dict)  # final: last train and final eval metrics
    finished: bool = False

    @property
    def running(self) -> bool:
        return self.error is None and not self.finished

    def view(self, model: torch.nn.Module) -> LaneView:
        return LaneView(model, self.name)


class OncePerBatch:
    """A live reference shared by the lanes: its log-probs of a batch are computed once, for the
    first lane that asks, and handed to the others."""

    def __init__(self, reference):
        self.reference, self._key, self._out = reference, None, None

    def logps(self, batch: Dict[str, Tensor], split: str, idx: Sequence[int]):
        key = (split, tuple(idx))
        if key != self._key:
            self._key, self._out = key, self.reference.logps(batch, split, idx)
        return self._out
