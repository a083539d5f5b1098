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

This module holds the version gate, the hooks (``ATPController``) and ``apply_atp`` /
``remove_atp``; the ``generate`` wrapper is generate.py, and the parts they wire together are
the core's: the per-forward state (core/state.py), the attention function and its mask
function (core/attention.py), the ATP step (core/step.py), and the forward's ``atp_stats``,
budget terms and output fields (core/stats.py).
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from functools import partial
from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from .core import flash
from .core.attention import ATTN_IMPLEMENTATION, register_attention
from .core.config import ATPConfig
from .core.distributed import is_distributed
from .core.efficiency import ATPReport
from .core.layout import VisionLayout, padding_bias, valid_mask
from .core.losses import SAMPLES_IN_BATCH, budget_share, min_reachable_tokens
from .core.modules import ATPModules
from .core.rope2d import default_section, positions_3d, rope_2d_cos_sin
from .core.state import ATPHandle, ATPState, CacheState, DecodeState, state_of
from .core.stats import BudgetWindow, element_bytes, forward_stats, with_atp_fields
from .core.step import atp_step
from .generate import atp_generate
from .models import ModelAdapter, adapter_for


__all__ = ["apply_atp", "remove_atp", "get_atp_controller", "ATPController", "SUPPORTED_TRANSFORMERS",
           "check_transformers_version"]

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
        self.prompt_len: Optional[int] = None  # inside generate(): the prompt's length
        self.prompt_inputs: Dict[str, Any] = {}  # inside generate(): the prompt's adapter.layout_inputs
        self.fsdp_generate = False  # generate() registered as an FSDP2 forward method
        self.call_report: Optional[ATPReport] = None  # inside generate(): its first forward's report
        self.rope_section: Optional[Tuple[int, int, int]] = None
        self.handles = []
        self._budget = BudgetWindow()  # the budget weight's adaptation (ATPConfig.budget_control)
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
        for name, value in self.prompt_inputs.items():  # generate(): the prompt's image sizes and grids
            if bound.get(name) is None and input_ids.shape[1] >= self.prompt_len:
                bound[name] = value
        tokens = self.adapter.image_tokens(bound, valid_mask(input_ids, attention_mask))
        layout = VisionLayout.from_tokens(tokens, input_ids, attention_mask, bound.get("labels"), self.prompt_len)
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
        stats, budget, live_losses = forward_stats(state, self.atp, self.config, self.num_layers, self.dims,
                                                   element_bytes(module), module.training, self._budget)
        if state.prune:
            cache = _output_cache(output)
            if cache is not None:
                kernel = flash.decode_kernel(module, self.dims[3], self.config.flash_decode)
                self._caches[cache] = CacheState.of_prefill(state, self.config.layers[0], self.num_layers, kernel)

        report = ATPReport.from_stats(stats)
        object.__setattr__(module, "atp_report", report)
        if self.prompt_len is not None and self.call_report is None:
            self.call_report = report  # generate(): the prompt's forward
        if isinstance(output, tuple):
            return output
        loss = getattr(output, "loss", None)
        if loss is not None:
            stats["loss_ntp"] = loss.detach()
            output.loss = loss + budget  # Eq. 14 (adaptive; otherwise + 0)
        # atp_stats and the live (graph-connected) budget terms, for custom objectives and
        # loggers, as fields of the output: wrappers that rebuild it (DDP) keep them.
        return with_atp_fields(output, atp_stats=stats, atp_losses=live_losses)

    # -- decoder layers from the first ATP layer on -------------------------------------------

    def layer_pre_forward(self, layer: int, module, args, kwargs):
        """Before decoder layer ``layer``: the ATP step if ``layer`` is an ATP layer; in a pruned
        forward, the layer's hidden states and rotary inputs in the slots it runs on."""
        state = state_of(kwargs)
        if not isinstance(state, ATPState):
            return None
        hidden = args[0] if args else kwargs["hidden_states"]
        if layer in self.config.layers:
            hidden = atp_step(state, layer, hidden, self.atp, self.config, self._random)
        if state.view is None:
            return None
        if state.position_embeddings is None:
            # The language model hands every layer the same rotary inputs of the full sequence.
            state.position_embeddings = tuple(state.view.gather(t) for t in kwargs["position_embeddings"])
            pid = kwargs.get("position_ids")
            state.position_ids = None if pid is None else state.view.gather(pid)
        kwargs = {**kwargs, "position_embeddings": state.position_embeddings}
        if "position_ids" in kwargs:
            kwargs["position_ids"] = state.position_ids
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}


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
    object.__setattr__(model, "generate", partial(atp_generate, ctrl, model, model.generate))
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
