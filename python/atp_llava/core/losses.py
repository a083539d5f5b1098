"""Budget losses of ATP-LLaVA (paper Eq. 12-14, DESIGN §3.5) and the token accounting behind them.

The number of tokens an image keeps after an ATP layer is the sum of its cumulative mask over
its vision tokens (a token pruned early stays pruned, so the cumulative mask is what "remaining
tokens" means): with ATPConfig.budget "hard" the straight-through mask, whose value is the hard
count inference keeps; with "soft" (the paper) ``exp(key_bias)`` of the soft masks. All counts
are per image; a sample with several images counts the mean over its images, so
``target_tokens`` means tokens per image (per sample when each sample has one image).

Normalisation. Both budget terms are per sample: L_ATP is averaged over the samples that have
an image, and N_bar (hence L_target) is the mean over the samples of the batch one forward sees
(per device: the paper's N_bar is that of each forward's batch). A batch accumulated over
several forwards and processes (Hugging Face Trainer: gradient accumulation N, world size W)
weights each forward's budget term by its share of the accumulated batch (``budget_share``), so
that the sum over the N x W forwards is one mean, the way Trainer's ``num_items_in_batch`` makes
the next-token loss one mean over the accumulated batch's label tokens. The share is the
forward's samples with an image over the accumulated batch's (``SAMPLES_IN_BATCH``, passed by
``atp_llava.trainer.ATPTrainer``: exact per-sample weighting), else its label tokens over
``num_items_in_batch`` (plain Trainer: the same when the forwards hold equal tokens per image
sample). Then L_ATP and the next-token loss give the gradients of one process on the whole
batch; L_target does too while every forward's N_bar lies on the same side of the target, and
for "huber" more than ``target_delta`` from it (the loss is then linear in N_bar: the mean of
|N_bar_j - target| is |mean N_bar_j - target|), which holds until the budget is nearly reached;
after that it is the mean of every forward's own L_target.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .layout import VisionLayout

__all__ = ["tokens_per_layer", "n_bar", "atp_losses", "target_loss", "min_reachable_tokens", "budget_share",
           "budget_sums", "budget_error", "adapt_budget_weight", "PROGRESS", "RELAX",
           "SAMPLES_IN_BATCH"]

# The model's keyword argument: samples with an image in the whole accumulated batch (all forwards
# of one optimizer step, all processes), beside Trainer's num_items_in_batch.
SAMPLES_IN_BATCH = "atp_samples_in_batch"


def tokens_per_layer(kept: torch.Tensor, atp_layers: Sequence[int], num_layers: int,
                     full: Union[float, torch.Tensor]) -> torch.Tensor:
    """Vision tokens seen by every decoder layer.

    kept: (B, K) tokens per image kept after each of the K ATP layers (differentiable); full:
    the tokens per image before any pruning, a number or (B,) per sample.
    Returns (B, num_layers): ``full`` before the first ATP layer, then the count after the
    latest ATP layer at or before each decoder layer.
    """
    b = kept.shape[0]
    full = torch.as_tensor(full, dtype=kept.dtype, device=kept.device).expand(b)
    cols = []
    k = -1
    for j in range(num_layers):
        while k + 1 < len(atp_layers) and atp_layers[k + 1] <= j:
            k += 1
        cols.append(full if k < 0 else kept[:, k])
    return torch.stack(cols, dim=1)


def target_loss(n_bar: torch.Tensor, target_tokens: Union[float, torch.Tensor], kind: str = "l1",
                delta: float = 8.0) -> torch.Tensor:
    """L_target of Eq. 13: ``|n_bar - target|`` ("l1", the paper) or its Huber-smoothed form
    ("huber": ``0.5 x^2 / delta`` within ``delta`` tokens of the target, ``|x| - delta / 2``
    beyond, i.e. the same unit gradient as L1 away from the target and one that vanishes at it,
    so an Adam-driven threshold settles on the target instead of oscillating around it)."""
    if kind == "l1":
        return (n_bar - target_tokens).abs()
    if kind == "huber":
        return F.smooth_l1_loss(n_bar, torch.as_tensor(target_tokens, dtype=n_bar.dtype, device=n_bar.device),
                                beta=float(delta))
    raise ValueError(f"target_loss: kind must be 'l1' or 'huber', got {kind!r}")


def n_bar(kept: torch.Tensor, layout: VisionLayout, atp_layers: Sequence[int], num_layers: int
          ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N_bar of Eq. 13 from the (B, K) tokens per image kept after each ATP layer: (tokens seen by
    each decoder layer (B, num_layers), their mean per sample (B,), and that mean over the
    samples that have an image ()). Samples without an image count 0 and stay out of the mean."""
    weights = (layout.images_per_sample > 0).to(kept.dtype)
    per_layer = tokens_per_layer(kept, atp_layers, num_layers, layout.tokens_per_image.to(kept.dtype)) * weights[:, None]
    per_sample = per_layer.mean(1)
    return per_layer, per_sample, (per_sample * weights).sum() / weights.sum().clamp_min(1.0)


def atp_losses(kept: torch.Tensor, layout: VisionLayout, atp_layers: Sequence[int], num_layers: int,
               target_tokens: float, target_kind: str = "l1", target_delta: float = 8.0,
               target_ratio: Optional[float] = None) -> Dict[str, torch.Tensor]:
    """L_ATP (Eq. 12), N_bar and L_target (Eq. 13, ``target_loss``) of one batch.

    kept: (B, K) tokens per image kept after each ATP layer (per-sample mean over images).
    Samples without an image do not enter the averages. ``target_ratio`` (ATPConfig): each
    sample's target is that ratio of its images' mean token count instead of ``target_tokens``.

    Returns a dict of tensors:
        loss_atp    () sum_k (kept_k / N_vis) * i_k, averaged over samples (N_vis: the
                    sample's vision tokens per image, H * W for a fixed grid)
        n_bar       (B,) vision tokens per decoder layer, averaged over the layers
        n_bar_batch () n_bar averaged over the batch (the paper's "Token" column)
        target      () N_target of the batch (the mean of its samples' targets)
        loss_target () target_loss(n_bar_batch, target, target_kind, target_delta)
        per_layer   (B, num_layers) tokens seen by each decoder layer
    """
    has_image = layout.images_per_sample > 0
    weights = has_image.to(kept.dtype)
    n_samples = weights.sum().clamp_min(1.0)
    full = layout.tokens_per_image.to(kept.dtype)
    depth = torch.tensor([float(i) for i in atp_layers], dtype=kept.dtype, device=kept.device)
    loss_atp_sample = (kept / full.clamp_min(1.0)[:, None] * depth).sum(1)  # Eq. 12
    per_layer, n_bar_sample, n_bar_batch = n_bar(kept, layout, atp_layers, num_layers)
    if target_ratio is None:
        target = kept.new_tensor(float(target_tokens))
    else:
        target = (target_ratio * full * weights).sum() / n_samples
    return {
        "loss_atp": (loss_atp_sample * weights).sum() / n_samples,
        "n_bar": n_bar_sample,
        "n_bar_batch": n_bar_batch,
        "target": target,
        # 0 (and no gradient) for a batch without images; torch.where keeps it free of a host sync
        "loss_target": torch.where(has_image.any(), target_loss(n_bar_batch, target, target_kind, target_delta),
                                   n_bar_batch * 0.0),
        "per_layer": per_layer,
    }


def budget_share(layout: VisionLayout, labels: Optional[torch.Tensor], num_items_in_batch: Any = None,
                 samples_in_batch: Any = None) -> Optional[torch.Tensor]:
    """This forward's share of an accumulated batch's budget term (see the module docstring), or
    None when the forward is the whole batch (no ``num_items_in_batch``).

    samples_in_batch: samples with an image in the accumulated batch: the share is this forward's
        samples with an image over it. Needs ``num_items_in_batch`` (the next-token loss must be
        normalised over the same accumulated batch).
    num_items_in_batch: label tokens of the accumulated batch (Trainer's loss kwarg): without
        ``samples_in_batch`` the share is this forward's label tokens (``labels[..., 1:]`` not
        -100, the tokens the shifted next-token loss counts) over it.
    """
    if num_items_in_batch is None:
        if samples_in_batch is not None:
            raise ValueError(f"ATP-LLaVA: {SAMPLES_IN_BATCH} needs num_items_in_batch as well (the next-token loss "
                             "normalised over the same accumulated batch); got it alone")
        return None
    device = layout.pad_bias.device
    if samples_in_batch is not None:
        local = (layout.images_per_sample > 0).sum()
        total = samples_in_batch
    else:
        if labels is None:
            return None  # no next-token loss to share the normalisation with
        local = (labels[..., 1:] != -100).sum()
        total = num_items_in_batch
    total = torch.as_tensor(total, device=device).to(torch.float32).clamp_min(1.0)
    return local.to(device=device, dtype=torch.float32) / total


def budget_sums(n_bar_batch: torch.Tensor, target: torch.Tensor, layout: VisionLayout,
                share: Optional[torch.Tensor]) -> torch.Tensor:
    """(4,) float32: this forward's N_bar and target times its samples with an image, those
    samples, and its share of the accumulated batch (``budget_share``; 1 when it is the whole
    batch), summed over every process under torch.distributed (a collective: every rank calls
    it). Summed over the forwards of an optimizer step, the shares reach 1 and ``budget_error``
    of the sums is the relative error of the whole accumulated batch's N_bar."""
    from .distributed import is_distributed

    n = (layout.images_per_sample > 0).sum().to(torch.float32)
    one = torch.ones((), dtype=torch.float32, device=n.device)
    part = one if share is None else share.detach().to(torch.float32)
    distributed = is_distributed()
    if share is None and distributed:
        import torch.distributed as dist

        part = part / dist.get_world_size()  # each process holds 1 / W of the step's batch
    sums = torch.stack([n_bar_batch.detach().float() * n, target.detach().float() * n, n, part])
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(sums)
    return sums


def budget_error(sums: torch.Tensor) -> torch.Tensor:
    """() float32: ``(N_bar - N_target) / N_target`` of the samples ``sums`` (``budget_sums``)
    counts, 0 where none has an image."""
    n_bar_all, target_all, count = sums[0], sums[1], sums[2]
    return torch.where(count > 0, (n_bar_all - target_all) / target_all.clamp_min(1e-6), torch.zeros_like(count))


# ATPConfig.budget_control "constraint": the violation must fall by this factor per window, or the
# weight grows (the penalty method's test of progress); within the tolerance the weight relaxes by
# growth ** RELAX per window, a quarter of a growth step, so a weight the task needs is not lost
# in one window (the classic penalty methods never lower it).
PROGRESS = 0.75
RELAX = 0.25


@torch.no_grad()
def adapt_budget_weight(weight: torch.Tensor, violation: torch.Tensor, mean_error: float, floor: float,
                        growth: float, tolerance: float, cap: float = 1e4) -> None:
    """One window of ATPConfig.budget_control "constraint", in place. ``mean_error``: ``|e|`` of
    the mean relative error ``e`` (``budget_error``) of the window's optimizer steps;
    ``violation``: the previous window's (inf before the first). Within ``tolerance`` the weight is
    divided by ``growth ** RELAX`` (never below ``floor``, lambda_target); above it, multiplied by
    ``growth`` (never above ``floor * cap``) unless the error fell to ``PROGRESS`` times the
    previous window's or less: a weight that brings N_bar towards the target fast enough is kept,
    one that does not is raised, so it reaches what the next-token gradient needs in a number of
    windows that goes with that weight's logarithm. ``violation`` becomes ``mean_error``."""
    if mean_error <= tolerance:
        weight.div_(growth ** RELAX).clamp_(min=floor)
    elif mean_error > PROGRESS * float(violation):
        weight.mul_(growth).clamp_(max=floor * cap)
    violation.fill_(mean_error)


def min_reachable_tokens(atp_layers: Sequence[int], num_layers: int, n_grid: int, floor: int) -> float:
    """The smallest N_bar (Eq. 13) ATP layers at ``atp_layers`` can reach: every decoder layer
    before the first ATP layer sees all ``n_grid`` tokens, every later one at least ``floor``
    (ATPConfig.min_keep) per image."""
    first = atp_layers[0]
    return (first * n_grid + (num_layers - first) * min(floor, n_grid)) / num_layers
