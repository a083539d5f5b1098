"""2D rotary positions for vision tokens (DESIGN §3.6; paper 3.3.1 "Positional Embeddings for
Token Pruning"), as Qwen2-VL's M-RoPE, applied to a stock 1D-RoPE decoder by rewriting the
(cos, sin) its rotary module returns.

The head's rotary frequencies are split into three sections (t, row, col). A vision token at
grid (r, c) of an image whose first token has 1D position p0 rotates with positions
(p0, p0 + r, p0 + c); every other token with (p, p, p), its own 1D position, which is exactly 1D
RoPE. Nothing is re-indexed, so the positions survive pruning unchanged.
"""
from __future__ import annotations

from typing import Sequence, Tuple

import torch

from .layout import VisionLayout

__all__ = ["default_section", "positions_3d", "rope_2d_cos_sin"]


def default_section(half_dim: int) -> Tuple[int, int, int]:
    """Qwen2-VL's split (1/4, 3/8, 3/8) of the ``half_dim`` rotary frequencies, e.g. (16, 24, 24)."""
    hw = (3 * half_dim) // 8
    t = half_dim - 2 * hw
    if t < 1 or hw < 1:
        raise ValueError(f"rope_2d: head_dim {2 * half_dim} is too small for a (t, row, col) split")
    return t, hw, hw


def positions_3d(position_ids: torch.Tensor, layout: VisionLayout) -> torch.Tensor:
    """(3, B, L) long (t, row, col) positions from the model's 1D ``position_ids`` (B or 1, L):
    a vision token at (row, col) of its grid gets (p0, p0 + row, p0 + col), p0 the position of
    its image's first token (an image's grids, e.g. a LLaVA-NeXT base tile and canvas, each
    start at p0), every other token (p, p, p)."""
    pos = position_ids.expand(layout.batch, layout.seq_len)
    pos3 = pos.unsqueeze(0).repeat(3, 1, 1)
    if layout.num_images:
        valid = layout.image_valid
        rows = layout.image_sample[:, None].expand_as(layout.image_pos)[valid]
        cols = layout.image_pos[valid]
        p0 = pos[layout.image_sample, layout.image_pos[:, 0]][:, None].expand_as(layout.image_pos)[valid]
        pos3[0, rows, cols] = p0
        pos3[1, rows, cols] = p0 + layout.token_grid[..., 1][valid]
        pos3[2, rows, cols] = p0 + layout.token_grid[..., 2][valid]
    return pos3


def rope_2d_cos_sin(pos3: torch.Tensor, inv_freq: torch.Tensor, attention_scaling: float,
                    section: Sequence[int], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) of shape (B, L, head_dim) for (3, B, L) positions: frequency j of section s
    rotates with pos3[s] (the layout of transformers' rotate_half RoPE, halves repeated)."""
    if sum(section) != inv_freq.shape[0]:
        raise ValueError(f"rope_2d: section {tuple(section)} must sum to head_dim / 2 = {inv_freq.shape[0]}")
    freqs = pos3[..., None].float() * inv_freq.float().to(pos3.device)  # (3, B, L, half)
    freqs = torch.cat([part[i] for i, part in enumerate(freqs.split(list(section), dim=-1))], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)
