"""LLaVA-1.5 (``LlavaForConditionalGeneration``): one fixed H x W grid per image (24 x 24 at
336 px, CLS dropped), each image one run of H * W image tokens, row-major; 1D RoPE."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

from ..core.config import ATPConfig
from ..core.layout import ImageTokens, fixed_grid_tokens
from . import ModelAdapter, register_adapter


@register_adapter
class LlavaAdapter(ModelAdapter):
    classes = ("LlavaForConditionalGeneration",)
    family = "LLaVA-1.5"
    takes_image_grid = True

    def fixed_grid(self, config: ATPConfig) -> Optional[Tuple[int, int]]:
        if config.image_grid is not None:
            return config.image_grid
        cfg = self.model.config
        if getattr(cfg, "vision_feature_select_strategy", "default") != "default":
            raise ValueError("apply_atp: vision_feature_select_strategy 'full' adds a CLS token to the grid; "
                             "set ATPConfig.image_grid explicitly or use 'default'")
        side = cfg.vision_config.image_size // cfg.vision_config.patch_size
        return side, side

    def image_tokens(self, inputs: Dict[str, Any], valid: torch.Tensor) -> ImageTokens:
        return fixed_grid_tokens(inputs["input_ids"], valid, self.model.config.image_token_id, self.grid)

    def null_vision(self) -> torch.Tensor:
        llava = self.inner
        vc = llava.config.vision_config
        param = next(llava.vision_tower.parameters())
        pixels = torch.zeros(1, vc.num_channels, vc.image_size, vc.image_size, dtype=param.dtype, device=param.device)
        out = llava.get_image_features(pixel_values=pixels, vision_feature_layer=llava.config.vision_feature_layer,
                                       vision_feature_select_strategy=llava.config.vision_feature_select_strategy)
        return sum(f.float().sum() for f in out.pooler_output) * 0.0
