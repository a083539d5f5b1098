"""Efficiency accounting (paper Eq. 15-16, DESIGN §3.7): FLOPs and KV-cache bytes of a run,
summed over decoder layers with the token count each layer really saw, and ``ATPReport``, the
per-sample report ``model.atp_report`` holds after every forward and every ``generate()``
(``python -m atp_llava.report`` prints one).

In training the counts are those the budget losses see: with the default
``ATPConfig.budget="hard"`` the straight-through counts, equal to the hard ones; with
``budget="soft"`` the expected values under the soft masks. In ``model.eval()`` with hard masks
they are exact for inference with real pruning.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Dict, Optional, Tuple

import torch

__all__ = ["layer_flops", "run_cost", "kv_bytes_per_token", "ATPReport"]


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


@dataclass(frozen=True)
class ATPReport:
    """Per-sample efficiency of one call (B samples, ``num_layers`` decoder layers); float64.

    atp_layers: the ATP layer indexes.
    n_bar: (B,) vision tokens per image averaged over all decoder layers (Table 6 "Token").
    vision_tokens: (B, num_layers) vision tokens per image each decoder layer saw.
    tokens_seen: (B, num_layers) tokens (text and vision) each decoder layer saw.
    flops_per_layer, flops, flops_full: Eq. 15 per layer, summed, and summed without pruning
        (``flops_full - flops`` is Eq. 16).
    kv_cache_bytes_per_layer, kv_cache_bytes, kv_cache_bytes_full: the KV cache after the
        prompt (2 * tokens * Hkv * D * bytes per layer), per layer, summed, unpruned.
    generated: tokens generated after the prompt (generate()); ``kv_cache_bytes_final`` and
        ``kv_cache_bytes_final_full``: the cache at the end, which holds all but the last of them
        in every layer (the last token is returned, never fed back).
    """

    atp_layers: Tuple[int, ...]
    n_bar: torch.Tensor
    vision_tokens: torch.Tensor
    tokens_seen: torch.Tensor
    flops_per_layer: torch.Tensor
    flops: torch.Tensor
    flops_full: torch.Tensor
    kv_cache_bytes_per_layer: torch.Tensor
    kv_cache_bytes: torch.Tensor
    kv_cache_bytes_full: torch.Tensor
    generated: int = 0
    kv_cache_bytes_final: Optional[torch.Tensor] = None
    kv_cache_bytes_final_full: Optional[torch.Tensor] = None

    @classmethod
    def from_stats(cls, stats: Dict[str, Any]) -> "ATPReport":
        """From the ``atp_stats`` of one forward."""
        names = ("n_bar", "tokens_per_layer", "tokens_seen", "flops_per_layer", "flops", "flops_full",
                 "kv_cache_bytes_per_layer", "kv_cache_bytes", "kv_cache_bytes_full")
        values = [stats[k].detach().double() for k in names]
        if any(v.device.type != "cpu" for v in values):
            # the report's one device-to-host copy (a host report of a forward on the device)
            flat = torch.cat([v.reshape(-1) for v in values]).cpu()
            values = [part.view(v.shape) for part, v in zip(flat.split([v.numel() for v in values]), values)]
        v = dict(zip(names, values))
        return cls(atp_layers=tuple(stats["layers"]), n_bar=v["n_bar"], vision_tokens=v["tokens_per_layer"],
                   tokens_seen=v["tokens_seen"], flops_per_layer=v["flops_per_layer"], flops=v["flops"],
                   flops_full=v["flops_full"], kv_cache_bytes_per_layer=v["kv_cache_bytes_per_layer"],
                   kv_cache_bytes=v["kv_cache_bytes"], kv_cache_bytes_full=v["kv_cache_bytes_full"],
                   kv_cache_bytes_final=v["kv_cache_bytes"],
                   kv_cache_bytes_final_full=v["kv_cache_bytes_full"])

    def with_generated(self, generated: int, kv_bytes_per_token_layer: int) -> "ATPReport":
        """The report of a generate() call that returned ``generated`` new tokens: all but the last
        went into every layer's cache, ``kv_bytes_per_token_layer`` (= 2 * Hkv * D * bytes) each."""
        extra = float(max(generated - 1, 0) * self.tokens_seen.shape[1] * kv_bytes_per_token_layer)
        return replace(self, generated=int(generated), kv_cache_bytes_final=self.kv_cache_bytes + extra,
                       kv_cache_bytes_final_full=self.kv_cache_bytes_full + extra)

    @property
    def flops_reduction(self) -> torch.Tensor:
        """(B,) 1 - FLOPs / unpruned FLOPs (Table 6 "Δ" of TFLOPs)."""
        return 1.0 - self.flops / self.flops_full

    @property
    def kv_cache_reduction(self) -> torch.Tensor:
        """(B,) 1 - KV bytes / unpruned KV bytes after the prompt (Table 6 "Δ" of the cache)."""
        return 1.0 - self.kv_cache_bytes / self.kv_cache_bytes_full

    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {"atp_layers": list(self.atp_layers), "generated": self.generated}
        for name in ("n_bar", "vision_tokens", "tokens_seen", "flops_per_layer", "flops", "flops_full",
                     "kv_cache_bytes_per_layer", "kv_cache_bytes", "kv_cache_bytes_full", "kv_cache_bytes_final",
                     "kv_cache_bytes_final_full"):
            out[name] = getattr(self, name).tolist()
        out["flops_reduction"] = self.flops_reduction.tolist()
        out["kv_cache_reduction"] = self.kv_cache_reduction.tolist()
        return out

    def format(self) -> str:
        """Table 6 columns per sample, then the vision tokens each decoder layer saw."""
        lines = [f"ATP layers {list(self.atp_layers)}; generated tokens {self.generated}",
                 f"{'sample':>6} {'Token':>8} {'KV MB':>10} {'Δ':>7} {'TFLOPs':>10} {'Δ':>7}"]
        for b in range(self.n_bar.shape[0]):
            lines.append(f"{b:>6} {self.n_bar[b]:>8.1f} {self.kv_cache_bytes[b] / 2**20:>10.3f} "
                         f"{self.kv_cache_reduction[b]:>7.1%} {self.flops[b] / 1e12:>10.4f} "
                         f"{self.flops_reduction[b]:>7.1%}")
        lines.append("vision tokens per image seen by each decoder layer:")
        for b in range(self.n_bar.shape[0]):
            lines.append(f"{b:>6} " + " ".join(f"{x:.0f}" for x in self.vision_tokens[b].tolist()))
        return "\n".join(lines)
