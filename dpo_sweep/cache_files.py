"""The files under `outputs/cache/` (SFT weights, reference log-probs, reference samples): written
atomically, each with a sidecar `<file>.sha256` holding the file's sha256 and size, and checked
against it before use.

Tensors are stored as safetensors and samples as JSON, so reading a cache file never runs code,
whoever wrote it. A file that is missing its sidecar, truncated, altered or unreadable is not
used: a warning names it and the caller computes the contents again and overwrites it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

if TYPE_CHECKING:  # torch is not imported here: the sweeper checks checkpoints without it
    import torch

log = logging.getLogger(__name__)

SIDECAR = ".sha256"
# Every cache file this process wrote, in order: a run reports those it built (its duration then
# covers building them; the runs that load them take far less).
WRITTEN: List[str] = []


def sha256_of(path: str) -> str:
    """The sha256 of a file's bytes (cache files here, checkpoints in dpo_sweep/checkpoint.py)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _digest(path: str) -> Dict[str, Any]:
    return {"sha256": sha256_of(path), "size": os.path.getsize(path)}


def _write(path: str, write: Callable[[str], None]) -> None:
    """`write(tmp)`, then the sidecar, then both moved into place. A reader that finds the file
    without its matching sidecar treats it as corrupt and recomputes it: never wrong, only slower."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    write(tmp)
    side_tmp = f"{path}{SIDECAR}.{os.getpid()}.tmp"
    with open(side_tmp, "w") as f:
        json.dump(_digest(tmp), f)
    os.replace(tmp, path)  # atomic: parallel trials never read a half-written file
    os.replace(side_tmp, path + SIDECAR)
    WRITTEN.append(path)


def kind(path: str) -> str:
    """What a cache file holds, by its name: `sft`, `reflogps`, `refsamples`."""
    return os.path.basename(path).split("-", 1)[0]


def verified(path: str, what: str) -> bool:
    """Whether `path` exists and matches its sidecar; a warning naming it when it exists and does not."""
    if not os.path.exists(path):
        return False
    try:
        with open(path + SIDECAR) as f:
            expected = json.load(f)
        actual = _digest(path)
    except (OSError, ValueError) as e:
        log.warning("%s cache %s has no readable checksum (%s): computing it again", what, path, e)
        return False
    if actual != {k: expected.get(k) for k in actual}:
        log.warning("%s cache %s does not match its checksum (size %d, expected %s): it is corrupt or was "
                    "altered; computing it again", what, path, actual["size"], expected.get("size"))
        return False
    return True


def save_tensors(path: str, tensors: Dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _write(path, lambda tmp: save_file(_untied(state), tmp))


def load_tensors(path: str, what: str, device: str = "cpu") -> Optional[Dict[str, torch.Tensor]]:
    """The tensors of a verified cache file, or None (missing, corrupt: compute them again)."""
    from safetensors.torch import load_file

    if not verified(path, what):
        return None
    try:
        return load_file(path, device=device)
    except Exception as e:  # a safetensors header that does not parse, though the checksum matched
        log.warning("%s cache %s is unreadable (%s): computing it again", what, path, e)
        return None


def save_json(path: str, obj: Any) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(obj, f)

    _write(path, write)


def load_json(path: str, what: str) -> Optional[Any]:
    """The contents of a verified JSON cache file, or None (missing, corrupt: compute them again)."""
    if not verified(path, what):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError as e:
        log.warning("%s cache %s is unreadable (%s): computing it again", what, path, e)
        return None


def _untied(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied embeddings): give each its own copy."""
    seen, out = set(), {}
    for k, v in state.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.add(ptr)
    return out
