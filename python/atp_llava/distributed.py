"""Sharding an ATP model with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    from atp_llava.distributed import shard_fsdp2
    shard_fsdp2(model)            # every decoder layer, model.atp and the root: one unit each

What the ATP model needs from FSDP2 is only that the ATP modules are a unit of their own or part
of the root: their parameters are read inside ``model.atp``'s forward alone, and every rank runs
them in the same order whatever its batch holds, so any wrapping of whole modules works. This is
the common one (FSDP2's per-layer all-gather, the root holding the embeddings, the vision tower
and the projector).
"""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["shard_fsdp2", "is_distributed", "is_rank0"]


def is_distributed() -> bool:
    """torch.distributed is initialised with more than one process."""
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    """This process writes files: rank 0, or the only process."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def shard_fsdp2(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """``fully_shard`` every decoder layer, ``model.atp`` and then the root of an ATP model (in
    place; returns it), passing ``fully_shard_kwargs`` (mesh, mp_policy, reshard_after_forward,
    ...) to each call. Needs an initialised process group."""
    from torch.distributed.fsdp import fully_shard

    if getattr(model, "_atp_controller", None) is None:
        raise TypeError(f"shard_fsdp2: expected an ATP model (atp_llava.apply_atp), got {type(model).__name__}")
    for layer in model.model.language_model.layers:
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model.atp, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
