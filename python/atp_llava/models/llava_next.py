"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, anyres): each image is a base tile (the
whole picture at the encoder's resolution, H x W) followed by the high-resolution canvas (the
tiles stitched, the letterbox padding removed), laid out row by row, each row ending in the
``image_newline`` token, which is also ``image_token_id``. Token counts differ per image.

The layout is the model's own: ``pack_image_features`` run on codes in place of features
(0 base tile, 1 canvas, -1 newline) says which token is which; the canvas's rows are the runs
between newlines. Newlines are structural (never pruned). An image's two grids are two grids of
one image: each scored on its own grid (Eq. 5), both resampled onto the threshold MLP's canvas
(they cover the same picture)."""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch

from ..core.layout import ImageTokens, grid_coords
from . import ModelAdapter, register_adapter

NEWLINE = torch.full((1,), -1.0)  # the code of a newline token


def _grids(code: torch.Tensor, tile: Tuple[int, int]) -> Tuple[torch.Tensor, torch.Tensor, Tuple]:
    """One packed image's codes (n,) -> (bool (n,) its non-structural tokens, (N, 3) their
    (grid, row, col), the grid shapes): the base tile row-major, then the canvas rows, each
    ended by a newline."""
    real = code >= 0
    base = (code.round() == 0) & real
    n_base = int(base.sum())
    if n_base != tile[0] * tile[1]:
        raise ValueError(f"ATP (LLaVA-NeXT): an image packs {n_base} base-tile tokens, expected {tile[0] * tile[1]}")
    grids, shapes = [grid_coords(tile)], [tuple(tile)]
    canvas = code[n_base:]
    on = canvas >= 0
    # A canvas of tokens (not the one newline of a base-only image, nor the newlines alone of an
    # image so tall or wide that unpadding leaves its canvas 0 tokens across)
    if bool(on.any()):
        rows = (canvas < 0).long().cumsum(0) - (canvas < 0).long()  # row of each token: newlines before it
        width = int(on.sum()) // max(int((canvas < 0).sum()), 1)
        cols = torch.arange(canvas.numel()) - (rows * (width + 1))
        grids.append(torch.stack([torch.ones_like(rows[on]), rows[on], cols[on]], 1))
        shapes.append((int((canvas < 0).sum()), width))
        if int(on.sum()) != shapes[-1][0] * width:
            raise ValueError("ATP (LLaVA-NeXT): the canvas rows of an image differ in length")
    return real, torch.cat(grids), tuple(shapes)


@register_adapter
class LlavaNextAdapter(ModelAdapter):
    classes = ("LlavaNextForConditionalGeneration",)
    family = "LLaVA-NeXT"
    layout_inputs = ("image_sizes",)
    needs_default_strategy = True

    @property
    def tile(self) -> Tuple[int, int]:
        vc = self.model.config.vision_config
        return (vc.image_size // vc.patch_size,) * 2

    def num_patches(self, image_sizes: torch.Tensor, inputs: Dict[str, Any]) -> List[int]:
        """Tiles of each image, the base tile included."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        cfg = self.model.config
        return [image_size_to_num_patches(s, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
                for s in image_sizes]

    def pack(self, feats: List[torch.Tensor], image_sizes: torch.Tensor) -> List[torch.Tensor]:
        return self.inner.pack_image_features(feats, image_sizes, "default", image_newline=NEWLINE)[0]

    def image_codes(self, inputs: Dict[str, Any]) -> List[torch.Tensor]:
        """Per image, (n_i,) float codes of its packed tokens: 0 base tile, 1 canvas, -1 newline."""
        sizes = inputs.get("image_sizes")
        if sizes is None:
            return []
        sizes = torch.as_tensor(sizes).cpu()
        h, w = self.tile
        feats = []
        for n in self.num_patches(sizes, inputs):
            codes = torch.ones(n, h * w, 1)
            codes[0] = 0.0
            feats.append(codes)
        return [p.squeeze(-1) for p in self.pack(feats, sizes)]

    def image_tokens(self, inputs: Dict[str, Any], valid: torch.Tensor) -> ImageTokens:
        input_ids = inputs["input_ids"]
        vision = self.vision_token_mask(input_ids)
        samples, positions, grids, shapes = [], [], [], []
        coords = ((input_ids == self.model.config.image_token_id) & valid).nonzero()  # (T, 2), sample-major
        codes = self.image_codes(inputs) if coords.shape[0] else []
        lens = [int(c.shape[0]) for c in codes]
        if sum(lens) != coords.shape[0]:
            raise ValueError(f"ATP ({self.family}): the batch holds {coords.shape[0]} image tokens, its image_sizes "
                             f"give {sum(lens)} ({lens} per image)")
        for code, chunk in zip(codes, coords.split(lens)):
            if not bool((chunk[:, 0] == chunk[0, 0]).all()):
                raise ValueError(f"ATP ({self.family}): an image's tokens span two samples")
            real, grid, image_shapes = _grids(code, self.tile)
            samples.append(int(chunk[0, 0]))
            positions.append(chunk[real.to(chunk.device), 1])
            grids.append(grid)
            shapes.append(image_shapes)
        self.more_images(inputs, valid, samples, positions, grids, shapes)
        return ImageTokens.pack(samples, positions, grids, shapes, vision)

    def more_images(self, inputs, valid, samples, positions, grids, shapes) -> None:
        """Other visual inputs of the batch (LLaVA-OneVision's videos), appended to the lists."""

    def null_vision(self) -> torch.Tensor:
        inner = self.inner
        cfg = inner.config
        vc = cfg.vision_config
        param = next(inner.vision_tower.parameters())
        sizes = torch.tensor([[vc.image_size, vc.image_size]], device=param.device)
        n = self.num_patches(sizes.cpu(), {})[0]
        pixels = torch.zeros(1, n, vc.num_channels, vc.image_size, vc.image_size, dtype=param.dtype,
                             device=param.device)
        out = inner.get_image_features(pixel_values=pixels, image_sizes=sizes,
                                       vision_feature_layer=cfg.vision_feature_layer,
                                       vision_feature_select_strategy=cfg.vision_feature_select_strategy)
        return (sum(f.float().sum() for f in out.pooler_output) + inner.image_newline.float().sum()) * 0.0
