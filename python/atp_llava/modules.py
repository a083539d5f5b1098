"""The learnable part of ATP-LLaVA: one threshold MLP per ATP layer (paper Eq. 6-8, DESIGN §3.4)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

from .config import ATPConfig
from .spatial import spatial_score

__all__ = ["ThresholdMLP", "ATPModules"]


class ThresholdMLP(nn.Module):
    """``z = Linear(cat(s_self, s_cross))``, ``theta_r = sigmoid(Linear_r(z))``,
    ``theta_s = sigmoid(Linear_s(z))`` (Eq. 6-8).

    The scores are laid out on the full image grid (pruned positions hold 0), so the input size
    is ``2 * n_grid`` whatever was pruned before.
    """

    def __init__(self, n_grid: int, width: int, init_threshold: float):
        super().__init__()
        self.n_grid = n_grid
        self.proj = nn.Linear(2 * n_grid, width)
        self.head_r = nn.Linear(width, 1)
        self.head_s = nn.Linear(width, 1)
        logit = math.log(init_threshold / (1.0 - init_threshold))
        with torch.no_grad():
            # Small head weights: the thresholds start near init_threshold for any input, and
            # every parameter still receives a gradient from the first step on.
            for head in (self.head_r, self.head_s):
                head.weight.mul_(0.1)
                head.bias.fill_(logit)

    def forward(self, s_self: torch.Tensor, s_cross: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """s_self, s_cross: (I, n_grid) float32, one row per image -> theta_r, theta_s: (I,) float32."""
        if s_self.shape[-1] != self.n_grid or s_cross.shape != s_self.shape:
            raise ValueError(f"ThresholdMLP: expected scores of shape (I, {self.n_grid}), got "
                             f"{tuple(s_self.shape)} and {tuple(s_cross.shape)}")
        x = torch.cat([s_self, s_cross], dim=-1).to(self.proj.weight.dtype)
        z = self.proj(x)
        theta_r = torch.sigmoid(self.head_r(z)).squeeze(-1)
        theta_s = torch.sigmoid(self.head_s(z)).squeeze(-1)
        return theta_r.float(), theta_s.float()


class ATPModules(nn.Module):
    """All ATP state that lives in the model: the per-layer threshold MLPs and the fixed spatial
    score map. Attached to the model as ``model.atp`` by ``apply_atp``; ``state_dict()`` of this
    module is exactly what ``atp_llava.io`` saves.

    Attributes:
        config: the ATPConfig.
        grid: (H, W) vision-token grid of one image.
        mlps: ModuleDict ``str(layer) -> ThresholdMLP`` (empty in mode "fixed").
        s_spatial: (H * W,) float32 buffer, Eq. 5.
    """

    def __init__(self, config: ATPConfig, grid: Tuple[int, int]):
        super().__init__()
        self.config = config
        self.grid = tuple(grid)
        n_grid = grid[0] * grid[1]
        self.n_grid = n_grid
        self.mlps = nn.ModuleDict()
        if config.mode == "adaptive":
            for layer in config.layers:
                self.mlps[str(layer)] = ThresholdMLP(n_grid, config.mlp_width, config.init_threshold)
        self.register_buffer("s_spatial", spatial_score(self.grid, config.lambda_sample, config.strides),
                             persistent=False)

    def thresholds(self, layer: int, s_self: torch.Tensor, s_cross: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
        """theta_r, theta_s (I,) of ATP layer ``layer`` from grid-laid scores (I, n_grid)."""
        if self.config.theta_override is not None:
            tr, ts = self.config.theta_override
            n = s_self.shape[0]
            return (torch.full((n,), tr, dtype=torch.float32, device=s_self.device),
                    torch.full((n,), ts, dtype=torch.float32, device=s_self.device))
        return self.mlps[str(layer)](s_self, s_cross)

    def extra_repr(self) -> str:
        c = self.config
        return f"layers={c.layers}, grid={self.grid}, mode={c.mode!r}, T={c.temperature}"
