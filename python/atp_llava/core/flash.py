"""flash-attn as an optional accelerator of the pruned decode (``pip install .[flash]``).

After a pruned prefill every decoder layer's cache row holds its sample's tokens as one run at
the end of the row: the layers from the first ATP layer on run on a right-aligned ``SeqView``
(the empty slots first), the layers before it on the left-padded prompt. flash-attn's
``flash_attn_with_kvcache`` reads exactly that layout: row ``b`` attends to the cache slots
``[cache_leftpad[b], cache_seqlens[b])``, with causality aligned to the last key (as
``atp_attention``'s bottom-right alignment). So a decoding step can run on flash-attn with the
per-layer start of each row instead of a -inf key bias, without copying the cache.

Only the decode uses it: prefill needs ``atp_attention``'s lse and scores at the score layers.
A layer whose valid slots are not one run at the end (right padding, a mask with holes) keeps
``atp_attention``. ``ATPConfig.flash_decode``: None uses flash-attn when it is installed and
applies (CUDA, float16/bfloat16, head dim <= 256), True requires it, False never uses it.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable, Optional

import torch
from torch import nn

from .layout import padding_bias

__all__ = ["FLASH_DTYPES", "MAX_HEAD_DIM", "kernel", "unusable", "decode_kernel", "leftpad", "decode_attention"]

FLASH_DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def kernel() -> Optional[Callable]:
    """flash-attn's ``flash_attn_with_kvcache`` if a version with ``cache_leftpad`` (2.6+) is
    installed, else None."""
    try:
        module = importlib.import_module("flash_attn")
    except ImportError:
        return None
    fn = getattr(module, "flash_attn_with_kvcache", None)
    if fn is None or "cache_leftpad" not in inspect.signature(fn).parameters:
        return None
    return fn


def unusable(device: torch.device, dtype: torch.dtype, head_dim: int) -> Optional[str]:
    """Why flash-attn cannot run a model on ``device`` in ``dtype`` with ``head_dim``; None if it can."""
    if device.type != "cuda":
        return f"flash-attn runs on CUDA, the model is on {device}"
    if dtype not in FLASH_DTYPES:
        return f"flash-attn takes float16/bfloat16, the model is {dtype}"
    if head_dim > MAX_HEAD_DIM or head_dim % 8:
        return f"flash-attn takes head dims <= {MAX_HEAD_DIM} that are multiples of 8, the model's is {head_dim}"
    return None


def decode_kernel(model: nn.Module, head_dim: int, wanted: Optional[bool]) -> Optional[Callable]:
    """flash-attn's decode kernel if ``model``'s pruned decoding runs on it (``wanted``:
    ATPConfig.flash_decode), else None."""
    if wanted is False:
        return None
    param = model.lm_head.weight if hasattr(model, "lm_head") else next(model.parameters())
    if wanted is None and unusable(param.device, param.dtype, head_dim) is not None:
        return None  # without importing flash_attn: a failed import costs every pruned prefill ~1 ms
    fn = kernel()
    why = ("flash-attn 2.6 or newer is not installed (pip install .[flash])" if fn is None
           else unusable(param.device, param.dtype, head_dim))
    if why is None:
        return fn
    if wanted:
        raise RuntimeError(f"ATPConfig.flash_decode=True, but {why}")
    return None


def leftpad(key_bias: torch.Tensor) -> Optional[torch.Tensor]:
    """key_bias (B, L) -> (B,) int32 index of each row's first valid slot, if every row is -inf on
    a run of leading slots and 0 on the rest (what flash-attn's cache_leftpad expresses); None
    otherwise. One host sync."""
    start = torch.isinf(key_bias).sum(1)
    suffix = torch.arange(key_bias.shape[1], device=key_bias.device)[None, :] >= start[:, None]
    if not torch.equal(padding_bias(suffix, key_bias.dtype), key_bias):
        return None
    return start.to(torch.int32)


def decode_attention(fn: Callable, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     start: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """Attention of ``query`` (B, Hq, Lq, D) to the cache ``key``/``value`` (B, Hkv, Lk, D) (the
    new tokens already appended), row b seeing slots [start[b], Lk); returns (B, Lq, Hq, D)."""
    b, lk = key.shape[0], key.shape[2]
    seqlens = torch.full((b,), lk, dtype=torch.int32, device=key.device)
    return fn(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), cache_seqlens=seqlens,
              cache_leftpad=start, softmax_scale=scale, causal=causal)
