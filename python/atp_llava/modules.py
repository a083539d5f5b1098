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

__all__ = ["ThresholdMLP", "ATPModules"]


class ThresholdMLP(nn.Module):
    """``z = Linear(cat(s_self, s_cross[, globals]))``, ``theta_r = sigmoid(Linear_r(z))``,
    ``theta_s = sigmoid(Linear_s(z))`` (Eq. 6-8).

    The input has a fixed size whatever the image: the scores are laid out on a canvas of
    ``n_cells`` cells (pruned tokens hold 0). An image on the canvas's own grid (LLaVA-1.5's
    24 x 24) is laid out as it is, one token per cell; any other (ragged grids, LLaVA-NeXT's
    tiles, video frames) is resampled to it by masked average pooling: each cell holds the mean
    over the kept tokens that fall in it (``cell``, ATPModules.cells), 0 where none does.
    ``n_globals`` more inputs (ATPModules.globals: log token count, aspect ratio, kept fraction)
    follow for families whose images differ in size. ``inputs`` (ATPConfig.mlp_inputs):
    "normalized" min-max normalises each score over the image's kept tokens first
    (``atp_ops.normalize_scores``) and divides it by ``n_cells``, so the input does not change
    when the LM's logits are 100x larger and an optimizer step moves the thresholds by about the
    learning rate on any canvas; "raw" feeds the scores as they are (the paper).
    """

    def __init__(self, n_cells: int, width: int, init_threshold: float, inputs: str = "normalized",
                 n_globals: int = 0):
        super().__init__()
        self.n_cells = n_cells
        self.n_globals = n_globals
        self.inputs = inputs
        self.proj = nn.Linear(2 * n_cells + n_globals, width)
        self.head_r = nn.Linear(width, 1)
        self.head_s = nn.Linear(width, 1)
        logit = math.log(init_threshold / (1.0 - init_threshold))
        with torch.no_grad():
            # Small head weights: the thresholds start near init_threshold for any input, and
            # every parameter still receives a gradient from the first step on.
            for head in (self.head_r, self.head_s):
                head.weight.mul_(0.1)
                head.bias.fill_(logit)

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
            # Each score in [0, 1], divided by the number of cells: the first layer computes
            # weighted means, so one Adam step (every weight moves by about lr) moves z by
            # about lr whatever the canvas or the LM, and the thresholds by about lr too.
            parts = [self._pool(atp_ops.normalize_scores(s, kept), kept, cell) / self.n_cells for s in (s_self, s_cross)]
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
        theta_r = torch.sigmoid(self.head_r(z)).squeeze(-1)
        theta_s = torch.sigmoid(self.head_s(z)).squeeze(-1)
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
        mlps: ModuleDict ``str(layer) -> ThresholdMLP`` (empty in mode "fixed").
        spatial: SpatialScores (Eq. 5 on each token's own grid).
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
                                                     config.init_threshold, config.mlp_inputs, self.n_globals)
        self.spatial = SpatialScores(config.lambda_sample, config.strides)
        if self.grid is not None:
            self.spatial.map(self.grid)  # a bad grid or stride fails here, not in the first forward

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
