"""Model adapters: the one seam between the ATP step and a model family.

An adapter answers, for one stock transformers model class, what the ATP step needs to know and
nothing else: where the decoder layers are, which parameters belong to the vision encoder, the
grid of a fixed-grid family, where each image's tokens of a batch lie and on which grid
(``ImageTokens``), which tokens are structural, how a batch without images still runs the vision
encoder (distributed training), and which ATPConfig options the family's positions rule out.
Scores, thresholds, masks, gathering and the pruned cache (step.py, state.py, patch.py) never
ask which family they run on.

    adapter_for(model, config) -> the adapter of ``type(model)``; an unknown class is refused with the
                           list of the supported ones (``SUPPORTED_MODELS``).
"""
from __future__ import annotations

import abc
import weakref
from typing import Any, Dict, Optional, Tuple, Type

import torch
from torch import nn

from ..core.config import ATPConfig
from ..core.layout import ImageTokens

__all__ = ["ModelAdapter", "adapter_for", "register_adapter", "SUPPORTED_MODELS", "REFUSED"]


class ModelAdapter(abc.ABC):
    """What the ATP step needs from one model family (subclass per family, ``register_adapter``).

    Class attributes:
        classes: the transformers model class names it serves.
        family: a short name (README's table of families).
        positions_3d: the model's own positions are already 2D/3D (M-RoPE), so
            ATPConfig.rope_2d is refused.
        layout_inputs: the forward arguments besides ``input_ids`` that ``image_tokens`` reads.
    """

    classes: Tuple[str, ...] = ()
    family: str = ""
    positions_3d: bool = False
    # forward arguments ``image_tokens`` reads beside input_ids; generate() hands the prompt's
    # to its prefill forward, which gets pre-encoded images (mm_encoder_outputs) instead
    layout_inputs: Tuple[str, ...] = ()
    takes_image_grid = False  # ATPConfig.image_grid applies (a fixed-grid family)
    needs_default_strategy = False  # the tower has a CLS token: vision_feature_select_strategy must drop it

    def __init__(self, model: nn.Module, config: ATPConfig):
        self._model = weakref.ref(model)  # the model holds its controller, which holds this
        self.check(config)
        self.grid = self.fixed_grid(config)

    @property
    def model(self) -> nn.Module:
        return self._model()

    # -- structure ---------------------------------------------------------------------------

    @property
    def inner(self) -> nn.Module:
        """The base model under the head (``model.model``)."""
        return self.model.model

    def language_model(self) -> nn.Module:
        """The decoder, with ``layers`` (each calling transformers' attention interface with its
        ``layer_idx``) and ``rotary_emb``."""
        lm = getattr(self.inner, "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise TypeError(f"apply_atp: {type(self.model).__name__} has no model.language_model.layers")
        return lm

    @property
    def text_config(self):
        return self.model.config.text_config

    def vision_prefixes(self) -> Tuple[str, ...]:
        """Parameter-name prefixes of the vision encoder (frozen when the LM trains)."""
        return ("model.vision_tower.",)

    def fixed_grid(self, config: ATPConfig) -> Optional[Tuple[int, int]]:
        """(H, W) of every image's one grid, or None when images differ in size."""
        return None

    def check(self, config: ATPConfig) -> None:
        """Refuse what this family cannot run, with the reason."""
        if config.image_grid is not None and not self.takes_image_grid:
            raise ValueError(f"apply_atp: ATPConfig.image_grid does not apply to {self.family}, whose images have "
                             "their own grids; leave it None")
        if self.needs_default_strategy and self.model.config.vision_feature_select_strategy != "default":
            raise ValueError(f"apply_atp: {self.family} with vision_feature_select_strategy 'full' (a CLS token per "
                             "tile) is not supported; use 'default'")
        if config.rope_2d and self.positions_3d:
            raise ValueError(f"apply_atp: rope_2d is for 1D-RoPE decoders; {type(self.model).__name__}'s positions "
                             "are already 3D (M-RoPE: every vision token has its own (t, row, col) position, "
                             "which pruning keeps)")

    # -- per batch ---------------------------------------------------------------------------

    @abc.abstractmethod
    def image_tokens(self, inputs: Dict[str, Any], valid: torch.Tensor) -> ImageTokens:
        """The images of the batch ``inputs`` (the model's forward arguments by name) whose
        real tokens are ``valid`` (B, L) bool."""

    def vision_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, L) bool: the placeholders the vision encoder's output fills (decoding refuses
        them; a sample with one has an image)."""
        return input_ids == self.model.config.image_token_id

    @abc.abstractmethod
    def null_vision(self) -> torch.Tensor:
        """0 times the vision encoder's and projector's output on one zero image (a batch without
        images under torch.distributed runs them as a batch with images does)."""


_ADAPTERS: Dict[str, Type[ModelAdapter]] = {}
SUPPORTED_MODELS: Tuple[str, ...] = ()


def register_adapter(cls: Type[ModelAdapter]) -> Type[ModelAdapter]:
    """Class decorator: serve ``cls.classes`` with ``cls``."""
    global SUPPORTED_MODELS
    for name in cls.classes:
        _ADAPTERS[name] = cls
    SUPPORTED_MODELS = tuple(sorted(_ADAPTERS))
    return cls


# Families that are known and not served yet, with the reason.
REFUSED: Dict[str, str] = {
    "Gemma3ForConditionalGeneration": "5 of 6 of its decoder layers use sliding-window attention and its image "
                                      "tokens attend bidirectionally within their block; atp_attention has neither "
                                      "a window nor a bidirectional block yet",
    "Qwen3VLMoeForConditionalGeneration": "no adapter yet (the Qwen3-VL adapter is tested on the dense model only)",
}


def adapter_for(model: nn.Module, config: ATPConfig) -> ModelAdapter:
    """The adapter of ``model``'s class (its own class or the nearest base class served), bound
    to ``config`` (its refusals checked, its grid found)."""
    for klass in type(model).__mro__:
        if klass.__name__ in _ADAPTERS:
            return _ADAPTERS[klass.__name__](model, config)
        if klass.__name__ in REFUSED:
            raise TypeError(f"apply_atp: {klass.__name__} is not supported: {REFUSED[klass.__name__]}. Supported "
                            f"model classes: {', '.join(SUPPORTED_MODELS)}")
    raise TypeError(f"apply_atp: {type(model).__name__} is not supported; supported model classes: "
                    f"{', '.join(SUPPORTED_MODELS)}")


from . import internvl, llava, llava_next, llava_onevision, qwen2_vl  # noqa: E402,F401  (register the families)
