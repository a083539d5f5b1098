"""Where the vision tokens are: per-sample image spans found from ``input_ids == image_token_id``.

Nothing here assumes an offset or a length of the prompt: every span, every padding position and
the instruction rows used for S_cross are read from the batch itself.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

__all__ = ["VisionLayout", "SeqView", "gather_slots", "padding_bias", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def padding_bias(valid: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """key_bias of a padding mask: 0 where ``valid`` (bool, any shape), -inf elsewhere."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


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
        slot_images      one (I_s,) long per image slot s: the images that are their sample's
                         image s (slot 0: every sample's first image, ...)
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
    slot_images: Tuple[torch.Tensor, ...]

    @property
    def num_images(self) -> int:
        return int(self.image_sample.shape[0])

    @property
    def max_slots(self) -> int:
        return len(self.slot_images)

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, image_token_id: int, n_grid: int,
                   attention_mask: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None,
                   prompt_len: Optional[int] = None) -> "VisionLayout":
        """Build the layout from ``input_ids`` (B, L), the optional padding ``attention_mask``
        (B, L) (1 = real token; left or right padding) and optional ``labels`` (B, L) (HF
        convention: ``labels[b, t] != -100`` marks token t as an answer token). ``prompt_len``:
        positions from it on are generated tokens (generate() recomputing its prefix), which
        are not instruction rows either, so pruning follows the prompt alone.

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
        pad_bias = padding_bias(valid)

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
        max_slots = int(images_per_sample.max()) if num_images else 0
        slot_images = tuple((image_slot == s).nonzero().squeeze(1) for s in range(max_slots))

        text = valid & ~(input_ids == image_token_id)
        if labels is not None:
            text = text & (labels.to(device) == IGNORE_INDEX)
        if prompt_len is not None:
            text = text & (torch.arange(l, device=device) < prompt_len)[None, :]
        after = torch.arange(l, device=device)[None, :] > image_pos[:, -1:]
        text_rows = after & text[image_sample]
        return cls(batch=b, seq_len=l, n_grid=n_grid, pad_bias=pad_bias, image_sample=image_sample,
                   image_slot=image_slot, image_pos=image_pos, text_rows=text_rows,
                   images_per_sample=images_per_sample, slot_images=slot_images)

    def scatter(self, img_values: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(B, L): ``base`` (B, L) with the image positions replaced by ``img_values`` (I, N), e.g.
        the key bias from ``pad_bias`` and the images' log masks. Differentiable in img_values."""
        if self.num_images == 0:
            return base
        rows = self.image_sample[:, None].expand_as(self.image_pos)
        return base.index_put((rows.reshape(-1), self.image_pos.reshape(-1)), img_values.reshape(-1).to(base.dtype))

    def per_sample_mean(self, per_image: torch.Tensor) -> torch.Tensor:
        """(I, ...) -> (B, ...): mean over each sample's images (0 for samples without one)."""
        out = per_image.new_zeros((self.batch,) + per_image.shape[1:])
        out = out.index_add(0, self.image_sample, per_image)
        denom = self.images_per_sample.clamp_min(1).to(per_image.dtype)
        return out / denom.view((-1,) + (1,) * (per_image.dim() - 1))


def gather_slots(x: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``out[b, j] = x[b, index[b, j]]`` along dim 1, ``fill`` where ``index`` is -1.
    x (B or 1, L, ...), index (B, Lc) long -> (B, Lc, ...)."""
    b, lc = index.shape
    x = x.expand((b,) + x.shape[1:])
    trail = (1,) * (x.dim() - 2)
    out = x.gather(1, index.clamp_min(0).view(b, lc, *trail).expand((b, lc) + x.shape[2:]))
    return out.masked_fill((index < 0).view(b, lc, *trail), fill)


@dataclass
class SeqView:
    """Which original positions a pruned sequence holds (inference with real pruning).

    After an ATP layer drops tokens, every sample keeps its own number of tokens; the batch is
    padded to the longest, right-aligned (the empty slots come first, like left padding, so the
    last slot is always the sample's last token and new tokens append after it).

        orig   (B, Lc) long: the original position held by each slot, -1 for an empty slot
        src    (B, Lc) long: the slot of the previous view (or original position) it came from
        valid  (B, Lc) bool: slot holds a token
        inv    (B, L) long: the slot of each original position, Lc where it is gone
    """

    orig: torch.Tensor
    src: torch.Tensor
    valid: torch.Tensor
    inv: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.orig.shape[1])

    @classmethod
    def keep(cls, keep: torch.Tensor, prev: Optional["SeqView"], seq_len: int) -> "SeqView":
        """The view of the slots of ``prev`` (identity if None) where ``keep`` (B, Lc_prev) holds."""
        b, n = keep.shape
        counts = keep.sum(1)
        length = int(counts.max().item()) if b else 0  # the one host sync: the new length
        # Each kept column's slot; dropped columns go to a spare slot (length) that is cut off.
        slot = torch.where(keep, keep.cumsum(1) - 1 + (length - counts)[:, None], length)
        cols = torch.arange(n, device=keep.device).expand(b, n)
        src = _scatter_cut(torch.full((b, length), -1, dtype=torch.long, device=keep.device), slot, cols)
        orig = src if prev is None else gather_slots(prev.orig, src, -1)
        valid = orig >= 0
        slots = torch.arange(length, device=keep.device).expand(b, length)
        inv = _scatter_cut(torch.full((b, seq_len), length, dtype=torch.long, device=keep.device),
                           torch.where(valid, orig, seq_len), slots)
        return cls(orig=orig, src=src, valid=valid, inv=inv)

    def untake(self, x: torch.Tensor, seq_len: int, fill: float = 0.0) -> torch.Tensor:
        """x (B, Lc, ...) in slots -> (B, L, ...) in original positions; ``fill`` where gone."""
        out = x.new_full((x.shape[0], seq_len) + x.shape[2:], fill)
        return _scatter_cut(out, torch.where(self.valid, self.orig, seq_len), x)


def _scatter_cut(out: torch.Tensor, index: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """``out[b, index[b, j]] = src[b, j]`` along dim 1, where ``index == out.shape[1]`` marks
    entries to drop (they land in a spare column that is cut off). No host sync.
    out (B, L, ...), index (B, Lc) long, src (B, Lc, ...)."""
    b, l = out.shape[:2]
    spare = torch.cat([out, out[:, :1]], 1)
    trail = (1,) * (src.dim() - 2)
    return spare.scatter_(1, index.view(b, -1, *trail).expand(src.shape), src)[:, :l]
