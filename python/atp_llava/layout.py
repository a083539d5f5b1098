"""Where the vision tokens are: per-sample image spans found from ``input_ids == image_token_id``.

Nothing here assumes an offset or a length of the prompt: every span, every padding position and
the instruction rows used for S_cross are read from the batch itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["VisionLayout", "IGNORE_INDEX"]

IGNORE_INDEX = -100


@dataclass
class VisionLayout:
    """The vision-token layout of one batch.

    Shapes (B batch, L sequence, I images in the batch, N = H * W tokens per image):
        pad_bias         (B, L) float32: 0 for real tokens, -inf for padding (key_bias base)
        image_sample     (I,) long: the sample each image belongs to
        image_slot       (I,) long: the image's index within its sample (0, 1, ...)
        image_pos        (I, N) long: sequence positions of the image's tokens, grid row-major
        text_rows        (I, L) bool: the rows that define S_cross of this image: real, non-image
                         tokens after the image that are not answer tokens (labels == -100)
        images_per_sample (B,) long
    """

    batch: int
    seq_len: int
    n_grid: int
    pad_bias: torch.Tensor
    image_sample: torch.Tensor
    image_slot: torch.Tensor
    image_pos: torch.Tensor
    text_rows: torch.Tensor
    images_per_sample: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.image_sample.shape[0])

    @property
    def max_slots(self) -> int:
        return int(self.images_per_sample.max().item()) if self.batch else 0

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, image_token_id: int, n_grid: int,
                   attention_mask: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None) -> "VisionLayout":
        """Build the layout from ``input_ids`` (B, L), the optional padding ``attention_mask``
        (B, L) (1 = real token; left or right padding) and optional ``labels`` (B, L) (HF
        convention: ``labels[b, t] != -100`` marks token t as an answer token).

        A run of image tokens must hold a whole number of images (k * n_grid tokens); each chunk
        of n_grid consecutive image tokens is one image, so several images per prompt work.
        """
        if input_ids.dim() != 2:
            raise ValueError(f"VisionLayout: input_ids must be (B, L), got {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        device = input_ids.device
        if attention_mask is None:
            valid = torch.ones(b, l, dtype=torch.bool, device=device)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"VisionLayout: attention_mask must be (B, L) = {tuple(input_ids.shape)}, "
                                 f"got {tuple(attention_mask.shape)}")
            valid = attention_mask.to(device=device).bool()
        pad_bias = torch.zeros(b, l, dtype=torch.float32, device=device).masked_fill(~valid, float("-inf"))

        is_img = (input_ids == image_token_id) & valid
        counts = is_img.sum(1)
        if bool((counts % n_grid != 0).any()):
            raise ValueError(f"VisionLayout: every sample must hold a whole number of images of {n_grid} "
                             f"image tokens each; image-token counts per sample: {counts.tolist()}")
        images_per_sample = counts // n_grid
        coords = is_img.nonzero()  # (T, 2), ordered by sample then position
        num_images = coords.shape[0] // n_grid
        coords = coords.view(num_images, n_grid, 2)
        image_sample = coords[:, 0, 0]
        image_pos = coords[:, :, 1]
        contiguous = (image_pos[:, -1] - image_pos[:, 0] == n_grid - 1) & (coords[:, :, 0] == image_sample[:, None]).all(1)
        if not bool(contiguous.all()):
            raise ValueError("VisionLayout: image tokens must come in contiguous runs of "
                             f"{n_grid} per image (the vision-token grid)")
        first = torch.zeros(b + 1, dtype=torch.long, device=device)
        first[1:] = images_per_sample.cumsum(0)
        image_slot = torch.arange(num_images, device=device) - first[image_sample]

        text = valid & ~(input_ids == image_token_id)
        if labels is not None:
            text = text & (labels.to(device) == IGNORE_INDEX)
        after = torch.arange(l, device=device)[None, :] > image_pos[:, -1:]
        text_rows = after & text[image_sample]
        return cls(batch=b, seq_len=l, n_grid=n_grid, pad_bias=pad_bias, image_sample=image_sample,
                   image_slot=image_slot, image_pos=image_pos, text_rows=text_rows,
                   images_per_sample=images_per_sample)

    def scatter_bias(self, img_bias: torch.Tensor) -> torch.Tensor:
        """The (B, L) key bias: ``pad_bias`` with the image positions replaced by ``img_bias``
        (I, N). Differentiable in img_bias."""
        if self.num_images == 0:
            return self.pad_bias
        rows = self.image_sample[:, None].expand_as(self.image_pos)
        return self.pad_bias.index_put((rows.reshape(-1), self.image_pos.reshape(-1)),
                                       img_bias.reshape(-1).to(self.pad_bias.dtype))

    def per_sample_mean(self, per_image: torch.Tensor) -> torch.Tensor:
        """(I, ...) -> (B, ...): mean over each sample's images (0 for samples without one)."""
        out = per_image.new_zeros((self.batch,) + per_image.shape[1:])
        out = out.index_add(0, self.image_sample, per_image)
        denom = self.images_per_sample.clamp_min(1).to(per_image.dtype)
        return out / denom.view((-1,) + (1,) * (per_image.dim() - 1))
