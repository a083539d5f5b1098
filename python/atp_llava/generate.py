"""``model.generate`` of an ATP model (DESIGN §8): the stock one, with the prompt known to the
hooks (``ATPController.prompt_len`` / ``prompt_inputs``: generated tokens never steer pruning)
and the call's efficiency report left in ``model.atp_report``. ``apply_atp`` installs it as the
model's ``generate``; the hooks of patch.py read and fill the controller's fields it sets.
"""
from __future__ import annotations

import torch
from torch import nn

from .core.efficiency import kv_bytes_per_token
from .core.stats import element_bytes

__all__ = ["atp_generate"]


def atp_generate(ctrl, model: nn.Module, stock_generate, *args, **kwargs):
    """``model.generate`` of the ATP model ``model`` whose controller is ``ctrl`` (patch.py's
    ``ATPController``, not imported here: patch.py imports this module);
    ``stock_generate`` is the model's own ``generate``. Beam search and assisted decoding reorder
    or fork the cache, which the pruned per-layer cache does not follow: refused.

    Under FSDP2 (``fully_shard(model)``) the first call registers ``generate`` as an FSDP
    forward method (``register_fsdp_forward_method``), so the root's parameters are gathered
    around it as around ``forward``."""
    if not ctrl.fsdp_generate and _is_fsdp2_root(model):
        from torch.distributed.fsdp import register_fsdp_forward_method

        register_fsdp_forward_method(model, "generate")  # wraps this very wrapper
        ctrl.fsdp_generate = True
        return model.generate(*args, **kwargs)
    gen_config = kwargs.get("generation_config") or model.generation_config
    for name in ("num_beams", "num_beam_groups"):
        value = kwargs.get(name, getattr(gen_config, name, 1))
        if value is not None and value > 1:
            raise NotImplementedError(f"ATP-LLaVA generate(): {name}={value} is not supported (greedy and "
                                      "sampling are)")
    for name in ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha"):
        if kwargs.get(name, getattr(gen_config, name, None)) is not None:
            raise NotImplementedError(f"ATP-LLaVA generate(): {name} is not supported (greedy and sampling are)")
    input_ids = kwargs.get("input_ids", args[0] if args else None)
    if input_ids is None:
        raise ValueError("ATP-LLaVA generate() needs input_ids")
    ctrl.prompt_len = int(input_ids.shape[1])
    ctrl.prompt_inputs = {name: kwargs[name] for name in ctrl.adapter.layout_inputs if kwargs.get(name) is not None}
    ctrl.call_report = None
    try:
        out = stock_generate(*args, **kwargs)
    finally:
        ctrl.prompt_len = None
        ctrl.prompt_inputs = {}
    report, ctrl.call_report = ctrl.call_report, None
    if report is not None:
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        _, _, kv_heads, head_dim = ctrl.dims
        per_token = kv_bytes_per_token(kv_heads, head_dim, element_bytes(model))
        object.__setattr__(model, "atp_report", report.with_generated(sequences.shape[1] - input_ids.shape[1],
                                                                       per_token))
    return out


def _is_fsdp2_root(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(model, FSDPModule)
