"""Rank helpers: is this a multi-process run, and does this process write files. (Sharding with
FSDP2 is ``atp_llava.tools.fsdp.shard_fsdp2``.)"""
from __future__ import annotations

__all__ = ["is_distributed", "is_rank0"]


def is_distributed() -> bool:
    """torch.distributed is initialised with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    """This process writes files: rank 0, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

