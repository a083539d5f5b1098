"""The per-forward state of an ATP model: what one forward carries between its decoder layers
(``ATPState``), what a pruned prefill leaves beside its KV cache (``CacheState``), one decoding
step against that cache (``DecodeState``), and the opaque ``ATPHandle`` they travel in as the
decoder's ``atp_state`` keyword (DESIGN §8).

The hooks (patch.py) build them, the attention function (attention.py) reads and captures into
them, the ATP step (step.py) advances them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import flash
from .layout import VisionLayout, padding_bias
from .seqview import SeqView
from .modules import ATPModules

__all__ = ["ATPHandle", "ATPState", "CacheState", "DecodeState", "state_of"]


class ATPHandle:
    """The per-forward state (ATPState, or DecodeState when decoding) as it travels in the
    decoder's ``atp_state`` keyword: an opaque object, neither a dataclass nor a pytree node, so
    wrappers that traverse or rebuild a module's inputs (FSDP2's pre-forward copies dataclasses
    that hold tensors; DDP, DeepSpeed, activation checkpointing) hand every layer the one state
    the ATP steps write into."""

    __slots__ = ("state",)

    def __init__(self, state: Any):
        self.state = state

    def __repr__(self) -> str:
        return f"ATPHandle({type(self.state).__name__})"


def state_of(kwargs: Dict[str, Any]) -> Any:
    """The state in a decoder call's ``atp_state`` keyword (an ATPHandle), None without one."""
    handle = kwargs.get("atp_state")
    return handle.state if isinstance(handle, ATPHandle) else None


@dataclass
class ATPState:
    """Everything one full forward pass of an ATP model carries between its layers.

    bias_by_layer: decoder layer -> the (key_bias, key_mask) it used, in the slots it ran on (read
        again by a checkpoint replay; the bias is kept for decoding against the cache).
        ``current_bias`` / ``current_mask`` are what the next layer that has not run yet will use.
    img_bias: (I, N) cumulative log mask of every image's tokens (differentiable with soft masks;
        0 / -inf with hard and straight-through ones).
    img_keep: (I, N) bool, the tokens the hard masks keep so far (with soft masks: the tokens
        they would keep, for the hard counts in atp_stats).
    img_soft: (I, N) detached cumulative log soft mask (Eq. 9-11) along this forward.
    img_mask: straight-through masks only (ATPConfig.budget "hard" in training): (I, N) cumulative
        multiplicative mask, 0/1 in value with the sigmoid relaxation's gradient; the layers get
        it as atp_attention's ``key_mask`` (``current_mask``), so its gradient exists at 0.
    prune: pruned tokens leave the sequence (inference); ``view`` is then the SeqView the
        layers from the last ATP layer on run on (None: all original positions), and
        ``position_embeddings`` / ``position_ids`` are the layers' rotary inputs gathered to it.
    captures: score layer -> (q, k, lse, key_bias, scale, causal) for the ATP step after it; lse
        and key_bias detached, q and k as well unless ``score_grad``.
    score_grad: the scores carry the masks' gradient back into q, k and lse (ATPConfig.score_grad).
    kept, theta_r, theta_s: one (I,) tensor per ATP layer run so far; ``kept`` is the count the
        budget losses see (soft, straight-through or hard), ``kept_soft`` / ``kept_hard`` the
        soft relaxation's and the hard masks' counts.
    keep_codes: hard masks only, one (I, N) uint8 tensor per ATP layer run so far: why each
        token survived that layer (step.py's KEEP_* bits; 0 = pruned there or before).
    null_terms: a batch without images: 0 * the thresholds each ATP layer's MLP gave on a zero
        input, added to the loss so that every parameter takes part in every step.
    budget_share: this forward's share of an accumulated batch's budget term (losses.budget_share;
        None: the forward is the whole batch).
    image_inputs: (S_spatial, canvas cells) of the images, set by ``spatial_and_cells``.
    """

    layout: VisionLayout
    hard: bool
    prune: bool
    current_bias: torch.Tensor
    img_bias: torch.Tensor
    img_keep: torch.Tensor
    img_soft: torch.Tensor
    score_layers: Tuple[int, ...]
    img_mask: Optional[torch.Tensor] = None
    current_mask: Optional[torch.Tensor] = None
    view: Optional[SeqView] = None
    position_embeddings: Optional[Tuple[torch.Tensor, ...]] = None
    position_ids: Optional[torch.Tensor] = None
    bias_by_layer: Dict[int, Tuple[torch.Tensor, Optional[torch.Tensor]]] = field(default_factory=dict)
    captures: Dict[int, Tuple[torch.Tensor, ...]] = field(default_factory=dict)
    kept: List[torch.Tensor] = field(default_factory=list)
    kept_soft: List[torch.Tensor] = field(default_factory=list)
    kept_hard: List[torch.Tensor] = field(default_factory=list)
    keep_codes: List[torch.Tensor] = field(default_factory=list)
    theta_r: List[torch.Tensor] = field(default_factory=list)
    theta_s: List[torch.Tensor] = field(default_factory=list)
    null_terms: List[torch.Tensor] = field(default_factory=list)
    budget_share: Optional[torch.Tensor] = None
    image_inputs: Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]] = None
    score_grad: bool = False

    def spatial_and_cells(self, atp: ATPModules) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(S_spatial (I, N), the tokens' MLP canvas cells or None) of this forward's images:
        fixed for the forward, computed at its first ATP layer."""
        if self.image_inputs is None:
            self.image_inputs = (atp.spatial(self.layout), atp.cells(self.layout))
        return self.image_inputs

    def bias_for_layer(self, layer_idx: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(key_bias, key_mask or None) of decoder layer ``layer_idx``."""
        used = self.bias_by_layer.get(layer_idx)
        if used is None:
            used = self.bias_by_layer[layer_idx] = (self.current_bias, self.current_mask)
        return used


@dataclass
class CacheState:
    """What a pruned prefill leaves beside its KV cache for the decoding steps after it.

    bias: decoder layer (from the first ATP layer on) -> (B, L_j) key_bias of that layer's cache
        entries (-inf on empty slots of the ragged batch); grows with every decoding step.
    flash: flash-attn's decode kernel when decoding runs on it (flash.py), else None; ``start``
        then maps those layers to the (B,) int32 first valid slot of each row (None for a layer
        whose valid slots are not one run at the end of the row: it keeps atp_attention).
    """

    bias: Dict[int, torch.Tensor]
    batch: int
    flash: Optional[Callable] = None
    start: Dict[int, Optional[torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def of_prefill(cls, state: ATPState, first_layer: int, num_layers: int,
                   kernel: Optional[Callable]) -> "CacheState":
        """What the pruned prefill ``state`` leaves for its cache: the key bias of every layer from
        ``first_layer`` on; with flash-attn's decode ``kernel`` (``flash.decode_kernel``), each
        layer's first valid slots as well."""
        # hard masks: every layer's mask is in its key_bias (key_mask is None)
        cached = cls(bias={j: state.bias_by_layer[j][0].detach() for j in range(first_layer, num_layers)},
                     batch=state.layout.batch, flash=kernel)
        if cached.flash is not None:
            starts: Dict[int, Optional[torch.Tensor]] = {}  # the layers between two ATP layers
            for j in cached.bias:                           # share one bias tensor: one sync each
                bias = state.bias_by_layer[j][0]
                if id(bias) not in starts:
                    starts[id(bias)] = flash.leftpad(bias.detach())
                cached.start[j] = starts[id(bias)]
        return cached

    def extend(self, layer_idx: int, lq: int, lk: int, attention_mask: Optional[torch.Tensor],
               device: torch.device) -> torch.Tensor:
        """The key_bias of layer ``layer_idx`` for ``lq`` new tokens just appended to its cache."""
        old = self.bias[layer_idx]
        if lk != old.shape[1] + lq or old.shape[0] != self.batch:
            raise RuntimeError(f"ATP-LLaVA decoding: layer {layer_idx}'s cache holds {lk - lq} entries for "
                               f"{old.shape[0]} samples, the pruned prefill left {old.shape[1]}: the cache was "
                               "changed outside ATP-LLaVA (beam search, cropping, reuse across prompts)")
        if attention_mask is None:
            new = torch.zeros(old.shape[0], lq, dtype=old.dtype, device=device)
        else:
            new = padding_bias(attention_mask[:, -lq:].to(device=device, dtype=torch.bool), old.dtype)
        bias = self.bias[layer_idx] = torch.cat([old, new], dim=1)
        return bias


@dataclass
class DecodeState:
    """One decoding forward against a pruned cache: layers from ``first_layer`` on read their key
    bias from ``cache``; earlier layers hold every token and use the stock padding mask."""

    cache: CacheState
    first_layer: int
    prompt_start: Optional[torch.Tensor] = None  # flash decode: layers before first_layer

    def flash_start(self, layer_idx: int) -> Optional[torch.Tensor]:
        """(B,) int32 first valid cache slot of each row if layer ``layer_idx`` decodes on flash-attn."""
        if self.cache.flash is None:
            return None
        return self.cache.start.get(layer_idx) if layer_idx >= self.first_layer else self.prompt_start
