"""Save and load the ATP module weights on their own (safetensors), to ship beside a base model.

The file holds ``model.atp.state_dict()`` (keys like ``mlps.4.proj.weight``, and
``budget_weight`` and ``budget_violation``, the state of ATPConfig.budget_control that
training resumes from) and, in
its metadata, the ATPConfig as JSON, so ``load_atp`` can rebuild the modules on a fresh stock
model.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Optional, Union

import torch
from torch import nn

from .core.config import ATPConfig
from .core.distributed import is_rank0

__all__ = ["save_atp", "load_atp", "read_atp_config"]

_CONFIG_KEY = "atp_config"
_FORMAT_KEY = "format"
_FORMAT = "atp_llava/4"
# Older files predate these ATPConfig fields and were trained with the choices of their time:
# format 1 with the paper's, format 2 with a fixed budget weight and unbounded threshold logits.
# Neither holds the budget buffers (added as lambda_target and inf when they load).
_FORMAT_2_DEFAULTS = {"budget_control": "penalty", "logit_bound": None}
_FORMAT_1_DEFAULTS = {"mlp_inputs": "raw", "budget": "soft", "min_keep": 0, "target_loss": "l1", **_FORMAT_2_DEFAULTS}
_OLD_FORMATS = {"atp_llava/1": _FORMAT_1_DEFAULTS, "atp_llava/2": _FORMAT_2_DEFAULTS, "atp_llava/3": {}}
# Formats 2 and 3 divided the "normalized" MLP inputs by the canvas's cell count; their first
# layer's weights on the scores are divided by it when they load, which computes the same
# thresholds from the [0, 1] inputs of today.
_INPUTS_PER_CELL = ("atp_llava/2", "atp_llava/3")


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A parameter as a whole tensor: FSDP2 shards (DTensor) are gathered."""
    full = getattr(t, "full_tensor", None)
    return full() if callable(full) else t


def _gathered(module: nn.Module):
    """A context in which DeepSpeed ZeRO-3's partitioned parameters of ``module`` are whole (a
    collective: every rank enters it); a no-op for other parameters."""
    params = [p for p in module.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def save_atp(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Write ``model.atp``'s parameters and its ATPConfig to ``path`` (.safetensors).

    Under torch.distributed only rank 0 writes. Sharded parameters (FSDP2's ``fully_shard``,
    DeepSpeed ZeRO-3's partitions) are gathered into whole tensors first, a collective: then
    every rank must call it (with replicated parameters, DDP, rank 0 alone may). The file loads
    into an unsharded model (``load_atp``)."""
    from safetensors.torch import save_file

    atp = getattr(model, "atp", None)
    if atp is None:
        atp = getattr(getattr(model, "module", None), "atp", None)  # a DeepSpeed engine / DDP
    if atp is None:
        raise ValueError("save_atp: the model has no ATP modules (apply_atp first)")
    with _gathered(atp):
        tensors = {k: _full_tensor(v).detach().to("cpu").clone().contiguous() for k, v in atp.state_dict().items()}
    if is_rank0():
        save_file(tensors, str(path), metadata={_CONFIG_KEY: atp.config.to_json(), _FORMAT_KEY: _FORMAT})


def _metadata(path: Union[str, os.PathLike]) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def _stored_config(path: Union[str, os.PathLike], meta: dict) -> ATPConfig:
    fmt = meta.get(_FORMAT_KEY)
    if (fmt != _FORMAT and fmt not in _OLD_FORMATS) or _CONFIG_KEY not in meta:
        raise ValueError(f"read_atp_config: {path} is not an atp_llava weights file (format {fmt!r})")
    fields = json.loads(meta[_CONFIG_KEY])
    return ATPConfig.from_dict({**_OLD_FORMATS.get(fmt, {}), **fields})


def read_atp_config(path: Union[str, os.PathLike]) -> ATPConfig:
    """The ATPConfig stored in an ATP weights file."""
    return _stored_config(path, _metadata(path))


def load_atp(model: nn.Module, path: Union[str, os.PathLike], config: Optional[ATPConfig] = None,
             strict: bool = True) -> nn.Module:
    """Load ATP weights into ``model``; returns the model.

    A stock model (no ``model.atp`` yet) is first turned into ATP-LLaVA with ``config`` or, if
    None, the config stored in the file. A model that already has ATP modules keeps its config.
    """
    from safetensors.torch import load_file

    from .patch import apply_atp

    meta = _metadata(path)
    if getattr(model, "atp", None) is None:
        apply_atp(model, config if config is not None else _stored_config(path, meta))
    device = next(model.atp.parameters(), next(model.parameters())).device
    state = load_file(str(path), device=str(device))
    if meta.get(_FORMAT_KEY) in _INPUTS_PER_CELL and _stored_config(path, meta).mlp_inputs == "normalized":
        for layer, mlp in model.atp.mlps.items():
            key = f"mlps.{layer}.proj.weight"
            scores = 2 * mlp.n_cells  # the columns of S_self and S_cross; the global features follow
            state[key] = torch.cat([state[key][:, :scores] / mlp.n_cells, state[key][:, scores:]], dim=1)
    if "budget_weight" not in state:  # formats 1 and 2: trained with the fixed weight
        state["budget_weight"] = torch.tensor(float(model.atp.config.lambda_target), device=device)
        state["budget_violation"] = torch.tensor(float("inf"), device=device)
    model.atp.load_state_dict(state, strict=strict)
    return model
