"""Several processes on one trial: `torchrun --nproc_per_node=N -m dpo_sweep ...`.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; the process group uses nccl on CUDA and gloo on
the CPU. Every rank sees the same batches in the same order and takes its share of each; only
rank 0 logs and writes files. With one process every function here is a no-op.
"""

from __future__ import annotations

import os
from typing import Dict

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: str) -> torch.device:
    """Join torchrun's process group (once); return this rank's device."""
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    if use_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return torch.device("cuda", local)
    return torch.device("cpu")


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def reduce_sums(sums: Dict[str, float], device: torch.device) -> Dict[str, float]:
    """Sum each value over the ranks."""
    if world_size() == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's `flag` on every rank, so that all take the same branch (a collective: every rank
    must call it). On the process group's own device: this rank's GPU under nccl, else the CPU."""
    if world_size() == 1:
        return flag
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1 if flag else 0], dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return bool(t.item())


def shard(indices: list, n_ranks: int, r: int) -> list:
    """This rank's share of a batch: every n-th pair, starting at its rank."""
    return indices[r::n_ranks]


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """FSDP (fully_shard, in place): each decoder layer is a unit, the rest is the root unit.
    Parameters become DTensors sharded over the ranks; gradients are reduce-scattered."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size(),))
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for layer in getattr(decoder, "layers", []):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)


def reshard(model: torch.nn.Module) -> None:
    """FSDP: drop the gathered weights that a forward without backward leaves behind (the root
    unit keeps them after forward for the backward to come). Called after no-grad forwards (the
    reference pass, eval): without it, a policy that computed its own reference log-probs before
    training trained on wrong weights from step 2 on (tests/test_distributed.py). No-op for a
    model that is not sharded."""
    if hasattr(model, "reshard"):
        model.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) value gathered whole on every rank; a plain tensor as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def full_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole state dict on the CPU (a collective under FSDP: every rank must call it)."""
    return {k: full_tensor(v).detach().cpu() for k, v in model.state_dict().items()}


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
