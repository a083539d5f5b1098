"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres): each image is a base tile (the
whole picture at the encoder's resolution, H x W) followed by the high-resolution canvas (the
tiles stitched, the letterbox padding removed), laid out row by row, each row ending in the
``image_newline`` token, which is also ``image_token_id``. Token counts differ per image.

The layout is the model's own: ``pack_image_features`` run on (grid, row, col) codes in place of
features tells every token's grid and position and which tokens are newlines (structural: never
pruned). An image's two grids are two grids of one image: each scored on its own grid (Eq. 5),
both resampled onto the threshold MLP's canvas (they cover the same picture)."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..config import ATPConfig
from ..layout import ImageTokens
from . import ModelAdapter, register_adapter


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    classes = ("LlavaNextForConditionalGeneration",)
    family = "LLaVA-NeXT"
    layout_inputs = ("image_sizes",)

    def check(self, config: ATPConfig) -> None:
        super().check(config)
        if getattr(self.model.config, "vision_feature_select_strategy", "default") != "default":
            raise ValueError("apply_atp: LLaVA-NeXT with vision_feature_select_strategy 'full' (a CLS token per "
                             "tile) is not supported; use 'default'")
        if config.image_grid is not None:
            raise ValueError("apply_atp: ATPConfig.image_grid does not apply to LLaVA-NeXT, whose images have "
                             "their own grids (base tile and canvas); leave it None")

    def _codes(self, image_sizes: torch.Tensor) -> List[torch.Tensor]:
        """Per image, (n_i, 3) float (grid, row, col) of its tokens as the model packs them; -1 on newlines."""
        from transformers.models.llava_next.modeling_llava_next import (get_anyres_image_grid_shape,
                                                                        image_size_to_num_patches)

        cfg = self.model.config
        size = cfg.vision_config.image_size
        h = w = size // cfg.vision_config.patch_size
        rc = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(h * w, 2)
        feats = []
        for image_size in image_sizes:
            n = image_size_to_num_patches(image_size, cfg.image_grid_pinpoints, size)
            codes = torch.zeros(n, h * w, 3)
            codes[0, :, 1:] = rc
            if n > 1:
                _, npw = get_anyres_image_grid_shape(image_size, cfg.image_grid_pinpoints, size)
                for t in range(1, n):
                    ph, pw = divmod(t - 1, npw)
                    codes[t, :, 0] = 1
                    codes[t, :, 1] = rc[:, 0] + ph * h
                    codes[t, :, 2] = rc[:, 1] + pw * w
            feats.append(codes)
        packed, _ = self.inner.pack_image_features(feats, image_sizes.cpu(), "default",
                                                   image_newline=torch.full((3,), -1.0))
        return packed

    def image_tokens(self, inputs: Dict[str, Any], valid: torch.Tensor) -> ImageTokens:
        input_ids = inputs["input_ids"]
        vision = input_ids == self.model.config.image_token_id
        coords = (vision & valid).nonzero()  # (T, 2), sample-major
        sizes = inputs.get("image_sizes")
        codes = [] if sizes is None or coords.shape[0] == 0 else self._codes(torch.as_tensor(sizes))
        lens = [int(c.shape[0]) for c in codes]
        if sum(lens) != coords.shape[0]:
            raise ValueError(f"ATP (LLaVA-NeXT): the batch holds {coords.shape[0]} image tokens, its image_sizes "
                             f"give {sum(lens)} ({lens} per image)")
        samples, positions, grids, shapes = [], [], [], []
        for code, chunk in zip(codes, coords.split(lens)):
            if not bool((chunk[:, 0] == chunk[0, 0]).all()):
                raise ValueError("ATP (LLaVA-NeXT): an image's tokens span two samples")
            real = code[:, 0] >= 0  # newlines are structural
            g = code[real].long()
            image_shapes: List[Tuple[int, int]] = []
            for k in range(int(g[:, 0].max()) + 1):
                on = g[:, 0] == k
                g[on, 1:] -= g[on, 1:].amin(0)  # the canvas after unpadding starts at (0, 0)
                image_shapes.append(tuple(int(x) + 1 for x in g[on, 1:].amax(0)))
            samples.append(int(chunk[0, 0]))
            positions.append(chunk[real.to(chunk.device), 1])
            grids.append(g)
            shapes.append(tuple(image_shapes))
        return ImageTokens.pack(samples, positions, grids, shapes, vision)

    def null_vision(self) -> torch.Tensor:
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        inner = self.inner
        cfg = inner.config
        vc = cfg.vision_config
        param = next(inner.vision_tower.parameters())
        n = image_size_to_num_patches((vc.image_size, vc.image_size), cfg.image_grid_pinpoints, vc.image_size)
        pixels = torch.zeros(1, n, vc.num_channels, vc.image_size, vc.image_size, dtype=param.dtype,
                             device=param.device)
        sizes = torch.tensor([[vc.image_size, vc.image_size]], device=param.device)
        out = inner.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                       vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return (sum(f.float().sum() for f in out.pooler_output) + inner.image_newline.float().sum()) * 0.0
