"""The transformers attention function ``"atp"`` (``atp_attention_forward``: ``atp_ops.atp_attention``
with the per-key bias of the ATP forward, and the capture of q, k, lse for the ATP step after a
score layer), its ``AttentionMaskInterface`` entry (``atp_mask``: the 2D padding mask handed
through) and their registration (DESIGN §8).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

import atp_ops

from . import flash
from .layout import padding_bias
from .state import ATPState, DecodeState, state_of

__all__ = ["ATTN_IMPLEMENTATION", "atp_attention_forward", "atp_mask", "register_attention"]

ATTN_IMPLEMENTATION = "atp"


def atp_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: Optional[torch.Tensor], scaling: float, dropout: float = 0.0,
                          **kwargs) -> Tuple[torch.Tensor, None]:
    """transformers attention function ``"atp"``: ``atp_ops.atp_attention`` with a per-key bias.

    query (B, Hq, Lq, D), key/value (B, Hkv, Lk, D) as the HF attention module passes them;
    attention_mask is the 2D bool padding mask (B, Lk) from ``atp_mask`` or None. Returns
    (attn_output (B, Lq, Hq, D), None): attention weights are never materialised.

    Inside an ATP forward (``atp_state`` keyword) the key bias is the cumulative one of this
    layer; at a score layer q, k, lse are kept for the ATP module that follows (q, k with their
    gradient under ATPConfig.score_grad).
    """
    if dropout:
        raise ValueError("atp attention: attention dropout is not supported (config.attention_dropout "
                         f"must be 0 in training), got {dropout}")
    if kwargs.get("sliding_window") is not None:
        raise NotImplementedError("atp attention: sliding-window attention is not supported")
    state = state_of(kwargs)
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    layer_idx = module.layer_idx
    lq, lk = query.shape[2], key.shape[2]
    key_mask = None
    if isinstance(state, ATPState):
        key_bias, key_mask = state.bias_for_layer(layer_idx)
        if not lq == lk == key_bias.shape[1]:
            raise RuntimeError(f"atp attention: layer {layer_idx} got {lq} queries and {lk} keys, the ATP forward "
                               f"holds {key_bias.shape[1]} tokens there (a cache that was not empty?)")
        if (key_bias.requires_grad or (key_mask is not None and key_mask.requires_grad)) and not torch.is_grad_enabled():
            # Only a reentrant checkpoint runs a layer without grad inside a forward that
            # builds the mask graph: the masks' gradient would be lost, or taken twice.
            raise RuntimeError("atp attention: reentrant gradient checkpointing is not supported; use "
                               "activation_checkpointing_kwargs={'use_reentrant': False} (the default)")
    elif isinstance(state, DecodeState) and layer_idx >= state.first_layer:
        key_bias = state.cache.extend(layer_idx, lq, lk, attention_mask, query.device)
    elif attention_mask is None:
        key_bias = None
    elif attention_mask.dim() == 2:
        key_bias = padding_bias(attention_mask[:, -lk:].to(device=query.device, dtype=torch.bool))
    else:
        raise ValueError("atp attention: expected a 2D padding mask (B, Lk) or None, got a mask of shape "
                         f"{tuple(attention_mask.shape)}; 4D masks cannot be turned into a per-key bias")
    start = state.flash_start(layer_idx) if isinstance(state, DecodeState) else None
    if start is not None:
        return flash.decode_attention(state.cache.flash, query, key, value, start, scaling, causal), None
    if query.dtype == torch.float64:
        key_bias = None if key_bias is None else key_bias.double()
        key_mask = None if key_mask is None else key_mask.double()
    out, lse = atp_ops.atp_attention(query, key, value, key_bias, key_mask=key_mask, causal=causal, scale=scaling,
                                     return_lse=True)
    if isinstance(state, ATPState) and layer_idx in state.score_layers and layer_idx not in state.captures:
        bias_used = None if key_bias is None else key_bias.detach()
        if key_mask is not None:  # the bias the layer used, for S_cross (Eq. 4)
            bias_used = key_mask.detach().log() if bias_used is None else bias_used + key_mask.detach().log()
        grad = state.score_grad and torch.is_grad_enabled()  # the masks before stay constants
        q_, k_ = (query, key) if grad else (query.detach(), key.detach())
        state.captures[layer_idx] = (q_, k_, lse.detach(), bias_used, scaling, causal)
    return out.transpose(1, 2), None


def atp_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
             mask_function=None, attention_mask: Optional[torch.Tensor] = None, **kwargs):
    """AttentionMaskInterface entry for ``"atp"``: the 2D padding mask (B, kv_length) as is (or
    None when nothing is padded); causality is the kernel's and the bias is built per key."""
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    # A host sync, once per forward: an unpadded batch runs without a key bias (as the stock masks do)
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register_attention() -> None:
    """Register ``"atp"`` in transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, atp_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, atp_mask)
