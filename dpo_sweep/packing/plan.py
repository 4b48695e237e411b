"""Which trials can share a process (`hydra.sweeper.pack`): LoRA trials over the same frozen base
model, trained on the same data in the same order, may differ only in what their adapters and
losses see: `PACKABLE_KEYS`. Where a trial reports, logs and resumes (`FREE_KEYS`) may differ
too. Every other key must be equal within a pack, and a trial that cannot be packed at all
(`why_not_packable`) runs alone.

Pure: configs in, indices and reasons out; no torch, no I/O.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from dpo_sweep.config import ConfigError

# Config keys whose values may differ within a pack: each trial's adapter, optimizer group and loss.
PACKABLE_KEYS = ("beta", "optimizer.lr", "optimizer.weight_decay", "model.lora.r", "model.lora.alpha")
PACKABLE_PREFIXES = ("loss.",)  # every loss key: name, label_smoothing, length_normalize
# Config keys that say where a trial reports and logs and how it resumes, not what it trains
# (as checkpoint.RESUME_FREE_KEYS, but `train.device`: a pack runs on one device).
FREE_KEYS = ("train.resume", "train.resume_override", "train.progress")
FREE_PREFIXES = ("sweep.", "tracking.")
PACKABLE_TEXT = ", ".join([*PACKABLE_KEYS[:1], "loss.*", *PACKABLE_KEYS[1:]])
MISSING = "<unset>"

Flat = Dict[str, Any]
Signature = Tuple[Tuple[str, Any], ...]


def is_packable(key: str) -> bool:
    """Whether `key` may take different values within a pack."""
    return key in PACKABLE_KEYS or key.startswith(PACKABLE_PREFIXES)


def is_free(key: str) -> bool:
    """Whether `key` says only where a trial reports, logs or resumes."""
    return key in FREE_KEYS or key.startswith(FREE_PREFIXES)


def why_not_packable(cfg: DictConfig) -> Optional[str]:
    """Why a trial of config `cfg` cannot share a process with any other trial; None if it can."""
    blocker = _blocker(flatten(cfg))
    return blocker[2] if blocker else None


def signature(cfg: DictConfig) -> Signature:
    """What two trials must share to be packed: the config as sorted `(dotted key, value)`
    pairs, without the packable and free keys; hashable."""
    return _signature(flatten(cfg))


def differing_keys(cfgs: Sequence[DictConfig]) -> List[str]:
    """The packable keys whose values differ among `cfgs` (the trials of one pack), sorted."""
    flats = [flatten(c) for c in cfgs]
    keys = sorted({k for flat in flats for k in flat if is_packable(k)})
    return [k for k in keys if len({_show(flat.get(k, MISSING)) for flat in flats}) > 1]


def plan_packs(cfgs: Sequence[DictConfig], size: int,
               numbers: Optional[Sequence[int]] = None) -> Tuple[List[List[int]], List[Tuple[int, str]]]:
    """Group a batch's trials (their configs `cfgs`, in asking order) into packs of 2 to `size`
    trials with equal signatures. Returns the packs (indices into `cfgs`, in order, the first
    index of each its leader) and the singles, each `(index, why it runs alone)`. `numbers` are
    the trials' numbers named in the reasons (default: the indices)."""
    if size < 1:
        raise ValueError(f"pack size {size}: expected >= 1")
    numbers = list(range(len(cfgs))) if numbers is None else list(numbers)
    flats = [flatten(c) for c in cfgs]
    reasons: Dict[int, str] = {}
    groups: Dict[Signature, List[int]] = {}
    for i, flat in enumerate(flats):
        blocker = _blocker(flat)
        if blocker:
            reasons[i] = blocker[2]
        else:
            groups.setdefault(_signature(flat), []).append(i)
    packs: List[List[int]] = []
    if size == 1:
        reasons.update({i: "hydra.sweeper.pack=1: one trial a process" for g in groups.values() for i in g})
        groups = {}
    for members in groups.values():
        chunks = [members[k:k + size] for k in range(0, len(members), size)]
        packs += [chunk for chunk in chunks if len(chunk) > 1]
        if len(chunks[-1]) == 1 and len(members) > 1:
            reasons[chunks[-1][0]] = (f"the pack of trials {label([numbers[i] for i in chunks[-2]])} is full "
                                      f"(hydra.sweeper.pack={size})")
    packed = {i: pack for pack in packs for i in pack}
    for members in groups.values():
        if len(members) == 1:
            reasons[members[0]] = _apart(members[0], flats, [j for g in groups.values() for j in g], packed, numbers)
    return sorted(packs), sorted(reasons.items())


def check_pack(cfgs: Sequence[DictConfig]) -> None:
    """Raise ConfigError, naming the key, unless the trials of configs `cfgs` can share a process."""
    flats = [flatten(c) for c in cfgs]
    numbers = [i if flat.get("sweep.trial_number") is None else flat["sweep.trial_number"]
               for i, flat in enumerate(flats)]
    for flat, number in zip(flats, numbers):
        blocker = _blocker(flat)
        if blocker:
            key, value, reason = blocker
            where = f"config key '{key}' = {value}: " if key else ""
            raise ConfigError(f"{where}trial {number} cannot be packed: {reason}")
    for flat, number in zip(flats[1:], numbers[1:]):
        keys = _differences(flats[0], flat)
        if keys:
            key = keys[0]
            raise ConfigError(f"config key '{key}' = {_show(flat.get(key, MISSING))} in trial {number} but "
                              f"{_show(flats[0].get(key, MISSING))} in trial {numbers[0]}: the trials of a pack may "
                              f"differ only in {PACKABLE_TEXT}")


def label(numbers: Sequence[int]) -> str:
    """`0-3` for a run of consecutive numbers, else `0,2,5`."""
    numbers = list(numbers)
    if len(numbers) > 2 and numbers == list(range(numbers[0], numbers[0] + len(numbers))):
        return f"{numbers[0]}-{numbers[-1]}"
    return ",".join(map(str, numbers))


def flatten(cfg: DictConfig) -> Flat:
    """The job config (without Hydra's own `hydra` node), resolved, as dotted keys; lists and
    dicts inside lists as tuples, so that values compare and hash."""
    if isinstance(cfg, DictConfig) and "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg
    out: Flat = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        else:
            out[prefix] = _frozen(node)

    walk(container, "")
    return out


# ---------------------------------------------------------------------------- helpers


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((str(k), _frozen(v)) for k, v in value.items()))
    return value


def _show(value: Any) -> str:
    """A value as it is written on the command line: true, null, [1,2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if value is None:
        return "null"
    if isinstance(value, tuple):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _blocker(flat: Flat) -> Optional[Tuple[Optional[str], str, str]]:
    """`(config key, value, reason)` of the first setting that keeps a trial out of any pack (the
    key None for torchrun's environment); None if there is none."""
    get = flat.get
    if get("model.lora.enabled") is not True:
        return ("model.lora.enabled", _show(get("model.lora.enabled")),
                "packing trains LoRA adapters over a frozen base: set model.lora.enabled=true")
    if get("trainer", "dpo_sweep") != "dpo_sweep":
        return ("trainer", _show(get("trainer")), "packed trials train in dpo_sweep's own loop: set trainer=dpo_sweep")
    if get("train.fsdp"):
        return ("train.fsdp", "true", "a pack trains in one process on one device: set train.fsdp=false")
    if (get("model.lora.dropout") or 0) > 0:
        return ("model.lora.dropout", _show(get("model.lora.dropout")),
                "random dropout masks: a packed trial would not reproduce alone; set model.lora.dropout=0")
    world = os.environ.get("WORLD_SIZE", "1")
    if world.isdigit() and int(world) > 1:
        return (None, world, f"launched under torchrun (WORLD_SIZE={world}): a pack trains in one process")
    return None


def _signature(flat: Flat) -> Signature:
    return tuple(sorted((k, v) for k, v in flat.items() if not (is_packable(k) or is_free(k))))


def _differences(a: Flat, b: Flat) -> List[str]:
    """The keys, neither packable nor free, whose values differ between `a` and `b`, sorted."""
    keys = sorted(k for k in set(a) | set(b) if not (is_packable(k) or is_free(k)))
    return [k for k in keys if a.get(k, MISSING) != b.get(k, MISSING)]


def _apart(i: int, flats: Sequence[Flat], packable: Sequence[int], packed: Dict[int, List[int]],
           numbers: Sequence[int]) -> str:
    """Why trial `i` (packable, with a signature of its own) runs alone: the keys in which it
    differs from the nearest packable trial of the batch, or that there is none."""
    others = [j for j in packable if j != i]
    if not others:
        return "no other trial of this batch can be packed"
    diffs = {j: _differences(flats[i], flats[j]) for j in others}
    j = min(others, key=lambda o: (len(diffs[o]), o))
    shown = ", ".join(f"{k}: {_show(flats[i].get(k, MISSING))} vs {_show(flats[j].get(k, MISSING))}"
                      for k in diffs[j][:2])
    more = f" and {len(diffs[j]) - 2} more" if len(diffs[j]) > 2 else ""
    if j in packed:
        return f"it differs from the pack of trials {label([numbers[o] for o in packed[j]])} in {shown}{more}"
    for key in diffs[j]:
        mine = flats[i].get(key, MISSING)
        if all(flats[o].get(key, MISSING) != mine for o in range(len(flats)) if o != i):
            return f"no other trial of this batch shares its {key}={_show(mine)}"
    return f"it differs from trial {numbers[j]} in {shown}{more}"
