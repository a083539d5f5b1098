"""Spatial pruning score of Eq. 5 (DESIGN §3.3): fixed per image grid, only theta_s adapts."""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["default_strides", "spatial_score"]


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
    score; a token sampled by none scores 0.
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
        off = (s - 1) // 2
        rows = torch.arange(off, h, s)
        cols = torch.arange(off, w, s)
        cell = score[rows[:, None], cols[None, :]]
        score[rows[:, None], cols[None, :]] = torch.clamp_min(cell, value)
    return score.reshape(-1)
