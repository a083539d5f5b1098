"""Optimizer parameter groups of ATP-LLaVA training: the ATP modules and the language model.

    from atp_llava.core.optim import param_groups
    opt = torch.optim.AdamW(param_groups(model, lr_atp=1e-3, lr_lm=2e-5))

The ATP modules (``model.atp``: threshold MLPs, a few thousand parameters learning where the
thresholds sit) and the LLaVA weights (``ATPConfig.train_lm``) want very different step sizes,
so they get a group each; frozen parameters are left out.
"""
from __future__ import annotations

from typing import Any, Dict, List

from torch import nn

__all__ = ["param_groups", "DEFAULT_LR_ATP", "DEFAULT_LR_LM"]

DEFAULT_LR_ATP = 1e-3  # the threshold MLPs (model.atp), with ATPConfig.mlp_inputs="normalized" (scores in [0, 1])
DEFAULT_LR_LM = 2e-5   # LLaVA-1.5's instruction-tuning learning rate (ATPConfig.train_lm)

_ATP_PREFIX = "atp."


def param_groups(model: nn.Module, lr_atp: float = DEFAULT_LR_ATP, lr_lm: float = DEFAULT_LR_LM,
                 weight_decay: float = 0.0) -> List[Dict[str, Any]]:
    """Parameter groups for a torch optimizer: ``{"name": "atp", "params": [...], "lr": lr_atp,
    "weight_decay": weight_decay}`` for the ATP modules and ``{"name": "lm", ...}`` with
    ``lr_lm`` for every other trainable parameter; only parameters that require a gradient, and
    only groups that have any (a frozen LM gives the ATP group alone).

    ``model`` is an ATP model (``apply_atp``) or a DistributedDataParallel around one.
    Raises ValueError when nothing requires a gradient.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    atp: List[nn.Parameter] = []
    lm: List[nn.Parameter] = []
    for name, p in inner.named_parameters():
        if p.requires_grad:
            (atp if name.startswith(_ATP_PREFIX) else lm).append(p)
    groups = [{"name": name, "params": params, "lr": lr, "weight_decay": weight_decay}
              for name, params, lr in (("atp", atp, lr_atp), ("lm", lm, lr_lm)) if params]
    if not groups:
        raise ValueError("param_groups: no parameter of the model requires a gradient; ATPConfig(mode='fixed' or "
                         "'fastv') has no ATP parameters and a frozen LM none either: use train_lm=True "
                         "(--train-lm), or mode='adaptive'")
    return groups
