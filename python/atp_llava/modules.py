"""The learnable part of ATP-LLaVA: one threshold MLP per ATP layer (paper Eq. 6-8, DESIGN §3.4)."""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import nn

import atp_ops

from .config import ATPConfig
from .spatial import spatial_score

__all__ = ["ThresholdMLP", "ATPModules"]


class ThresholdMLP(nn.Module):
    """``z = Linear(cat(s_self, s_cross))``, ``theta_r = sigmoid(Linear_r(z))``,
    ``theta_s = sigmoid(Linear_s(z))`` (Eq. 6-8).

    The scores are laid out on the full image grid (pruned positions hold 0), so the input size
    is ``2 * n_grid`` whatever was pruned before. ``inputs`` (ATPConfig.mlp_inputs):
    "normalized" min-max normalises each score over the image's kept tokens first
    (``atp_ops.normalize_scores``) and divides it by ``n_grid``, so the input does not change
    when the LM's logits are 100x larger and an optimizer step moves the thresholds by about the
    learning rate on any grid; "raw" feeds the scores as they are (the paper).
    """

    def __init__(self, n_grid: int, width: int, init_threshold: float, inputs: str = "normalized"):
        super().__init__()
        self.n_grid = n_grid
        self.inputs = inputs
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

    def features(self, s_self: torch.Tensor, s_cross: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The MLP's input (I, 2 * n_grid) from the scores and the kept mask (I, n_grid) bool."""
        if s_self.shape[-1] != self.n_grid or s_cross.shape != s_self.shape or kept.shape != s_self.shape:
            raise ValueError(f"ThresholdMLP: expected scores and kept mask of shape (I, {self.n_grid}), got "
                             f"{tuple(s_self.shape)}, {tuple(s_cross.shape)} and {tuple(kept.shape)}")
        if self.inputs == "normalized":
            # Each score in [0, 1], divided by the number of grid positions: the first layer
            # computes weighted means, so one Adam step (every weight moves by about lr) moves z
            # by about lr whatever the grid size or the LM, and the thresholds by about lr too.
            parts = [atp_ops.normalize_scores(s, kept) / self.n_grid for s in (s_self, s_cross)]
        else:
            parts = [torch.where(kept, s, torch.zeros_like(s)) for s in (s_self, s_cross)]
        return torch.cat(parts, dim=-1).to(self.proj.weight.dtype)

    def forward(self, s_self: torch.Tensor, s_cross: torch.Tensor, kept: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """s_self, s_cross: (I, n_grid) float32, one row per image; kept (I, n_grid) bool: the
        tokens still kept (the others hold 0 in the input) -> theta_r, theta_s: (I,) float32."""
        x = self.features(s_self, s_cross, kept)
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
                self.mlps[str(layer)] = ThresholdMLP(n_grid, config.mlp_width, config.init_threshold,
                                                     config.mlp_inputs)
        self.register_buffer("s_spatial", spatial_score(self.grid, config.lambda_sample, config.strides),
                             persistent=False)

    def forward(self, layer: int, s_self: torch.Tensor, s_cross: torch.Tensor, kept: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor]:
        """theta_r, theta_s (I,) of ATP layer ``layer`` from grid-laid scores (I, n_grid) and
        the kept mask (I, n_grid) bool. Called as the module (``model.atp(layer, ...)``), so
        wrappers that shard or gather parameters around a forward (FSDP2, DeepSpeed ZeRO-3) see
        every use of them."""
        if self.config.theta_override is not None:
            tr, ts = self.config.theta_override
            n = s_self.shape[0]
            return (torch.full((n,), tr, dtype=torch.float32, device=s_self.device),
                    torch.full((n,), ts, dtype=torch.float32, device=s_self.device))
        return self.mlps[str(layer)](s_self, s_cross, kept)

    def extra_repr(self) -> str:
        c = self.config
        return f"layers={c.layers}, grid={self.grid}, mode={c.mode!r}, T={c.temperature}"
