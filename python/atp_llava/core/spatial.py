"""Spatial pruning score of Eq. 5 (DESIGN §3.3): fixed per image grid, only theta_s adapts."""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import torch

__all__ = ["default_strides", "spatial_score", "SpatialScores"]


def default_strides(grid: Tuple[int, int], lambda_sample: float) -> Tuple[int, ...]:
    """Every stride s (1 <= s <= max(H, W)) whose score ``1 - lambda_sample / s^2`` lies in (0, 1]."""
    h, w = grid
    return tuple(s for s in range(1, max(h, w) + 1) if 0.0 < 1.0 - lambda_sample / (s * s) <= 1.0)


def spatial_score(grid: Tuple[int, int], lambda_sample: float,
                  strides: Optional[Sequence[int]] = None) -> torch.Tensor:
    """S_spatial of every token of an H x W grid, row-major, shape (H * W,) float32.

    Uniform sampling at stride s keeps one token per s x s cell: the cell's centre
    (offset ``(s - 1) // 2`` in each direction), sampling rate R = 1 / s^2. A sampled token scores
    ``1 - R * lambda_sample`` (Eq. 5); a token sampled by several strides keeps its highest
    score; a token sampled by none scores 0. Along a side that ends before the cell's centre (a
    thin image: 1 x 40 tokens, stride 5) the cell is cut by the edge and the side's last token
    stands for its centre: every stride keeps a token per cell along the long side.
    """
    h, w = grid
    if h < 1 or w < 1:
        raise ValueError(f"spatial_score: grid must be positive (H, W), got {grid}")
    strides = default_strides(grid, lambda_sample) if strides is None else tuple(strides)
    score = torch.zeros(h, w, dtype=torch.float32)
    for s in strides:
        if s < 1:
            raise ValueError(f"spatial_score: strides must be >= 1, got {s}")
        value = 1.0 - lambda_sample / float(s * s)
        if not 0.0 < value <= 1.0 or not math.isfinite(value):
            raise ValueError(f"spatial_score: stride {s} gives score {value:.3f} outside (0, 1] "
                             f"with lambda_sample={lambda_sample}")
        rows = torch.arange(min((s - 1) // 2, h - 1), h, s)
        cols = torch.arange(min((s - 1) // 2, w - 1), w, s)
        cell = score[rows[:, None], cols[None, :]]
        score[rows[:, None], cols[None, :]] = torch.clamp_min(cell, value)
    return score.reshape(-1)


class SpatialScores:
    """S_spatial of every token of a batch's images (VisionLayout), each token scored on its own
    grid (a LLaVA-NeXT image: the base tile and the canvas separately; a video: every frame).
    One map per grid shape, computed once and kept."""

    def __init__(self, lambda_sample: float, strides: Optional[Sequence[int]] = None):
        self.lambda_sample = lambda_sample
        self.strides = None if strides is None else tuple(strides)
        self._maps: Dict[Tuple[int, int], torch.Tensor] = {}

    def map(self, shape: Tuple[int, int]) -> torch.Tensor:
        """(H * W,) float32 of one grid shape (``spatial_score``)."""
        shape = (int(shape[0]), int(shape[1]))
        if shape not in self._maps:
            self._maps[shape] = spatial_score(shape, self.lambda_sample, self.strides)
        return self._maps[shape]

    def __call__(self, layout) -> torch.Tensor:
        """(I, N) float32: every token's score, 0 past an image's count."""
        out = torch.zeros(layout.image_pos.shape, dtype=torch.float32, device=layout.image_pos.device)
        shapes = sorted({s for image in layout.grid_shapes for s in image})
        rc = layout.token_grid[..., 1:]
        for h, w in shapes:
            on = (layout.token_shape == torch.tensor([h, w], device=out.device)).all(-1) & layout.image_valid
            flat = (rc[..., 0] * w + rc[..., 1]).clamp(0, h * w - 1)
            out = torch.where(on, self.map((h, w)).to(out.device)[flat], out)
        return out
