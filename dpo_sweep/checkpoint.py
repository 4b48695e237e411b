"""Training checkpoints: one file with the model, optimizer and scheduler states, the RNG states,
the optimizer step and the train metrics logged so far, and beside it a small manifest
(`checkpoint.json`: the file's size and sha256, the step, and the run's settings).

Written atomically (a crash while writing leaves the previous checkpoint intact); verified
against its manifest before use, so a truncated or damaged file is an error naming it, never
weights read in silence; read with `weights_only=True`, so loading one runs no code from the file.
A save renames the file, then its manifest, into place; cut between the two, it leaves the new
file beside the new manifest's temporary file, which `verify` then puts in place.

torch is imported only by the functions that need it: the sweeper verifies checkpoints without it.
"""

from __future__ import annotations

import json
import os
import random
from typing import Any, Dict, List, Optional, Tuple

from dpo_sweep import cache_files

History = List[Dict[str, float]]  # train metrics, one dict an optimizer step
Settings = Dict[str, str]  # the run's config as dotted keys, values as text (tracking.flatten)
MANIFEST_VERSION = 1
# Config keys that may differ between a run and its resumption: where it runs, reports and logs.
RESUME_FREE_KEYS = ("train.resume", "train.resume_override", "train.progress", "train.device")
RESUME_FREE_PREFIXES = ("tracking.", "sweep.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (truncated, damaged, unreadable); the message names it."""


def rng_states() -> dict:
    import torch

    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_states(states: dict) -> None:
    import torch

    torch.set_rng_state(states["torch"])
    random.setstate(states["python"])
    if states["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def manifest_file(path: str) -> str:
    """The manifest beside the checkpoint `path`: checkpoint.pt -> checkpoint.json."""
    return os.path.splitext(path)[0] + ".json"


def resume_settings(flat: Settings) -> Settings:
    """The settings a resumed run must share with its checkpoint: `flat` without the keys that
    may differ (RESUME_FREE_KEYS and _PREFIXES; also the ones that can hold a store's password)."""
    return {k: v for k, v in flat.items() if k not in RESUME_FREE_KEYS and not k.startswith(RESUME_FREE_PREFIXES)}


def settings_diff(saved: Settings, current: Settings) -> List[str]:
    """`key: old -> new` for each setting that differs between a checkpoint and this run, sorted."""
    missing = "<unset>"
    return [f"{k}: {saved.get(k, missing)} -> {current.get(k, missing)}"
            for k in sorted(set(saved) | set(current)) if saved.get(k, missing) != current.get(k, missing)]


def _write_synced(path: str, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename that publishes it


def save(path: str, step: int, model, optimizer, scheduler, history: History,
         settings: Optional[Settings] = None) -> None:
    """Write everything training needs to go on from `step` to `path`, atomically, and its
    manifest (size, sha256, step and the run's `settings`) beside it."""
    import torch

    state = {
        "step": step,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_states(),
        "history": history,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp, manifest, manifest_tmp = f"{path}.tmp", manifest_file(path), f"{manifest_file(path)}.tmp"
    _write_synced(tmp, lambda f: torch.save(state, f))
    record = {"version": MANIFEST_VERSION, "file": os.path.basename(path), "size": os.path.getsize(tmp),
              "sha256": cache_files.sha256_of(tmp), "step": step,
              "settings": None if settings is None else resume_settings(settings)}
    _write_synced(manifest_tmp, lambda f: f.write(json.dumps(record, indent=1).encode()))
    os.replace(tmp, path)
    os.replace(manifest_tmp, manifest)


def _read_record(path: str, manifest: str) -> Dict[str, Any]:
    try:
        with open(manifest) as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its manifest {manifest} is unreadable "
                              f"({type(e).__name__}: {e})") from e
    if not (isinstance(record, dict) and {"size", "sha256", "step"} <= set(record)):
        raise CheckpointError(f"checkpoint {path}: its manifest {manifest} lacks size, sha256 or step")
    return record


def _mismatch(path: str, record: Dict[str, Any]) -> Optional[str]:
    """Why the file `path` is not the one `record` describes; None when it is."""
    try:
        size = os.path.getsize(path)
        if size != record["size"]:
            return f"checkpoint {path} is {size} bytes, {record['size']} when it was written: truncated or damaged"
        if cache_files.sha256_of(path) != record["sha256"]:
            return f"checkpoint {path} does not match the sha256 recorded when it was written: damaged"
    except OSError as e:
        return f"checkpoint {path} cannot be read ({type(e).__name__}: {e})"
    return None


def verify(path: str) -> Optional[Dict[str, Any]]:
    """Check the checkpoint `path` against its manifest (size, then sha256); return the
    manifest, or None for a checkpoint written without one (by an earlier version). A mismatch,
    or a file or manifest that cannot be read, is a CheckpointError naming the file. A save cut
    between its two renames left the new file beside the new manifest's temporary file: that
    manifest is then put in place, and the checkpoint is intact."""
    manifest = manifest_file(path)
    candidates = [m for m in (manifest, f"{manifest}.tmp") if os.path.exists(m)]
    if not candidates:
        return None
    reasons = []
    for candidate in candidates:
        record = _read_record(path, candidate)
        reason = _mismatch(path, record)
        if reason is None:
            if candidate != manifest:
                os.replace(candidate, manifest)
            return record
        reasons.append(reason)
    raise CheckpointError(reasons[0])


def saved_settings(record: Optional[Dict[str, Any]]) -> Optional[Settings]:
    """The settings a checkpoint's run was started with, from its manifest `record` (`verify`);
    None when it recorded none."""
    return None if record is None else record.get("settings")


def _torch_load(path: str, mmap: bool = False) -> dict:
    """The checkpoint's contents; any failure to read it is a CheckpointError naming it."""
    import torch

    try:
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)
    except Exception as e:  # a truncated zip, a bad pickle, a tensor of an unsafe type
        reason = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(e).__name__}: {reason})") from e


def verified_step(path: str) -> int:
    """The step of the checkpoint `path` once it is verified (`verify`); one written without a
    manifest is checked by reading it (its tensors mapped, not read). CheckpointError if unusable."""
    record = verify(path)
    if record is not None:
        return int(record["step"])
    return int(_torch_load(path, mmap=True)["step"])


def load(path: str, model, optimizer, scheduler, verified: bool = False) -> Tuple[int, History]:
    """Verify the checkpoint `path` (unless `verified` already), then restore model, optimizer,
    scheduler and RNG states from it; return (step, history)."""
    if not verified:
        verify(path)
    state = _torch_load(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_states(state["rng"])
    return state["step"], state["history"]
