"""The learnable part of ATP-LLaVA: one threshold MLP per ATP layer (paper Eq. 6-8, DESIGN §3.4)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn

import atp_ops

from .config import ATPConfig
from .layout import VisionLayout
from .spatial import SpatialScores

__all__ = ["ThresholdMLP", "ATPModules", "bounded_logit"]


class _InwardClamp(torch.autograd.Function):
    """clamp(x, -b, b) whose gradient passes where x is inside; where x is past a bound, only the
    part that points back inside passes, plus the gradient of ``(|x| - b)^2 / 2``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, bound: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.bound = bound
        return x.clamp(-bound, bound)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        b = ctx.bound
        over, under = x > b, x < -b
        inward = torch.where(over, grad.clamp_min(0), torch.where(under, grad.clamp_max(0), grad))
        excess = torch.where(over, x - b, torch.where(under, x + b, torch.zeros_like(x)))
        return inward + excess, None


def bounded_logit(x: torch.Tensor, bound: Optional[float]) -> torch.Tensor:
    """A threshold's pre-sigmoid logit held in [-bound, bound] (ATPConfig.logit_bound; None: as is).

    A plain clamp has no gradient past its bound and a plain sigmoid none once it rounds to 0 or 1,
    so a threshold driven to its limit would stay there. Here the forward is the clamp and the
    backward passes every gradient inside the bound; at or past it, only the gradient that points
    back inside, so the threshold leaves its limit as soon as the loss asks, at the rate
    sigmoid'(bound) of the logit, and no gradient pushes it further out. Only an optimizer's
    momentum carries a logit past the bound; there the backward adds the gradient of
    ``(|x| - bound)^2 / 2``, which turns the momentum back before the excess grows."""
    return x if bound is None else _InwardClamp.apply(x, float(bound))


class ThresholdMLP(nn.Module):
    """``z = Linear(cat(s_self, s_cross[, globals]))``, ``theta_r = sigmoid(Linear_r(z))``,
    ``theta_s = sigmoid(Linear_s(z))`` (Eq. 6-8).

    The input has a fixed size whatever the image: the scores are laid out on a canvas of
    ``n_cells`` cells (pruned tokens hold 0). An image on the canvas's own grid (LLaVA-1.5's
    24 x 24) is laid out as it is, one token per cell; any other (ragged grids, LLaVA-NeXT's
    tiles, video frames) is resampled to it by masked average pooling: each cell holds the mean
    over the kept tokens that fall in it (``cell``, ATPModules.cells), 0 where none does.
    ``n_globals`` more inputs (ATPModules.globals: log token count, aspect ratio, kept fraction)
    follow for families whose images differ in size. ``logit_bound`` (ATPConfig.logit_bound):
    the heads' logits pass ``bounded_logit`` before the sigmoid. ``inputs`` (ATPConfig.mlp_inputs):
    "normalized" min-max normalises each score over the image's kept tokens first
    (``atp_ops.normalize_scores``) to [0, 1], so the input does not change when the LM's logits
    are 100x larger; "raw" feeds the scores as they are (the paper).
    """

    def __init__(self, n_cells: int, width: int, init_threshold: float, inputs: str = "normalized",
                 n_globals: int = 0, logit_bound: Optional[float] = None,
                 init_spatial_threshold: Optional[float] = None):
        super().__init__()
        self.n_cells = n_cells
        self.n_globals = n_globals
        self.inputs = inputs
        self.logit_bound = logit_bound
        self.proj = nn.Linear(2 * n_cells + n_globals, width)
        self.head_r = nn.Linear(width, 1)
        self.head_s = nn.Linear(width, 1)
        init_s = init_threshold if init_spatial_threshold is None else init_spatial_threshold
        with torch.no_grad():
            # Small head weights: the thresholds start near their initial values for any input,
            # and every parameter still receives a gradient from the first step on.
            for head, init in ((self.head_r, init_threshold), (self.head_s, init_s)):
                head.weight.mul_(0.1)
                head.bias.fill_(math.log(init / (1.0 - init)))

    def _pool(self, v: torch.Tensor, kept: torch.Tensor, cell: Optional[torch.Tensor]) -> torch.Tensor:
        if cell is None:
            return v
        sums = v.new_zeros(v.shape[0], self.n_cells).scatter_add(1, cell, v)
        count = v.new_zeros(v.shape[0], self.n_cells).scatter_add(1, cell, kept.to(v.dtype))
        return sums / count.clamp_min(1.0)

    def features(self, s_self: torch.Tensor, s_cross: torch.Tensor, kept: torch.Tensor,
                 cell: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MLP's input (I, 2 * n_cells + n_globals) from the scores and the kept mask (I, N)
        bool, their canvas cells ``cell`` (I, N) long (None: the tokens are the cells) and the
        global features ``extra`` (I, n_globals)."""
        n = s_self.shape[-1]
        if (cell is None and n != self.n_cells) or s_cross.shape != s_self.shape or kept.shape != s_self.shape \
                or (cell is not None and cell.shape != s_self.shape):
            raise ValueError(f"ThresholdMLP: expected scores, kept mask (and cells) of one shape (I, N), N = "
                             f"{self.n_cells} without cells, got {tuple(s_self.shape)}, {tuple(s_cross.shape)}, "
                             f"{tuple(kept.shape)}" + ("" if cell is None else f" and {tuple(cell.shape)}"))
        if (extra.shape[-1] if extra is not None else 0) != self.n_globals:
            raise ValueError(f"ThresholdMLP: expected {self.n_globals} global features, got "
                             f"{None if extra is None else tuple(extra.shape)}")
        if self.inputs == "normalized":
            # Each score in [0, 1] whatever the LM: inputs of unit scale, which the first layer's
            # initialisation expects, so that the thresholds differ between instances from the
            # first step. (Divided by the number of cells, as they once were, the inputs left the
            # MLP's output nearly constant across instances: no instance adaptivity.)
            parts = [self._pool(atp_ops.normalize_scores(s, kept), kept, cell) for s in (s_self, s_cross)]
        else:
            parts = [self._pool(torch.where(kept, s, torch.zeros_like(s)).float(), kept, cell) for s in (s_self, s_cross)]
        if extra is not None:
            parts.append(extra.to(parts[0].dtype))
        return torch.cat(parts, dim=-1).to(self.proj.weight.dtype)

    def forward(self, s_self: torch.Tensor, s_cross: torch.Tensor, kept: torch.Tensor,
                cell: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """s_self, s_cross: (I, N) float32, one row per image; kept (I, N) bool: the tokens still
        kept (the others hold 0 in the input); ``cell``, ``extra`` as in ``features`` ->
        theta_r, theta_s: (I,) float32."""
        x = self.features(s_self, s_cross, kept, cell, extra)
        z = self.proj(x)
        theta_r = torch.sigmoid(bounded_logit(self.head_r(z), self.logit_bound)).squeeze(-1)
        theta_s = torch.sigmoid(bounded_logit(self.head_s(z), self.logit_bound)).squeeze(-1)
        return theta_r.float(), theta_s.float()


class ATPModules(nn.Module):
    """All ATP state that lives in the model: the per-layer threshold MLPs and the fixed spatial
    scores. Attached to the model as ``model.atp`` by ``apply_atp``; ``state_dict()`` of this
    module is exactly what ``atp_llava.io`` saves.

    Attributes:
        config: the ATPConfig.
        grid: (H, W) vision-token grid of every image of a fixed-grid family (LLaVA-1.5), None
            where images differ in size.
        n_grid: H * W of ``grid`` (None where it is None).
        canvas: (H, W) of the threshold MLPs' input canvas: ``grid`` for a fixed-grid family,
            else ATPConfig.mlp_canvas.
        mlps: ModuleDict ``str(layer) -> ThresholdMLP`` (empty in the modes "fixed", "fastv"
            and "random").
        spatial: SpatialScores (Eq. 5 on each token's own grid).
        budget_weight: () float32 buffer, the weight of L_target: ``lambda_target`` at the
            start, adapted during training with ``budget_control="constraint"``
            (``atp_llava.core.losses.adapt_budget_weight``), fixed otherwise.
        budget_violation: () float32 buffer, the mean relative error of N_bar over the last
            window of ``budget_control="constraint"`` (inf before the first).
    """

    N_GLOBALS = 3  # log token count, log aspect ratio, kept fraction (images of varying size)

    def __init__(self, config: ATPConfig, grid: Optional[Tuple[int, int]]):
        super().__init__()
        self.config = config
        self.grid = None if grid is None else tuple(grid)
        self.n_grid = None if grid is None else grid[0] * grid[1]
        self.canvas = self.grid or tuple(config.mlp_canvas)
        self.n_globals = 0 if grid is not None else self.N_GLOBALS
        self.mlps = nn.ModuleDict()
        if config.mode == "adaptive":
            for layer in config.layers:
                self.mlps[str(layer)] = ThresholdMLP(self.canvas[0] * self.canvas[1], config.mlp_width,
                                                     config.init_threshold, config.mlp_inputs, self.n_globals,
                                                     config.logit_bound, config.init_spatial_threshold)
        # L_target's weight and the last window's mean relative error of N_bar
        # (ATPConfig.budget_control): state of the training, saved and loaded with the weights,
        # the same on every process.
        self.register_buffer("budget_weight", torch.tensor(float(config.lambda_target), dtype=torch.float32))
        self.register_buffer("budget_violation", torch.tensor(float("inf"), dtype=torch.float32))
        self.spatial = SpatialScores(config.lambda_sample, config.strides)
        if self.grid is not None:
            self.spatial.map(self.grid)  # a bad grid or stride fails here, not in the first forward

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) and the like cast every floating buffer; the budget weight
        # takes small steps over a whole training run and stays float32.
        super()._apply(fn, recurse)
        for name in ("budget_weight", "budget_violation"):
            self._buffers[name] = self._buffers[name].float()
        return self

    def cells(self, layout: VisionLayout) -> Optional[torch.Tensor]:
        """(I, N) long: the canvas cell of every token (None: every image is on the canvas's grid,
        row-major, one token per cell)."""
        if self.grid is not None:
            return None
        gh, gw = self.canvas
        h, w = layout.token_shape.unbind(-1)
        r, c = layout.token_grid[..., 1], layout.token_grid[..., 2]
        return ((r * gh // h) * gw + (c * gw // w)).clamp(0, gh * gw - 1)

    def globals(self, layout: VisionLayout, kept: torch.Tensor) -> Optional[torch.Tensor]:
        """(I, N_GLOBALS) float32 for images of varying size: log of the image's token count,
        log of its largest grid's W / H, and the fraction of its tokens still kept."""
        if self.n_globals == 0:
            return None
        n = layout.n_tokens.to(torch.float32).clamp_min(1.0)
        aspect = [math.log(w / h) for h, w in (max(shapes, key=lambda s: s[0] * s[1]) for shapes in layout.grid_shapes)]
        aspect = torch.tensor(aspect, dtype=torch.float32, device=n.device).view(-1)
        return torch.stack([n.log(), aspect, kept.sum(-1).to(torch.float32) / n], dim=-1)

    def null_input(self, device: torch.device) -> Tuple[torch.Tensor, ...]:
        """The arguments of ``forward`` after ``layer`` for one all-zero image (a batch without
        images still runs every MLP)."""
        z = torch.zeros(1, self.canvas[0] * self.canvas[1], device=device)
        extra = None if self.n_globals == 0 else torch.zeros(1, self.n_globals, device=device)
        return z, z, torch.ones_like(z, dtype=torch.bool), None, extra

    def forward(self, layer: int, s_self: torch.Tensor, s_cross: torch.Tensor, kept: torch.Tensor,
                cell: Optional[torch.Tensor] = None, extra: Optional[torch.Tensor] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """theta_r, theta_s (I,) of ATP layer ``layer`` from the scores (I, N), the kept mask
        (I, N) bool, the tokens' canvas cells and the global features (``cells``, ``globals``).
        Called as the module (``model.atp(layer, ...)``), so wrappers that shard or gather
        parameters around a forward (FSDP2, DeepSpeed ZeRO-3) see every use of them."""
        if self.config.theta_override is not None:
            tr, ts = self.config.theta_override
            n = s_self.shape[0]
            return (torch.full((n,), tr, dtype=torch.float32, device=s_self.device),
                    torch.full((n,), ts, dtype=torch.float32, device=s_self.device))
        return self.mlps[str(layer)](s_self, s_cross, kept, cell, extra)

    def extra_repr(self) -> str:
        c = self.config
        return f"layers={c.layers}, grid={self.grid}, canvas={self.canvas}, mode={c.mode!r}, T={c.temperature}"
