"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``): LLaVA-NeXT's anyres layout
(LlavaNextAdapter) with a SigLIP tower (no CLS token), a canvas that ``anyres_max_N``
shrinks (bilinearly) when it holds more than N tiles' worth of tokens, one tile and one newline
per image when a sample holds several images (``batch_num_images``), and videos: each frame
pooled to ceil(H / 2) x ceil(W / 2) tokens, the frames one after another, one newline after the
last, all ``video_token_id``. A video is one image with a grid per frame."""
from __future__ import annotations

import math
from typing import Any, Dict, List

import torch

from ..core.layout import grid_coords, token_runs
from . import register_adapter
from .llava_next import NEWLINE, LlavaNextAdapter


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    classes = ("LlavaOnevisionForConditionalGeneration",)
    family = "LLaVA-OneVision"
    layout_inputs = ("image_sizes", "batch_num_images")
    needs_default_strategy = False  # SigLIP: no CLS token, "full" is every token

    def num_patches(self, image_sizes: torch.Tensor, inputs: Dict[str, Any]) -> List[int]:
        per_sample = inputs.get("batch_num_images")
        full = super().num_patches(image_sizes, inputs)
        if per_sample is None:
            return full
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [n if one else 1 for n, one in zip(full, single)]

    def pack(self, feats: List[torch.Tensor], image_sizes: torch.Tensor) -> List[torch.Tensor]:
        return self.inner.pack_image_features(feats, image_sizes, image_newline=NEWLINE,
                                              vision_aspect_ratio=self.model.config.vision_aspect_ratio)[0]

    def vision_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        cfg = self.model.config
        return (input_ids == cfg.image_token_id) | (input_ids == cfg.video_token_id)

    def more_images(self, inputs, valid, samples, positions, grids, shapes) -> None:
        """Every run of video tokens is one video: F frames of ceil(H / 2) x ceil(W / 2) tokens
        and one newline at its end (structural)."""
        h, w = (math.ceil(s / 2) for s in self.tile)
        is_video = (inputs["input_ids"] == self.model.config.video_token_id) & valid
        for b in range(is_video.shape[0]):
            for run in token_runs(is_video[b]):
                frames, extra = divmod(run.numel() - 1, h * w)
                if extra or frames < 1:
                    raise ValueError(f"ATP (LLaVA-OneVision): a run of {run.numel()} video tokens is not frames of "
                                     f"{h} x {w} tokens and one newline")
                samples.append(b)
                positions.append(run[:-1])
                grids.append(grid_coords((h, w), frames=frames))
                shapes.append(((h, w),) * frames)
