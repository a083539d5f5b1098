"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dynamic resolution, M-RoPE): image i has an LLM grid of
``image_grid_thw[i] / (1, m, m)`` (m = ``spatial_merge_size``), its tokens row-major frame by
frame; a video is one image with a grid per temporal patch (a time coordinate), its tokens
``video_token_id``. Token counts and grids differ per image.

Positions: the model builds 3D M-RoPE ids (t, h, w) itself (``get_rope_index``) and every decoder
layer receives the one (cos, sin) of shape (B, L, head_dim) they give; a pruned forward gathers
those with the tokens, so every kept token keeps the position the stock model gives it, and the
generated tokens' positions (``rope_deltas``, from the unpruned first layers' cache length) are
the stock ones. ``rope_2d`` is refused (the positions already are 3D). The
``vision_start``/``vision_end`` tokens around each image are structural.

Qwen3-VL's deepstack adds vision features at the image tokens after each of its first
``len(deepstack_visual_indexes)`` decoder layers; an ATP layer before those would prune tokens
the additions still address, so ATP layers start at the first layer after them (refused
otherwise, naming it)."""
from __future__ import annotations

from typing import Any, Dict

import torch

from ..core.config import ATPConfig
from ..core.layout import ImageTokens, grid_coords
from . import ModelAdapter, register_adapter


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    classes = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    family = "Qwen2-VL / Qwen2.5-VL"
    positions_3d = True
    layout_inputs = ("image_grid_thw", "video_grid_thw")

    def vision_prefixes(self):
        return ("model.visual.",)

    def _ids(self, *names: str):
        cfg = self.model.config
        return [getattr(cfg, n) for n in names if getattr(cfg, n, None) is not None]

    def vision_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.isin(input_ids, torch.tensor(self._ids("image_token_id", "video_token_id"), device=input_ids.device))

    def image_tokens(self, inputs: Dict[str, Any], valid: torch.Tensor) -> ImageTokens:
        input_ids = inputs["input_ids"]
        cfg = self.model.config
        m = cfg.vision_config.spatial_merge_size
        vision = torch.isin(input_ids, torch.tensor(self._ids("image_token_id", "video_token_id",
                                                              "vision_start_token_id", "vision_end_token_id"),
                                                    device=input_ids.device))
        samples, positions, grids, shapes = [], [], [], []
        for token_id, key in ((cfg.image_token_id, "image_grid_thw"), (cfg.video_token_id, "video_grid_thw")):
            coords = ((input_ids == token_id) & valid).nonzero()
            thw = inputs.get(key)
            thw = [] if thw is None or coords.shape[0] == 0 else [tuple(int(x) for x in row) for row in thw]
            lens = [t * (h // m) * (w // m) for t, h, w in thw]
            if sum(lens) != coords.shape[0]:
                raise ValueError(f"ATP (Qwen2-VL): the batch holds {coords.shape[0]} tokens {token_id}, its {key} "
                                 f"gives {sum(lens)} ({lens} per image)")
            for (t, h, w), chunk in zip(thw, coords.split(lens)):
                if not bool((chunk[:, 0] == chunk[0, 0]).all()):
                    raise ValueError("ATP (Qwen2-VL): an image's tokens span two samples")
                samples.append(int(chunk[0, 0]))
                positions.append(chunk[:, 1])
                grids.append(grid_coords((h // m, w // m), frames=t))
                shapes.append(((h // m, w // m),) * t)
        return ImageTokens.pack(samples, positions, grids, shapes, vision)

    def null_vision(self) -> torch.Tensor:
        inner = self.inner
        vc = inner.config.vision_config
        param = next(inner.visual.parameters())
        m = vc.spatial_merge_size
        pixels = torch.zeros(m * m, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2,
                             dtype=param.dtype, device=param.device)
        out = inner.get_image_features(pixels, torch.tensor([[1, m, m]], device=param.device))
        return sum(f.float().sum() for f in self.encoder_outputs(out)) * 0.0

    def encoder_outputs(self, out) -> list:
        """Every tensor the vision encoder's output ``out`` hands the language model."""
        return list(out.pooler_output)


@register_adapter
class Qwen3VLAdapter(Qwen2VLAdapter):
    classes = ("Qwen3VLForConditionalGeneration",)
    family = "Qwen3-VL"

    def check(self, config: ATPConfig) -> None:
        super().check(config)
        first = len(self.model.config.vision_config.deepstack_visual_indexes)
        layers = config.for_depth(self.text_config.num_hidden_layers).layers
        if layers[0] < first:
            raise ValueError(f"apply_atp: Qwen3-VL's deepstack adds vision features after its first {first} decoder "
                             f"layers, at the positions of every image token; ATP layers {layers} would prune before "
                             f"that. The first allowed ATP layer is {first}")

    def encoder_outputs(self, out) -> list:
        return super().encoder_outputs(out) + [f for level in out.deepstack_features for f in level]
