"""apply_atp: turn a stock transformers vision-language model (LLaVA-1.5, LLaVA-NeXT,
LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL: ``atp_llava.models``) into its ATP
version in place.

No modeling file is copied. The model stays stock except for:
  * its text config's attention implementation, set to ``"atp"``: a function registered in
    transformers' ``AttentionInterface`` that runs ``atp_ops.atp_attention`` with the cumulative
    per-key bias (padding -inf + accumulated log soft masks), and a matching entry in
    ``AttentionMaskInterface`` that hands the 2D padding mask through instead of a 4D mask;
  * ``model.atp`` (ATPModules: threshold MLPs, spatial score), a registered submodule;
  * forward hooks: on the model (build the batch's vision layout before, add the ATP losses and
    ``atp_stats`` to the output after), on the language model (hand the per-forward state down
    to the attention function as a keyword argument), on every ATP decoder layer (the ATP
    module itself, run before the layer's forward) and, with ``rope_2d`` only, on the rotary
    module (2D positions of the vision tokens, rope2d.py).

Per-forward state travels as the ``atp_state`` keyword argument (an opaque ``ATPHandle`` that
no wrapper copies), which transformers forwards from the language model through the decoder
layers into the attention function. Gradient
checkpointing (transformers' default, non-reentrant) keeps that keyword in the layer's replay,
and the ATP modules run in pre-hooks, outside the checkpointed forward, so a replay only reads
the bias its layer used and never repeats an ATP step.

Inference (``model.eval()``, ``config.prune_in_eval``): the ATP step gathers the kept tokens, so
every later decoder layer runs on a shorter, per-sample ragged batch (``SeqView``: right-aligned,
empty slots masked with key_bias -inf, original position ids gathered with the tokens); the last
hidden state is scattered back to the original positions, so logits keep the input's shape.
Each decoder layer's KV cache holds only what that layer saw; the per-layer key bias of the
cache entries is kept beside the cache (``CacheState``) and grows as ``generate()`` appends
tokens. Decoding steps never prune: new tokens are text.

Everything that depends on the model family (where the decoder layers are, where each image's
tokens lie and on which grids, which tokens are structural, the vision encoder of a batch
without images) is the family's adapter (``atp_llava.models``); nothing here asks which family
it runs on. The attention function refuses sliding windows, which it does not implement.
"""
from __future__ import annotations

import dataclasses
import inspect
import warnings
import weakref
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

import atp_ops

from . import flash
from .config import ATPConfig
from .distributed import is_distributed
from .efficiency import ATPReport, kv_bytes_per_token, run_cost
from .layout import SeqView, VisionLayout, gather_slots, padding_bias, valid_mask
from .losses import (SAMPLES_IN_BATCH, adapt_budget_weight, atp_losses, budget_error, budget_share, budget_sums,
                     min_reachable_tokens, n_bar)
from .models import ModelAdapter, adapter_for
from .modules import ATPModules
from .rope2d import default_section, positions_3d, rope_2d_cos_sin


__all__ = ["apply_atp", "ATTN_IMPLEMENTATION", "KEEP_REDUNDANT", "KEEP_SPATIAL", "ATPState", "ATPHandle", "get_atp_controller",
           "SUPPORTED_TRANSFORMERS", "check_transformers_version"]

ATTN_IMPLEMENTATION = "atp"
# [min, max). The minimum is the version the tests ran on (5.24.0); the APIs used
# (AttentionInterface, AttentionMaskInterface, LlavaModel.language_model, set_attn_implementation
# with a dict, GradientCheckpointingLayer checkpointing `forward` so hooks stay outside) are all
# older, but older versions are not tested, so they are refused rather than assumed.
SUPPORTED_TRANSFORMERS = ("5.24", "6.0")


def _version_tuple(v: str) -> Tuple[int, ...]:
    parts = []
    for p in v.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def check_transformers_version(version: Optional[str] = None) -> str:
    """Raise a RuntimeError unless transformers is within SUPPORTED_TRANSFORMERS; return it."""
    import transformers

    version = version or transformers.__version__
    lo, hi = SUPPORTED_TRANSFORMERS
    if not _version_tuple(lo) <= _version_tuple(version) < _version_tuple(hi):
        raise RuntimeError(f"atp_llava supports transformers >= {lo}, < {hi}; found {version}")
    return version


# ----------------------------------------------------------------------------------------------
# Per-forward state

# Why a token survived an ATP layer with hard masks (atp_stats["keep_codes"]); a bit each.
KEEP_REDUNDANT = 1  # S_red > theta_r, or among the image's top ATPConfig.min_keep by S_red (fixed, fastv and
                    # random modes: selected)
KEEP_SPATIAL = 2    # S_spatial > theta_s


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


def _state_of(kwargs: Dict[str, Any]) -> Any:
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
        token survived that layer (KEEP_* bits; 0 = pruned there or before).
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


# ----------------------------------------------------------------------------------------------
# The attention function and its mask function


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
    state = _state_of(kwargs)
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
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


def register_attention() -> None:
    """Register ``"atp"`` in transformers' attention and attention-mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, atp_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, atp_mask)


# ----------------------------------------------------------------------------------------------
# The controller: hooks that run the ATP modules and the losses


class ATPController:
    """Owns the hooks of one ATP model. Plain object (no parameters): ``model.atp`` holds those."""

    def __init__(self, model: nn.Module, atp: ATPModules, adapter: ModelAdapter, num_layers: int):
        self.atp = atp
        self.adapter = adapter
        tc = adapter.text_config
        head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
        # (hidden, ffn, kv_heads, head_dim) of the efficiency accounting (Eq. 15, §3.7)
        self.dims = (tc.hidden_size, tc.intermediate_size, tc.num_key_value_heads, head_dim)
        self.config = atp.config
        self.num_layers = num_layers
        self.score_layers = tuple(ATPConfig.score_layer(l) for l in self.config.layers)
        self._signature = inspect.signature(type(model).forward)
        self._pending: Optional[Union[ATPState, DecodeState]] = None
        self._active: Optional[Union[ATPState, DecodeState]] = None
        self._lm_state: Optional[Union[ATPState, DecodeState]] = None  # read by the LM and rotary hooks
        # Pruned prefills' per-layer cache bias, keyed by the transformers cache object they filled.
        self._caches: "weakref.WeakKeyDictionary[Any, CacheState]" = weakref.WeakKeyDictionary()
        self._prompt_len: Optional[int] = None  # inside generate(): the prompt's length
        self._prompt_inputs: Dict[str, Any] = {}  # inside generate(): the prompt's adapter.layout_inputs
        self._fsdp_generate = False  # generate() registered as an FSDP2 forward method
        self._call_report: Optional[ATPReport] = None  # inside generate(): its first forward's report
        self.rope_section: Optional[Tuple[int, int, int]] = None
        self.handles = []
        self._budget_sums: Optional[torch.Tensor] = None  # this optimizer step's forwards so far (losses.budget_sums)
        self._window: List[torch.Tensor] = []  # the errors of this budget window's steps so far
        # mode "random": the draws, on the CPU so that a seed selects the same tokens on any device
        self._random = torch.Generator().manual_seed(self.config.random_seed)

    # -- model hooks ---------------------------------------------------------------------------

    def model_pre_forward(self, module, args, kwargs):
        # Trainer's loss kwarg, and ours (ATPTrainer), which the stock forward must not see
        normalisers = (kwargs.get("num_items_in_batch"), kwargs.pop(SAMPLES_IN_BATCH, None))
        self._start_forward(module, self._signature.bind_partial(module, *args, **kwargs).arguments, normalisers)
        return args, kwargs

    def _start_forward(self, module, bound: Dict[str, Any], normalisers: Tuple[Any, Any]) -> None:
        input_ids = bound.get("input_ids")
        if input_ids is None:
            raise ValueError("ATP-LLaVA needs input_ids to find the image tokens; inputs_embeds alone "
                             "is not supported")
        cache = bound.get("cache", bound.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            self._active = self._pending = self._decode_state(module, cache, input_ids, bound.get("attention_mask"))
            return
        hard = (not module.training) and self.config.hard_in_eval
        prune = hard and self.config.prune_in_eval
        from transformers.cache_utils import DynamicCache

        if prune and cache is not None and not isinstance(cache, DynamicCache):
            raise TypeError(f"ATP-LLaVA inference needs a DynamicCache (each layer keeps its own number of "
                            f"tokens), got {type(cache).__name__}")
        attention_mask = bound.get("attention_mask")
        for name, value in self._prompt_inputs.items():  # generate(): the prompt's image sizes and grids
            if bound.get(name) is None and input_ids.shape[1] >= self._prompt_len:
                bound[name] = value
        tokens = self.adapter.image_tokens(bound, valid_mask(input_ids, attention_mask))
        layout = VisionLayout.from_tokens(tokens, input_ids, attention_mask, bound.get("labels"), self._prompt_len)
        img_zeros = layout.image_zeros()  # -inf past each image's count: never kept, never counted
        straight_through = (not hard) and self.config.mode == "adaptive" and self.config.budget == "hard"
        share = budget_share(layout, bound.get("labels"), *normalisers)
        self._active = self._pending = ATPState(
            layout=layout, hard=hard, prune=prune, current_bias=layout.pad_bias, img_bias=img_zeros,
            img_keep=layout.image_valid, img_soft=img_zeros,
            img_mask=layout.image_valid.to(img_zeros.dtype) if straight_through else None,
            score_layers=self.score_layers, budget_share=share,
            score_grad=self.config.score_grad and self.config.mode == "adaptive" and not hard)

    def _decode_state(self, module, cache, input_ids: torch.Tensor,
                      attention_mask: Optional[torch.Tensor]) -> DecodeState:
        state = self._caches.get(cache)
        if state is None:
            raise NotImplementedError(
                "ATP-LLaVA: this KV cache was not filled by a pruned prefill (model.eval() with "
                "ATPConfig.prune_in_eval and hard_in_eval); decoding against it would bring pruned tokens back. "
                "Run full sequences, or prefill in eval mode")
        if module.training:
            raise RuntimeError("ATP-LLaVA: decoding against a pruned cache needs model.eval()")
        if input_ids.shape[0] != state.batch:
            raise RuntimeError(f"ATP-LLaVA decoding: {input_ids.shape[0]} samples against a cache pruned for "
                               f"{state.batch} (beam search and batch changes are not supported)")
        if bool(self.adapter.vision_token_mask(input_ids).any()):
            raise NotImplementedError("ATP-LLaVA decoding: image tokens after the prefill are not supported")
        decode = DecodeState(cache=state, first_layer=self.config.layers[0])
        if state.flash is not None:
            if attention_mask is None:
                decode.prompt_start = torch.zeros(state.batch, dtype=torch.int32, device=input_ids.device)
            else:
                valid = attention_mask.to(device=input_ids.device, dtype=torch.bool)
                decode.prompt_start = flash.leftpad(padding_bias(valid))
                if decode.prompt_start is None and not bool(valid[:, -input_ids.shape[1]:].all()):
                    state.flash = None  # masked new tokens: the pruned layers' caches get holes
        return decode

    def language_model_pre_forward(self, module, args, kwargs):
        state, self._pending = self._pending, None
        self._lm_state = state
        if state is None:
            return None
        if isinstance(state, ATPState) and state.layout.num_images == 0 and is_distributed():
            # A batch without images: the vision encoder and the projector run on one zero
            # image, where the stock forward would have run them (after the embeddings, before
            # the language model), and join the loss with weight 0, so every rank runs the
            # same modules in the same order (ZeRO-3 gathers each module's parameters around
            # its forward; DDP wants a gradient for every trainable parameter).
            state.null_terms.append(self.adapter.null_vision())
        return args, {**kwargs, "atp_state": ATPHandle(state)}

    def language_model_post_forward(self, module, args, kwargs, output):
        """Pruned forward: scatter the last hidden state back to the original positions, so the
        logits keep the input's shape (positions of pruned tokens hold zeros)."""
        state = self._lm_state
        if not isinstance(state, ATPState) or state.view is None:
            return output
        hidden = state.view.untake(output[0], state.layout.seq_len)
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        output.last_hidden_state = hidden
        return output

    def rotary_post_forward(self, module, args, kwargs, output):
        """2D RoPE (config.rope_2d): replace the rotary module's (cos, sin) with the (t, row, col)
        version for this batch's vision tokens."""
        state = self._lm_state
        position_ids = kwargs.get("position_ids", args[1] if len(args) > 1 else None)
        if not isinstance(state, ATPState) or position_ids is None or position_ids.shape[-1] != state.layout.seq_len:
            return output
        cos, _ = output
        pos3 = positions_3d(position_ids.to(cos.device), state.layout)
        return rope_2d_cos_sin(pos3, module.inv_freq, module.attention_scaling, self.rope_section, cos.dtype)

    def model_post_forward(self, module, args, kwargs, output):
        state, self._active, self._pending, self._lm_state = self._active, None, None, None
        if not isinstance(state, ATPState):  # no ATP forward, or a decoding step
            return output
        stats, budget, live_losses = self._stats(module, state)
        if state.prune:
            cache = _output_cache(output)
            if cache is not None:
                first = self.config.layers[0]
                # hard masks: every layer's mask is in its key_bias (key_mask is None)
                cached = CacheState(bias={j: state.bias_by_layer[j][0].detach() for j in range(first, self.num_layers)},
                                    batch=state.layout.batch, flash=self._flash_kernel(module))
                if cached.flash is not None:
                    starts: Dict[int, Optional[torch.Tensor]] = {}  # the layers between two ATP layers
                    for j in cached.bias:                           # share one bias tensor: one sync each
                        bias = state.bias_by_layer[j][0]
                        if id(bias) not in starts:
                            starts[id(bias)] = flash.leftpad(bias.detach())
                        cached.start[j] = starts[id(bias)]
                self._caches[cache] = cached

        report = ATPReport.from_stats(stats)
        object.__setattr__(module, "atp_report", report)
        if self._prompt_len is not None and self._call_report is None:
            self._call_report = report  # generate(): the prompt's forward
        if isinstance(output, tuple):
            return output
        loss = getattr(output, "loss", None)
        if loss is not None:
            stats["loss_ntp"] = loss.detach()
            output.loss = loss + budget  # Eq. 14 (adaptive; otherwise + 0)
        # atp_stats and the live (graph-connected) budget terms, for custom objectives and
        # loggers, as fields of the output: wrappers that rebuild it (DDP) keep them.
        return with_atp_fields(output, atp_stats=stats, atp_losses=live_losses)

    def _stats(self, module, state: ATPState) -> Tuple[Dict[str, Any], torch.Tensor, Dict[str, torch.Tensor]]:
        """(atp_stats of a full forward (see apply_atp), the live budget term
        lambda_ATP L_ATP + w L_target (w: ``model.atp.budget_weight``), the live loss terms)."""
        cfg = self.config
        lay = state.layout
        k = len(cfg.layers)
        if len(state.kept) != k:
            raise RuntimeError(f"ATP-LLaVA: {len(state.kept)} of {k} ATP layers ran in this forward")
        def per_sample(counts: List[torch.Tensor]) -> torch.Tensor:  # (B, K) tokens per image
            return lay.per_sample_mean(torch.stack(counts, 1) if lay.num_images else lay.pad_bias.new_zeros(0, k))

        kept = per_sample(state.kept)
        losses = atp_losses(kept, lay, cfg.layers, self.num_layers, cfg.target_tokens, cfg.target_loss,
                            cfg.target_delta, cfg.target_ratio)
        kept_soft, kept_hard = per_sample(state.kept_soft).detach(), per_sample(state.kept_hard)
        n_bar_hard = n_bar(kept_hard, lay, cfg.layers, self.num_layers)[2]
        weight = self.atp.budget_weight.detach().clone()  # the value this forward's loss uses
        step_error = None
        if cfg.mode == "adaptive":
            # Eq. 14, with L_target's weight held by ATPConfig.budget_control (lambda_target when fixed)
            extra = cfg.lambda_atp * losses["loss_atp"] \
                + weight.to(losses["loss_target"].dtype) * losses["loss_target"]
            if cfg.budget_control == "constraint" and cfg.theta_override is None and module.training \
                    and torch.is_grad_enabled():
                step_error = self._adapt_budget_weight(losses["n_bar_batch"], losses["target"], lay,
                                                       state.budget_share)
        else:  # no budget term (fixed keep counts)
            extra = lay.pad_bias.new_zeros(())
        if state.budget_share is not None:  # one micro-batch of an accumulated batch (Trainer)
            extra = extra * state.budget_share
        # the modules a batch without images ran on zero inputs (atp_step, _null_vision), weight 0
        for term in state.null_terms:
            extra = extra + term
        stats: Dict[str, Any] = {
            "layers": cfg.layers,
            "tokens": kept.detach(),
            "tokens_soft": kept_soft,
            "tokens_hard": kept_hard,
            "n_bar_soft": n_bar(kept_soft, lay, cfg.layers, self.num_layers)[2],
            "n_bar_hard": n_bar_hard,
            "budget_weight": weight,
            "budget_error": step_error,
            "tokens_per_layer": losses["per_layer"].detach(),
            "n_bar": losses["n_bar"].detach(),
            "n_bar_batch": losses["n_bar_batch"].detach(),
            "n_target": losses["target"].detach(),
            "loss_atp": losses["loss_atp"].detach(),
            "loss_target": losses["loss_target"].detach(),
            "budget_share": None if state.budget_share is None else state.budget_share.detach(),
            "images_per_sample": lay.images_per_sample,
            "image_sample": lay.image_sample,
            "hard": state.hard,
            "pruned": state.prune,
        }
        if state.keep_codes:
            stats["keep_codes"] = state.keep_codes
        n_vis = lay.vision_tokens
        real = torch.isfinite(lay.pad_bias).sum(1)
        cost = run_cost(losses["per_layer"].detach() * lay.images_per_sample[:, None], real - n_vis, n_vis,
                        *self.dims, bytes_per_element=self._element_bytes(module))
        stats.update(cost)
        if state.theta_r:
            stats["theta_r"] = lay.per_sample_mean(torch.stack(state.theta_r, 1)).detach()
            stats["theta_s"] = lay.per_sample_mean(torch.stack(state.theta_s, 1)).detach()
        live = {"loss_atp": losses["loss_atp"], "loss_target": losses["loss_target"],
                "n_bar_batch": losses["n_bar_batch"]}
        return stats, extra, live

    def _adapt_budget_weight(self, n_bar_batch: torch.Tensor, target: torch.Tensor, lay: VisionLayout,
                             share: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """ATPConfig.budget_control "constraint": the error of each optimizer step's batch, over
        every process; every ``budget_window`` steps, one step of the budget weight
        (``adapt_budget_weight``). The forwards of an accumulated batch (their shares,
        ``budget_share``, sum to 1) add their counts up; the last one ends the step. Returns the
        step's error (None until its batch is complete). The counts are the ones the budget
        losses see: the hard counts under the default ``budget="hard"``."""
        sums = budget_sums(n_bar_batch, target, lay, share)
        self._budget_sums = sums if self._budget_sums is None else self._budget_sums + sums
        if share is not None and float(self._budget_sums[3]) < 1.0 - 1e-4:  # more forwards of this step to come
            return None
        sums, self._budget_sums = self._budget_sums, None
        error = budget_error(sums)
        self._window.append(error)
        cfg = self.config
        if len(self._window) >= cfg.budget_window:
            # the window's mean error: its steps' noise averages out, a bias on either side stays
            mean_error = float(torch.stack(self._window).mean().abs())
            self._window = []
            adapt_budget_weight(self.atp.budget_weight, self.atp.budget_violation, mean_error, cfg.lambda_target,
                                cfg.weight_growth, cfg.budget_tolerance)
        return error

    def _flash_kernel(self, model: nn.Module) -> Optional[Callable]:
        """flash-attn's decode kernel if this model's pruned decoding runs on it (config.flash_decode)."""
        wanted = self.config.flash_decode
        if wanted is False:
            return None
        fn = flash.kernel()
        param = model.lm_head.weight if hasattr(model, "lm_head") else next(model.parameters())
        why = ("flash-attn 2.6 or newer is not installed (pip install .[flash])" if fn is None
               else flash.unusable(param.device, param.dtype, self.dims[3]))
        if why is None:
            return fn
        if wanted:
            raise RuntimeError(f"ATPConfig.flash_decode=True, but {why}")
        return None

    @staticmethod
    def _element_bytes(model: nn.Module) -> int:
        """Bytes of one KV-cache element: the model's dtype."""
        dtype = model.lm_head.weight.dtype if hasattr(model, "lm_head") else torch.float32
        return torch.finfo(dtype).bits // 8

    # -- decoder layers from the first ATP layer on -------------------------------------------

    def layer_pre_forward(self, layer: int, module, args, kwargs):
        """Before decoder layer ``layer``: the ATP step if ``layer`` is an ATP layer; in a pruned
        forward, the layer's hidden states and rotary inputs in the slots it runs on."""
        state = _state_of(kwargs)
        if not isinstance(state, ATPState):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if layer in self.config.layers:
            hidden = self.atp_step(layer, state, hidden)
        if state.view is None:
            return None
        if state.position_embeddings is None:
            # The language model hands every layer the same rotary inputs of the full sequence.
            state.position_embeddings = tuple(gather_slots(t, state.view.orig) for t in kwargs["position_embeddings"])
            pid = kwargs.get("position_ids")
            state.position_ids = None if pid is None else gather_slots(pid, state.view.orig)
        kwargs = {**kwargs, "position_embeddings": state.position_embeddings}
        if "position_ids" in kwargs:
            kwargs["position_ids"] = state.position_ids
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    def atp_step(self, layer: int, state: ATPState, hidden: torch.Tensor) -> torch.Tensor:
        """The ATP module before decoder layer ``layer``: scores from the layer before, thresholds,
        masks; returns the hidden states the layer runs on (gathered when tokens leave)."""
        lay = state.layout
        score_layer = ATPConfig.score_layer(layer)
        capture = state.captures.pop(score_layer, None)
        if capture is None:
            raise RuntimeError(f"ATP layer {layer}: decoder layer {score_layer} did not run with atp attention")
        if lay.num_images == 0:
            for counts in (state.kept, state.kept_soft, state.kept_hard):
                counts.append(state.img_bias.new_zeros(0))
            if self.config.mode == "adaptive":
                state.theta_r.append(state.img_bias.new_zeros(0))
                state.theta_s.append(state.img_bias.new_zeros(0))
                if self.config.theta_override is None:
                    # No image, but the layer's threshold MLP still runs (on a zero input), and
                    # its output joins the loss with weight 0: every rank runs the same modules
                    # in the same order and every ATP parameter gets a gradient (FSDP2's and
                    # ZeRO-3's collectives, DDP without find_unused_parameters). It joins the
                    # key_bias of the layers from here on as well, so that the backward runs
                    # through the same decoder layers as a batch with images (FSDP2 gathers each
                    # layer's parameters for its backward: a rank that skipped them would hang).
                    tr, ts = self.atp(layer, *self.atp.null_input(state.img_bias.device))
                    null = (tr.sum() + ts.sum()) * 0.0
                    state.null_terms.append(null)
                    if null.requires_grad:
                        state.current_bias = state.current_bias + null.to(state.current_bias.dtype)
            return self._drop(state, hidden)
        q, k, lse, bias_used, scale, causal = capture
        prev = state.img_bias
        kept = torch.isfinite(prev)  # the tokens this forward still holds
        cfg = self.config
        if cfg.mode != "random":
            cross_rows = lay.text_rows if cfg.mode != "fastv" else _last_rows(lay.text_rows)
            s_self, s_cross = self._scores(lay, state.view, q, k, lse, bias_used, prev.detach(), cross_rows, scale,
                                           causal)
        if cfg.mode == "adaptive":
            s_red = atp_ops.redundant_score(s_self, s_cross, kept)
            s_spatial, cells = state.spatial_and_cells(self.atp)
            theta_r, theta_s = self.atp(layer, s_self.detach(), s_cross.detach(), kept, cells,
                                        self.atp.globals(lay, kept))
            soft = atp_ops.atp_soft_mask(s_red, s_spatial, theta_r, theta_s, cfg.temperature)  # log M, Eq. 9-11
            by_red = (s_red > theta_r[:, None]) | self._top_k(s_red, state.img_keep, cfg.min_keep)
            by_spatial = s_spatial > theta_s[:, None]
            keep = (by_red | by_spatial) & state.img_keep
            if state.hard:
                state.keep_codes.append((by_red & keep).to(torch.uint8) * KEEP_REDUNDANT
                                        + (by_spatial & keep).to(torch.uint8) * KEEP_SPATIAL)
            if state.hard or state.img_mask is not None:
                new = torch.where(keep, prev, torch.full_like(prev, float("-inf")))
            else:  # the paper's soft masks, accumulated in log space
                new = prev + soft
            state.img_soft = state.img_soft + soft.detach()
            state.theta_r.append(theta_r)
            state.theta_s.append(theta_s)
        else:
            if cfg.mode == "random":  # uniform draws: the top k of i.i.d. keys is a uniform k-subset
                ranking = torch.rand(kept.shape, generator=self._random).to(kept.device)
            elif cfg.mode == "fastv":
                ranking = s_cross
            else:
                ranking = atp_ops.redundant_score(s_self, s_cross, kept)
            keep = self._top_k(ranking, kept, cfg.fixed_keep[cfg.layers.index(layer)])
            new = torch.where(keep, prev, torch.full_like(prev, float("-inf")))
            state.img_soft = new
            if state.hard:
                state.keep_codes.append(keep.to(torch.uint8) * KEEP_REDUNDANT)
        state.img_bias = new
        state.img_keep = keep
        state.kept_hard.append(keep.sum(-1).to(prev.dtype))
        state.kept_soft.append(state.img_soft.exp().sum(-1))
        if state.img_mask is not None:
            # Straight-through (ATPConfig.budget "hard"): the value of the hard mask, the
            # gradient of the soft one; the layers see it as a multiplicative key_mask.
            m = soft.exp()
            state.img_mask = state.img_mask * (m + (keep.to(m.dtype) - m).detach())
            state.kept.append(state.img_mask.sum(-1))
            state.current_mask = lay.scatter(state.img_mask, torch.ones_like(lay.pad_bias))
        else:
            state.kept.append(new.exp().sum(-1))
            state.current_bias = lay.scatter(new, lay.pad_bias)
        return self._drop(state, hidden)

    @staticmethod
    def _drop(state: ATPState, hidden: torch.Tensor) -> torch.Tensor:
        """Pruned forward: the tokens whose bias is -inf leave; the rest are gathered into the new
        view (``state.current_bias`` moves to its slots). Otherwise nothing moves."""
        if not state.prune:
            return hidden
        view = state.view
        bias = state.current_bias if view is None else gather_slots(state.current_bias, view.orig, float("-inf"))
        keep = torch.isfinite(bias)
        if view is not None and torch.equal(keep, view.valid):
            state.current_bias = bias
            return hidden
        state.view = SeqView.keep(keep, view, state.layout.seq_len)
        state.current_bias = gather_slots(bias, state.view.src, float("-inf"))
        state.position_embeddings = state.position_ids = None
        return gather_slots(hidden, state.view.src)

    @staticmethod
    def _scores(lay: VisionLayout, view: Optional[SeqView], q, k, lse, bias_used, prev_img_bias, cross_rows,
                scale, causal):
        """S_self, S_cross (I, N) of every image from one score layer, one atp_scores call per
        image slot (so per-sample row weights stay a (B, Lc) tensor over the slots the layer ran
        on). ``cross_rows`` (I, L): the rows of S_cross, in original positions."""
        b, lc = q.shape[0], q.shape[2]
        n_img, n = lay.image_pos.shape
        s_self = prev_img_bias.new_zeros(n_img, n)
        s_cross = prev_img_bias.new_zeros(n_img, n)
        w_img = prev_img_bias.exp()  # Eq. 3 rows weighted by their current soft mask (§3.2)
        for idx in lay.slot_images:
            rows = lay.image_sample[idx]
            # the image's tokens in the slots (lc: gone or past the image's count, a spare
            # column that is dropped)
            valid = lay.image_valid[idx]
            pos = lay.image_pos[idx].clamp_min(0)
            if view is not None:
                pos = view.inv[rows[:, None], pos]
            pos = torch.where(valid, pos, lc)
            w_self = lse.new_zeros(b, lc + 1, dtype=torch.float32)
            w_self[rows[:, None].expand(-1, n), pos] = w_img[idx]
            w_cross = lse.new_zeros(b, lc, dtype=torch.float32)
            w_cross[rows] = (cross_rows[idx] if view is None else gather_slots(cross_rows[idx], view.orig[rows], False)).float()
            ss, sc = atp_ops.atp_scores(q, k, lse, bias_used, w_self[:, :lc].contiguous(), w_cross,
                                        causal=causal, scale=scale)
            s_self[idx] = torch.nn.functional.pad(ss, (0, 1))[rows[:, None], pos].float()
            s_cross[idx] = torch.nn.functional.pad(sc, (0, 1))[rows[:, None], pos].float()
        return s_self, s_cross

    @staticmethod
    def _top_k(score: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
        """(I, N) bool: the ``k`` tokens with the highest ``score`` among each image's ``kept``
        ones (all of them where fewer are kept). The fixed-ratio baseline's selection (paper
        Table 2; FastV with S_cross as the score) and the hard masks' floor (ATPConfig.min_keep)."""
        ranked = torch.where(kept, score, torch.full_like(score, float("-inf")))
        order = ranked.argsort(dim=-1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                                .expand_as(order))
        return (rank < k) & kept

    # -- generate() ----------------------------------------------------------------------------

    def generate(self, model: nn.Module, stock_generate, *args, **kwargs):
        """``model.generate`` of an ATP model: the stock one, with the prompt length known to the
        prefix forwards (generated tokens never steer pruning) and the call's efficiency report
        left in ``model.atp_report``. Beam search and assisted decoding reorder or fork the
        cache, which the pruned per-layer cache does not follow: refused.

        Under FSDP2 (``fully_shard(model)``) the first call registers ``generate`` as an FSDP
        forward method (``register_fsdp_forward_method``), so the root's parameters are gathered
        around it as around ``forward``."""
        if not self._fsdp_generate and _is_fsdp2_root(model):
            from torch.distributed.fsdp import register_fsdp_forward_method

            register_fsdp_forward_method(model, "generate")  # wraps this very wrapper
            self._fsdp_generate = True
            return model.generate(*args, **kwargs)
        gen_config = kwargs.get("generation_config") or model.generation_config
        for name in ("num_beams", "num_beam_groups"):
            value = kwargs.get(name, getattr(gen_config, name, 1))
            if value is not None and value > 1:
                raise NotImplementedError(f"ATP-LLaVA generate(): {name}={value} is not supported (greedy and "
                                          "sampling are)")
        for name in ("assistant_model", "prompt_lookup_num_tokens", "penalty_alpha"):
            if kwargs.get(name, getattr(gen_config, name, None)) is not None:
                raise NotImplementedError(f"ATP-LLaVA generate(): {name} is not supported (greedy and sampling are)")
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("ATP-LLaVA generate() needs input_ids")
        self._prompt_len = int(input_ids.shape[1])
        self._prompt_inputs = {name: kwargs[name] for name in self.adapter.layout_inputs if kwargs.get(name) is not None}
        self._call_report = None
        try:
            out = stock_generate(*args, **kwargs)
        finally:
            self._prompt_len = None
            self._prompt_inputs = {}
        report, self._call_report = self._call_report, None
        if report is not None:
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            _, _, kv_heads, head_dim = self.dims
            per_token = kv_bytes_per_token(kv_heads, head_dim, self._element_bytes(model))
            object.__setattr__(model, "atp_report", report.with_generated(sequences.shape[1] - input_ids.shape[1],
                                                                           per_token))
        return out


def _is_fsdp2_root(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed
        return False
    return isinstance(model, FSDPModule)


def _last_rows(rows: torch.Tensor) -> torch.Tensor:
    """(I, L) bool -> the same with only the last True of each row kept (FastV's one query row)."""
    last = torch.where(rows, torch.arange(rows.shape[1], device=rows.device), -1).amax(1)
    out = torch.zeros_like(rows)
    has = last >= 0
    out[has.nonzero().squeeze(1), last[has]] = True
    return out


_ATP_OUTPUT_TYPES: Dict[type, type] = {}


def atp_output_type(cls: type) -> type:
    """The ModelOutput dataclass ``cls`` with two more fields, ``atp_stats`` and ``atp_losses``
    (one subclass per output class, made once: transformers registers every ModelOutput
    subclass as a torch pytree node, so DDP and torch.compile see the fields)."""
    if cls not in _ATP_OUTPUT_TYPES:
        if any(f.name == "atp_stats" for f in dataclasses.fields(cls)):
            _ATP_OUTPUT_TYPES[cls] = cls
        else:
            fields = [("atp_stats", Optional[Dict[str, Any]], field(default=None)),
                      ("atp_losses", Optional[Dict[str, torch.Tensor]], field(default=None))]
            sub = dataclasses.make_dataclass(f"ATP{cls.__name__}", fields, bases=(cls,))
            sub.__module__ = __name__
            sub.__doc__ = f"{cls.__name__} with ATP-LLaVA's ``atp_stats`` and ``atp_losses``."
            _ATP_OUTPUT_TYPES[cls] = sub
    return _ATP_OUTPUT_TYPES[cls]


def with_atp_fields(output, atp_stats: Dict[str, Any], atp_losses: Dict[str, torch.Tensor]):
    """``output`` (a ModelOutput) as its ATP subclass, with the two fields set."""
    cls = atp_output_type(type(output))
    values = {f.name: getattr(output, f.name) for f in dataclasses.fields(output)}
    values.update(atp_stats=atp_stats, atp_losses=atp_losses)
    return cls(**values)


def _output_cache(output) -> Optional[Any]:
    from transformers.cache_utils import DynamicCache

    if isinstance(output, tuple):
        return next((o for o in output if isinstance(o, DynamicCache)), None)
    return getattr(output, "cache", None)


def get_atp_controller(model: nn.Module) -> ATPController:
    ctrl = getattr(model, "_atp_controller", None)
    if ctrl is None:
        raise ValueError("this model has no ATP modules; call atp_llava.apply_atp(model, config) first")
    return ctrl


# ----------------------------------------------------------------------------------------------
# apply_atp


def apply_atp(model: nn.Module, config: ATPConfig) -> nn.Module:
    """Turn a stock vision-language model of a supported family (``atp_llava.models``:
    ``LlavaForConditionalGeneration``, ``LlavaNextForConditionalGeneration``, LLaVA-OneVision,
    Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL) into its ATP version, in place; returns it. Any
    other class is refused with the list of the supported ones.

    After this, ``model(input_ids=..., pixel_values=..., attention_mask=..., labels=...)``
    returns the stock output with ``loss = L_ntp + lambda_ATP L_ATP + w L_target`` (Eq. 14; ``w``, the
    buffer ``model.atp.budget_weight``, is ``lambda_target`` and grows while N_bar is off the target:
    ATPConfig.budget_control)
    (mode "adaptive") and an ``atp_stats`` dict (per-sample tokens per ATP layer, thetas,
    tokens per decoder layer, N_bar, the loss terms, FLOPs and KV-cache bytes against the
    unpruned model). ``model.atp`` holds the ATP parameters.
    ``model.train()``: soft masks (Eq. 9-11); ``model.eval()``: hard masks (if
    ``config.hard_in_eval``). Gradient checkpointing must be non-reentrant (transformers'
    default).
    """
    check_transformers_version()
    if getattr(model, "_atp_controller", None) is not None:
        raise ValueError("apply_atp: this model already has ATP modules")
    adapter = adapter_for(model, config)
    lm = adapter.language_model()
    text_config = adapter.text_config
    num_layers = text_config.num_hidden_layers
    config = config.for_depth(num_layers)
    if config.layers[-1] >= num_layers:
        raise ValueError(f"apply_atp: ATP layers {config.layers} must be < num_hidden_layers = {num_layers}")
    if getattr(text_config, "attention_dropout", 0.0):
        raise ValueError("apply_atp: the text model's attention_dropout must be 0 (atp_attention has none)")
    grid = adapter.grid
    if config.mode == "adaptive" and config.theta_override is None and config.target_ratio is None and grid:
        n_grid = grid[0] * grid[1]
        floor = min_reachable_tokens(config.layers, num_layers, n_grid, config.min_keep)
        if config.target_tokens < floor:
            warnings.warn(f"apply_atp: target_tokens={config.target_tokens} is below the least N_bar ATP layers "
                          f"{config.layers} of {num_layers} can reach ({floor:.1f}: layers before {config.layers[0]} "
                          f"see all {n_grid} tokens, later ones at least min_keep={config.min_keep}); the budget "
                          "loss will push every threshold to its limit", stacklevel=2)

    # What remove_atp restores.
    prev_requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    prev_attn_implementation = text_config._attn_implementation
    register_attention()
    param = next(lm.parameters())
    atp = ATPModules(config, grid).to(device=param.device)
    model.add_module("atp", atp)

    for name, p in model.named_parameters():
        if name.startswith("atp."):
            p.requires_grad_(True)
        elif config.train_lm:
            p.requires_grad_(not name.startswith(adapter.vision_prefixes()))
        else:
            p.requires_grad_(False)

    model.set_attn_implementation({"text_config": ATTN_IMPLEMENTATION})
    if text_config._attn_implementation != ATTN_IMPLEMENTATION:
        raise RuntimeError(f"apply_atp: could not set the text model's attention to {ATTN_IMPLEMENTATION!r}")

    ctrl = ATPController(model, atp, adapter, num_layers)
    ctrl.prev_requires_grad, ctrl.prev_attn_implementation = prev_requires_grad, prev_attn_implementation
    ctrl.handles.append(model.register_forward_pre_hook(ctrl.model_pre_forward, with_kwargs=True))
    ctrl.handles.append(model.register_forward_hook(ctrl.model_post_forward, with_kwargs=True))
    ctrl.handles.append(lm.register_forward_pre_hook(ctrl.language_model_pre_forward, with_kwargs=True))
    ctrl.handles.append(lm.register_forward_hook(ctrl.language_model_post_forward, with_kwargs=True))
    for layer in range(config.layers[0], num_layers):
        ctrl.handles.append(lm.layers[layer].register_forward_pre_hook(partial(ctrl.layer_pre_forward, layer),
                                                                       with_kwargs=True))
    if config.rope_2d:
        rotary = getattr(lm, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise TypeError("apply_atp: rope_2d needs the language model's rotary module (rotary_emb.inv_freq)")
        ctrl.rope_section = config.rope_2d_section or default_section(rotary.inv_freq.shape[0])
        if sum(ctrl.rope_section) != rotary.inv_freq.shape[0]:
            raise ValueError(f"apply_atp: rope_2d_section {ctrl.rope_section} must sum to head_dim / 2 = "
                             f"{rotary.inv_freq.shape[0]}")
        ctrl.handles.append(rotary.register_forward_hook(ctrl.rotary_post_forward, with_kwargs=True))
    object.__setattr__(model, "_atp_controller", ctrl)
    object.__setattr__(model, "generate", partial(ctrl.generate, model, model.generate))
    return model


def remove_atp(model: nn.Module) -> nn.Module:
    """Undo ``apply_atp``, in place; returns the model, a stock model of its class again.

    Removes the hooks, ``model.atp`` (its weights go with it: ``save_atp`` first to keep them),
    the ``generate`` wrapper and ``model.atp_report``, and restores the text model's attention
    implementation and every parameter's ``requires_grad`` as they were before ``apply_atp``.
    The model's outputs then equal a stock model's with the same weights, and ``apply_atp``
    works on it again.
    """
    ctrl = get_atp_controller(model)
    for handle in ctrl.handles:
        handle.remove()
    ctrl.handles.clear()
    del model.atp
    for name in ("_atp_controller", "generate", "atp_report"):  # instance attributes set by apply_atp / forwards
        model.__dict__.pop(name, None)
    model.set_attn_implementation({"text_config": ctrl.prev_attn_implementation})
    for name, p in model.named_parameters():
        if name in ctrl.prev_requires_grad:
            p.requires_grad_(ctrl.prev_requires_grad[name])
    return model
