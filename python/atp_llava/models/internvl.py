"""InternVL (``InternVLForConditionalGeneration``): an image is k tiles of the encoder's
resolution (dynamic tiling, plus a thumbnail tile when k > 1), each pixel-shuffled to an s x s
token grid, row-major, the tiles one after another; a video frame is an image of one tile.
Every run of image tokens is one image.

Where each tile lies in the picture is the processor's choice and is not among the model's
inputs, so an image's tiles are grids of one image without an arrangement: each scored on its
own grid (Eq. 5), all pooled onto the threshold MLP's one canvas as a video's frames are."""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch

from ..core.layout import ImageTokens, grid_coords, token_runs
from . import ModelAdapter, register_adapter


def _pair(x) -> Tuple[int, int]:
    return (int(x[0]), int(x[1])) if isinstance(x, (list, tuple)) else (int(x), int(x))


@register_adapter
class InternVLAdapter(ModelAdapter):
    classes = ("InternVLForConditionalGeneration",)
    family = "InternVL"
    needs_default_strategy = True

    @property
    def tile(self) -> Tuple[int, int]:
        """(s, s): the token grid of one tile after the pixel shuffle."""
        cfg = self.model.config
        (ih, iw), (ph, pw) = _pair(cfg.vision_config.image_size), _pair(cfg.vision_config.patch_size)
        r = cfg.downsample_ratio
        return int(ih // ph * r), int(iw // pw * r)

    def image_tokens(self, inputs: Dict[str, Any], valid: torch.Tensor) -> ImageTokens:
        input_ids = inputs["input_ids"]
        vision = self.vision_token_mask(input_ids)
        h, w = self.tile
        samples, positions, grids, shapes = [], [], [], []
        for b in range(input_ids.shape[0]):
            for run in token_runs(vision[b] & valid[b]):
                tiles, extra = divmod(run.numel(), h * w)
                if extra:
                    raise ValueError(f"ATP (InternVL): a run of {run.numel()} image tokens is not whole tiles of "
                                     f"{h} x {w} tokens")
                samples.append(b)
                positions.append(run)
                grids.append(grid_coords((h, w), frames=tiles))
                shapes.append(((h, w),) * tiles)
        return ImageTokens.pack(samples, positions, grids, shapes, vision)

    def null_vision(self) -> torch.Tensor:
        inner = self.inner
        cfg = inner.config
        vc = cfg.vision_config
        param = next(inner.vision_tower.parameters())
        size = _pair(vc.image_size)
        pixels = torch.zeros(1, vc.num_channels, *size, dtype=param.dtype, device=param.device)
        out = inner.get_image_features(pixel_values=pixels, vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return out.pooler_output.float().sum() * 0.0
