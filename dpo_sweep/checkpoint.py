"""Training checkpoints: one file with the model, optimizer and scheduler states, the RNG states,
the optimizer step and the train metrics logged so far. Written atomically (a crash while writing
leaves the previous checkpoint intact); read with `weights_only=True`, so loading one runs no code
from the file."""

from __future__ import annotations

import os
import random
from typing import Dict, List, Tuple

import torch

History = List[Dict[str, float]]  # train metrics, one dict an optimizer step


def rng_states() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save(path: str, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
         history: History) -> None:
    """Write everything training needs to go on from `step` to `path`, atomically."""
    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "history": history,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(path: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler) -> Tuple[int, History]:
    """Restore model, optimizer, scheduler and RNG states from `path`; return (step, history)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return state["step"], state["history"]
