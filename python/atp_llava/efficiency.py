"""Efficiency accounting (paper Eq. 15-16, DESIGN §3.7): FLOPs and KV-cache bytes of a run,
summed over decoder layers with the token count each layer really saw.

In training the counts are those the budget losses see: with the default
``ATPConfig.budget="hard"`` the straight-through counts, equal to the hard ones; with
``budget="soft"`` the expected values under the soft masks. In ``model.eval()`` with hard masks
they are exact for inference with real pruning.
"""
from __future__ import annotations

from typing import Dict

import torch

__all__ = ["layer_flops", "run_cost", "kv_bytes_per_token"]


def layer_flops(length: torch.Tensor, hidden: int, ffn: int) -> torch.Tensor:
    """Eq. 15: ``4 L d^2 + 2 L^2 d + 2 L d m`` of one decoder layer seeing ``length`` tokens."""
    length = length.double()
    return 4 * length * hidden ** 2 + 2 * length ** 2 * hidden + 2 * length * hidden * ffn


def kv_bytes_per_token(kv_heads: int, head_dim: int, bytes_per_element: int) -> int:
    """KV-cache bytes one token takes in one decoder layer: K and V, ``Hkv * D`` elements each."""
    return 2 * kv_heads * head_dim * bytes_per_element


def run_cost(vision_per_layer: torch.Tensor, text_tokens: torch.Tensor, vision_tokens: torch.Tensor,
             hidden: int, ffn: int, kv_heads: int, head_dim: int, bytes_per_element: int) -> Dict[str, torch.Tensor]:
    """Per-sample cost of one forward.

    vision_per_layer: (B, num_layers) vision tokens each decoder layer saw (all images of the
    sample); text_tokens, vision_tokens: (B,) real non-image tokens and unpruned vision tokens.
    Returns float64 tensors: ``tokens_seen`` (B, num_layers) tokens each layer saw,
    ``flops_per_layer`` (B, num_layers) and ``flops`` (B,) by Eq. 15, ``flops_full`` (B,) without
    pruning (``flops_full - flops`` is Eq. 16), ``kv_cache_bytes_per_layer`` (B, num_layers),
    ``kv_cache_bytes`` and ``kv_cache_bytes_full`` (B,) (2 * tokens * Hkv * D * bytes per layer).
    """
    seen = text_tokens.double()[:, None] + vision_per_layer.double()
    full = (text_tokens + vision_tokens).double()[:, None].expand_as(seen)
    kv = kv_bytes_per_token(kv_heads, head_dim, bytes_per_element)
    flops = layer_flops(seen, hidden, ffn)
    kv_per_layer = seen * kv
    return {
        "tokens_seen": seen,
        "flops_per_layer": flops,
        "flops": flops.sum(1),
        "flops_full": layer_flops(full, hidden, ffn).sum(1),
        "kv_cache_bytes_per_layer": kv_per_layer,
        "kv_cache_bytes": kv_per_layer.sum(1),
        "kv_cache_bytes_full": (full * kv).sum(1),
    }
