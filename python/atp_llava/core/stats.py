"""What a full forward of an ATP model reports (DESIGN §3.5, §3.7): ``atp_stats`` and the live
budget terms of the loss (``forward_stats``), the budget weight's adaptation across forwards
(``BudgetWindow``, ATPConfig.budget_control "constraint"), and the output class that carries
both (``with_atp_fields``: the model's ModelOutput with ``atp_stats`` and ``atp_losses`` fields).
"""
from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .config import ATPConfig
from .efficiency import run_cost
from .layout import VisionLayout
from .losses import adapt_budget_weight, atp_losses, budget_error, budget_sums, n_bar
from .modules import ATPModules
from .state import ATPState

__all__ = ["forward_stats", "BudgetWindow", "element_bytes", "atp_output_type", "with_atp_fields"]


def forward_stats(state: ATPState, atp: ATPModules, config: ATPConfig, num_layers: int,
                  dims: Tuple[int, int, int, int], bytes_per_element: int, training: bool,
                  budget: BudgetWindow) -> Tuple[Dict[str, Any], torch.Tensor, Dict[str, torch.Tensor]]:
    """(atp_stats of a full forward (see apply_atp), the live budget term
    lambda_ATP L_ATP + w L_target (w: ``model.atp.budget_weight``), the live loss terms).

    ``state``: the forward's ATPState after every ATP layer ran; ``atp``, ``config``: the model's
    ATPModules and ATPConfig; ``num_layers``: its decoder depth; ``dims``: (hidden, ffn, kv_heads,
    head_dim) and ``bytes_per_element`` (``element_bytes``) of the efficiency accounting;
    ``training``: the model is in training mode; ``budget``: the model's BudgetWindow, stepped
    when the budget weight adapts (ATPConfig.budget_control "constraint")."""
    lay = state.layout
    k = len(config.layers)
    if len(state.kept) != k:
        raise RuntimeError(f"ATP-LLaVA: {len(state.kept)} of {k} ATP layers ran in this forward")
    kept, kept_soft, kept_hard = _per_sample_counts(lay, k, state.kept, state.kept_soft, state.kept_hard)
    losses = atp_losses(kept, lay, config.layers, num_layers, config.target_tokens, config.target_loss,
                        config.target_delta, config.target_ratio)
    # The N_bar of counts that are the budget losses' own (the same tensor: hard masks) is theirs.
    same_soft, same_hard = kept_soft is kept, kept_hard is kept
    kept_soft, kept_hard = kept_soft.detach(), kept_hard.detach()
    n_bar_soft = losses["n_bar_batch"].detach() if same_soft else n_bar(kept_soft, lay, config.layers, num_layers)[2]
    n_bar_hard = losses["n_bar_batch"].detach() if same_hard else n_bar(kept_hard, lay, config.layers, num_layers)[2]
    weight = atp.budget_weight.detach().clone()  # the value this forward's loss uses
    step_error = None
    if config.mode == "adaptive":
        # Eq. 14, with L_target's weight held by ATPConfig.budget_control (lambda_target when fixed)
        extra = config.lambda_atp * losses["loss_atp"] \
            + weight.to(losses["loss_target"].dtype) * losses["loss_target"]
        if config.budget_control == "constraint" and config.theta_override is None and training \
                and torch.is_grad_enabled():
            step_error = budget.step(atp, config, losses["n_bar_batch"], losses["target"], lay,
                                                   state.budget_share)
    else:  # no budget term (fixed keep counts)
        extra = lay.pad_bias.new_zeros(())
    if state.budget_share is not None:  # one micro-batch of an accumulated batch (Trainer)
        extra = extra * state.budget_share
    # the modules a batch without images ran on zero inputs (step.atp_step, adapter.null_vision), weight 0
    for term in state.null_terms:
        extra = extra + term
    stats: Dict[str, Any] = {
        "layers": config.layers,
        "tokens": kept.detach(),
        "tokens_soft": kept_soft,
        "tokens_hard": kept_hard,
        "n_bar_soft": n_bar_soft,
        "n_bar_hard": n_bar_hard,
        "budget_weight": weight,
        "budget_error": step_error,
        "tokens_per_layer": losses["per_layer"].detach(),
        "n_bar": losses["n_bar"].detach(),
        "n_bar_batch": losses["n_bar_batch"].detach(),
        "n_target": losses["target"].detach(),
        "loss_atp": losses["loss_atp"].detach(),
        "loss_target": losses["loss_target"].detach(),
        "budget_share": None if state.budget_share is None else state.budget_share.detach(),
        "images_per_sample": lay.images_per_sample,
        "image_sample": lay.image_sample,
        "hard": state.hard,
        "pruned": state.prune,
    }
    if state.keep_codes:
        stats["keep_codes"] = state.keep_codes
    n_vis = lay.vision_tokens
    real = (lay.pad_bias > float("-inf")).sum(1)  # isfinite in one op: pad_bias is 0 / -inf
    cost = run_cost(losses["per_layer"].detach() * lay.images_per_sample[:, None], real - n_vis, n_vis,
                    *dims, bytes_per_element=bytes_per_element)
    stats.update(cost)
    if state.theta_r:  # both in one (B, 2K) mean: the same values, column by column
        thetas = lay.per_sample_mean(torch.stack(state.theta_r + state.theta_s, 1)).detach()
        stats["theta_r"], stats["theta_s"] = thetas[:, :k], thetas[:, k:]
    live = {"loss_atp": losses["loss_atp"], "loss_target": losses["loss_target"],
            "n_bar_batch": losses["n_bar_batch"]}
    return stats, extra, live


def _per_sample_counts(lay: VisionLayout, k: int, *lists: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
    """(B, K) tokens per image of each list of K (I,) counts (the per-sample mean over its
    images). Lists that hold the very same tensors (the hard masks' counts: step.atp_step) give
    one and the same tensor; the others are averaged in one (B, n K) mean, which gives every
    column what it gives alone."""
    distinct: List[List[torch.Tensor]] = []
    which = []
    for counts in lists:
        j = next((i for i, d in enumerate(distinct) if len(d) == len(counts)
                  and all(a is b for a, b in zip(d, counts))), None)
        if j is None:
            j = len(distinct)
            distinct.append(counts)
        which.append(j)
    if not lay.num_images:
        means = [lay.per_sample_mean(lay.pad_bias.new_zeros(0, k)) for _ in distinct]
    elif len(distinct) == 1:
        means = [lay.per_sample_mean(torch.stack(distinct[0], 1))]
    else:
        both = lay.per_sample_mean(torch.stack([c for d in distinct for c in d], 1))
        means = list(both.split(k, dim=1))
    return tuple(means[j] for j in which)


class BudgetWindow:
    """The budget weight's adaptation state of one ATP model (ATPConfig.budget_control
    "constraint"): the counts of the running optimizer step's forwards and the errors of the
    running window's steps."""

    def __init__(self) -> None:
        self.sums: Optional[torch.Tensor] = None  # this optimizer step's forwards so far (losses.budget_sums)
        self.errors: List[torch.Tensor] = []  # the errors of this budget window's steps so far

    def step(self, atp: ATPModules, config: ATPConfig, n_bar_batch: torch.Tensor, target: torch.Tensor,
             lay: VisionLayout, share: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """ATPConfig.budget_control "constraint": the error of each optimizer step's batch, over
        every process; every ``budget_window`` steps, one step of the budget weight
        (``adapt_budget_weight``). The forwards of an accumulated batch (their shares,
        ``budget_share``, sum to 1) add their counts up; the last one ends the step. Returns the
        step's error (None until its batch is complete). The counts are the ones the budget
        losses see: the hard counts under the default ``budget="hard"``."""
        sums = budget_sums(n_bar_batch, target, lay, share)
        self.sums = sums if self.sums is None else self.sums + sums
        if share is not None and float(self.sums[3]) < 1.0 - 1e-4:  # more forwards of this step to come
            return None
        sums, self.sums = self.sums, None
        error = budget_error(sums)
        self.errors.append(error)
        if len(self.errors) >= config.budget_window:
            # the window's mean error: its steps' noise averages out, a bias on either side stays
            mean_error = float(torch.stack(self.errors).mean().abs())
            self.errors = []
            adapt_budget_weight(atp.budget_weight, atp.budget_violation, mean_error, config.lambda_target,
                                config.weight_growth, config.budget_tolerance)
        return error


def element_bytes(model: nn.Module) -> int:
    """Bytes of one KV-cache element: the model's dtype."""
    dtype = model.lm_head.weight.dtype if hasattr(model, "lm_head") else torch.float32
    return torch.finfo(dtype).bits // 8


_ATP_OUTPUT_TYPES: Dict[type, type] = {}


def atp_output_type(cls: type) -> type:
    """The ModelOutput dataclass ``cls`` with two more fields, ``atp_stats`` and ``atp_losses``
    (one subclass per output class, made once: transformers registers every ModelOutput
    subclass as a torch pytree node, so DDP and torch.compile see the fields)."""
    if cls not in _ATP_OUTPUT_TYPES:
        if any(f.name == "atp_stats" for f in dataclasses.fields(cls)):
            _ATP_OUTPUT_TYPES[cls] = cls
        else:
            fields = [("atp_stats", Optional[Dict[str, Any]], field(default=None)),
                      ("atp_losses", Optional[Dict[str, torch.Tensor]], field(default=None))]
            sub = dataclasses.make_dataclass(f"ATP{cls.__name__}", fields, bases=(cls,))
            sub.__module__ = __name__
            sub.__doc__ = f"{cls.__name__} with ATP-LLaVA's ``atp_stats`` and ``atp_losses``."
            _ATP_OUTPUT_TYPES[cls] = sub
    return _ATP_OUTPUT_TYPES[cls]


def with_atp_fields(output, atp_stats: Dict[str, Any], atp_losses: Dict[str, torch.Tensor]):
    """``output`` (a ModelOutput) as its ATP subclass, with the two fields set."""
    cls = atp_output_type(type(output))
    values = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    values.update(atp_stats=atp_stats, atp_losses=atp_losses)
    return cls(**values)
