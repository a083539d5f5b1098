"""Sharding an ATP model with FSDP2 (``torch.distributed.fsdp.fully_shard``).

    from atp_llava import shard_fsdp2
    shard_fsdp2(model)            # every decoder layer, model.atp and the root: one unit each

What the ATP model needs from FSDP2 is only that the ATP modules are a unit of their own or part
of the root: their parameters are read inside ``model.atp``'s forward alone, and every rank runs
them in the same order whatever its batch holds, so any wrapping of whole modules works. This is
the common one (FSDP2's per-layer all-gather, the root holding the embeddings, the vision tower
and the projector). The decoder layers are where the family's adapter says they are
(``ModelAdapter.language_model()``, DESIGN §9).
"""
from __future__ import annotations

from typing import Any

from torch import nn

from ..patch import get_atp_controller

__all__ = ["shard_fsdp2"]


def shard_fsdp2(model: nn.Module, **fully_shard_kwargs: Any) -> nn.Module:
    """``fully_shard`` every decoder layer, ``model.atp`` and then the root of an ATP model (in
    place; returns it), passing ``fully_shard_kwargs`` (mesh, mp_policy, reshard_after_forward,
    ...) to each call. Needs an initialised process group."""
    from torch.distributed.fsdp import fully_shard

    try:
        adapter = get_atp_controller(model).adapter
    except ValueError:
        raise TypeError(f"shard_fsdp2: expected an ATP model (atp_llava.apply_atp), "
                        f"got {type(model).__name__}") from None
    for layer in adapter.language_model().layers:
        fully_shard(layer, **fully_shard_kwargs)
    fully_shard(model.atp, **fully_shard_kwargs)
    fully_shard(model, **fully_shard_kwargs)
    return model
