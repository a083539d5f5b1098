"""Where the vision tokens are: every image's tokens, the grids they lie on, the padding and the
instruction rows of S_cross, for one batch.

A model adapter (``atp_llava.models``) finds the images (``ImageTokens``); nothing here knows the
model family, assumes an offset or a length of the prompt, or that images have equal sizes:
each image has its own token count and grids, and per-image tensors are padded to the longest.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import List, Optional, Sequence, Tuple, Union

import torch

__all__ = ["VisionLayout", "ImageTokens", "ImageSlot", "fixed_grid_tokens", "grid_coords", "token_runs", "valid_mask", "padding_bias", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def padding_bias(valid: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """key_bias of a padding mask: 0 where ``valid`` (bool, any shape), -inf elsewhere."""
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill(~valid, float("-inf"))


@dataclass
class ImageTokens:
    """Where one batch's images are, as a model adapter (``atp_llava.models``) finds them.

    An "image" is one unit of pruning (one picture, or one video): its vision tokens, each on
    one of the image's grids at a (row, col). LLaVA-1.5 has one H x W grid per image; LLaVA-NeXT
    a base tile and the unpadded high-resolution canvas; Qwen2-VL one grid per frame.

        sample  (I,) long: the sample of each image, images ordered by sample then position
        pos     (I, N) long: the sequence position of each vision token, -1 past the image's
                count (N is the largest count in the batch)
        grid    (I, N, 3) long: (grid index within the image, row, col) of each token
        shapes  one tuple per image of the (H, W) of each of its grids
        vision  (B, L) bool: every position the vision encoder fills or brackets, the images'
                tokens and the structural ones (row newlines, boundary tokens), which are
                never pruned and are not instruction rows of S_cross
    """

    sample: torch.Tensor
    pos: torch.Tensor
    grid: torch.Tensor
    shapes: Tuple[Tuple[Tuple[int, int], ...], ...]
    vision: torch.Tensor

    @classmethod
    def pack(cls, sample: Sequence[int], positions: Sequence[torch.Tensor], grids: Sequence[torch.Tensor],
             shapes: Sequence[Tuple[Tuple[int, int], ...]], vision: torch.Tensor) -> "ImageTokens":
        """From one (N_i,) position tensor and one (N_i, 3) grid tensor per image (any order):
        images sorted by (sample, first position) and padded to the longest."""
        device = vision.device
        order = sorted(range(len(positions)), key=lambda i: (int(sample[i]), int(positions[i][0])))
        n = max((int(p.numel()) for p in positions), default=0)
        pos = torch.full((len(order), n), -1, dtype=torch.long, device=device)
        grid = torch.zeros(len(order), n, 3, dtype=torch.long, device=device)
        for row, i in enumerate(order):
            pos[row, :positions[i].numel()] = positions[i].to(device)
            grid[row, :positions[i].numel()] = grids[i].to(device)
        return cls(sample=torch.tensor([int(sample[i]) for i in order], dtype=torch.long, device=device),
                   pos=pos, grid=grid, shapes=tuple(tuple(shapes[i]) for i in order), vision=vision)


@dataclass
class ImageSlot:
    """The images that are their sample's image s (``VisionLayout.slots``), and what every ATP
    layer of a forward indexes them with.

        images   (I_s,) long: the images (rows of the layout's per-image tensors)
        samples  (I_s,) long: the sample of each
        valid    (I_s, N) bool: ``image_valid`` of these images
        pos      (I_s, N) long: their tokens' sequence positions, 0 past each image's count
        every_sample  every sample has an image s: ``samples`` is ``arange(B)``
        all_images    these are all the batch's images: ``images`` is ``arange(I)``
    """

    images: torch.Tensor
    samples: torch.Tensor
    valid: torch.Tensor
    pos: torch.Tensor
    every_sample: bool
    all_images: bool


def grid_coords(shape: Tuple[int, int], index: int = 0, frames: int = 1) -> torch.Tensor:
    """(frames * H * W, 3) long (grid, row, col) of ``frames`` H x W grids, each row-major,
    numbered from ``index``."""
    h, w = shape
    t = torch.arange(frames * h * w)
    return torch.stack([index + t // (h * w), (t // w) % h, t % w], dim=1)


def token_runs(mask: torch.Tensor) -> List[torch.Tensor]:
    """The positions of every run of consecutive True entries of ``mask`` (L,) bool, in order."""
    pos = mask.nonzero().squeeze(1)
    if pos.numel() == 0:
        return []
    starts = torch.cat([pos.new_ones(1, dtype=torch.bool), pos[1:] != pos[:-1] + 1])
    return list(pos.tensor_split(starts.nonzero().squeeze(1)[1:].cpu()))


def fixed_grid_tokens(input_ids: torch.Tensor, valid: torch.Tensor, image_token_id: int,
                      grid: Tuple[int, int]) -> ImageTokens:
    """The images of a batch where every image is one run of H * W image tokens, row-major
    (LLaVA-1.5): each chunk of H * W consecutive image tokens is one image."""
    n_grid = grid[0] * grid[1]
    is_img = (input_ids == image_token_id) & valid
    counts = is_img.sum(1)
    coords = is_img.nonzero()  # (T, 2), ordered by sample then position; a host sync (T is data)
    whole = coords.shape[0] % n_grid == 0
    if whole:
        num_images = coords.shape[0] // n_grid
        coords = coords.view(num_images, n_grid, 2)
        image_pos = coords[:, :, 1]
        broken = ~((image_pos[:, -1] - image_pos[:, 0] == n_grid - 1)
                   & (coords[:, :, 0] == coords[:, :1, 0]).all(1)).all()
        # both checks in one host sync
        ragged, broken = torch.stack([(counts % n_grid != 0).any(), broken]).tolist()
    if not whole or ragged:
        raise ValueError(f"VisionLayout: every sample must hold a whole number of images of {n_grid} "
                         f"image tokens each; image-token counts per sample: {counts.tolist()}")
    if broken:
        raise ValueError("VisionLayout: image tokens must come in contiguous runs of "
                         f"{n_grid} per image (the vision-token grid)")
    rc = _grid_coords_on(tuple(grid), input_ids.device)
    return ImageTokens(sample=coords[:, 0, 0], pos=image_pos, grid=rc.expand(num_images, n_grid, 3),
                       shapes=((tuple(grid),),) * num_images, vision=input_ids == image_token_id)


@lru_cache(maxsize=32)
def _grid_coords_on(grid: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """``grid_coords(grid)`` on ``device``, made once per (grid, device): every forward of a
    fixed-grid family asks for it (callers only read it)."""
    with torch.inference_mode(False):  # a plain tensor even if first asked for under inference_mode
        return grid_coords(grid).to(device)


def _as_grid(grid: Union[int, Tuple[int, int]]) -> Tuple[int, int]:
    if isinstance(grid, int):
        side = int(round(grid ** 0.5))
        if side * side != grid:
            raise ValueError(f"VisionLayout: a grid of {grid} tokens is not square; give (H, W)")
        return side, side
    return int(grid[0]), int(grid[1])


@dataclass
class VisionLayout:
    """The vision-token layout of one batch.

    Shapes (B batch, L sequence, I images in the batch, N the most tokens of one image):
        pad_bias         (B, L) float32: 0 for real tokens, -inf for padding (key_bias base)
        image_sample     (I,) long: the sample each image belongs to
        image_slot       (I,) long: the image's index within its sample (0, 1, ...)
        image_pos        (I, N) long: sequence positions of the image's tokens (-1 past its count)
        image_valid      (I, N) bool: ``image_pos >= 0``
        token_grid       (I, N, 3) long: (grid index, row, col) of every token (ImageTokens.grid)
        token_shape      (I, N, 2) long: (H, W) of the grid each token lies on (1, 1 past the count)
        grid_shapes      per image, the (H, W) of each of its grids
        n_tokens         (I,) long: vision tokens of each image
        text_rows        (I, L) bool: the rows that define S_cross of this image: real tokens
                         after the image that are neither vision tokens nor structural ones nor
                         answer tokens (labels == -100)
        images_per_sample (B,) long
        slot_images      one (I_s,) long per image slot s: the images that are their sample's
                         image s (slot 0: every sample's first image, ...)
    """

    batch: int
    seq_len: int
    pad_bias: torch.Tensor
    image_sample: torch.Tensor
    image_slot: torch.Tensor
    image_pos: torch.Tensor
    image_valid: torch.Tensor
    token_grid: torch.Tensor
    token_shape: torch.Tensor
    grid_shapes: Tuple[Tuple[Tuple[int, int], ...], ...]
    n_tokens: torch.Tensor
    text_rows: torch.Tensor
    images_per_sample: torch.Tensor
    slot_images: Tuple[torch.Tensor, ...]

    @property
    def num_images(self) -> int:
        return int(self.image_sample.shape[0])

    @property
    def max_slots(self) -> int:
        return len(self.slot_images)

    @cached_property
    def slots(self) -> Tuple[ImageSlot, ...]:
        """One ``ImageSlot`` per image slot (``slot_images``), made at the first use in a
        forward and shared by its ATP layers."""
        pos = self.image_pos.clamp_min(0)
        out = []
        for idx in self.slot_images:
            all_images = idx.shape[0] == self.num_images
            # images are ordered by sample and a sample has one image s at most, so B of them
            # are one per sample, in order
            every_sample = idx.shape[0] == self.batch
            out.append(ImageSlot(
                images=idx, samples=self.image_sample if all_images else self.image_sample[idx],
                valid=self.image_valid if all_images else self.image_valid[idx],
                pos=pos if all_images else pos[idx], every_sample=every_sample, all_images=all_images))
        return tuple(out)

    @property
    def vision_tokens(self) -> torch.Tensor:
        """(B,) long: vision tokens of every sample (all its images, structural ones excluded)."""
        return self.n_tokens.new_zeros(self.batch).index_add(0, self.image_sample, self.n_tokens)

    @property
    def tokens_per_image(self) -> torch.Tensor:
        """(B,) float32: each sample's mean vision tokens per image (0 without an image)."""
        return self.per_sample_mean(self.n_tokens.to(torch.float32))

    @classmethod
    def from_batch(cls, input_ids: torch.Tensor, image_token_id: int, grid: Union[int, Tuple[int, int]],
                   attention_mask: Optional[torch.Tensor] = None,
                   labels: Optional[torch.Tensor] = None,
                   prompt_len: Optional[int] = None) -> "VisionLayout":
        """The layout of a batch whose images are runs of H * W image tokens (LLaVA-1.5,
        ``fixed_grid_tokens``); ``grid`` is (H, W) or the token count of a square grid. A run of
        image tokens must hold a whole number of images."""
        valid = valid_mask(input_ids, attention_mask)
        tokens = fixed_grid_tokens(input_ids, valid, image_token_id, _as_grid(grid))
        return cls.from_tokens(tokens, input_ids, attention_mask, labels, prompt_len)

    @classmethod
    def from_tokens(cls, tokens: ImageTokens, input_ids: torch.Tensor,
                    attention_mask: Optional[torch.Tensor] = None,
                    labels: Optional[torch.Tensor] = None,
                    prompt_len: Optional[int] = None) -> "VisionLayout":
        """Build the layout from the images an adapter found, ``input_ids`` (B, L), the optional
        padding ``attention_mask`` (B, L) (1 = real token; left or right padding) and optional
        ``labels`` (B, L) (HF convention: ``labels[b, t] != -100`` marks token t as an answer
        token). ``prompt_len``: positions from it on are generated tokens (generate()
        recomputing its prefix), which are not instruction rows either, so pruning follows the
        prompt alone."""
        b, l = input_ids.shape
        device = input_ids.device
        valid = valid_mask(input_ids, attention_mask)
        pad_bias = padding_bias(valid)
        image_sample, image_pos = tokens.sample.to(device), tokens.pos.to(device)
        num_images = image_sample.shape[0]
        image_valid = image_pos >= 0
        # (without a padding mask every position is real: nothing to check)
        if num_images and attention_mask is not None and bool(
                (~valid[image_sample[:, None].expand_as(image_pos)[image_valid], image_pos[image_valid]]).any()):
            raise ValueError("VisionLayout: an image token lies on a padding position")
        images_per_sample = torch.zeros(b, dtype=torch.long, device=device).index_add(
            0, image_sample, torch.ones_like(image_sample))
        first = torch.zeros(b + 1, dtype=torch.long, device=device)
        first[1:] = images_per_sample.cumsum(0)
        image_slot = torch.arange(num_images, device=device) - first[image_sample]
        # a host sync: the number of slots, and of images in each, are data
        max_slots = int(images_per_sample.max()) if num_images else 0
        if max_slots == 1 and num_images == b:  # one image per sample
            slot_images: Tuple[torch.Tensor, ...] = (torch.arange(num_images, device=device),)
        else:
            slot_images = tuple((image_slot == s).nonzero().squeeze(1) for s in range(max_slots))
        token_grid = tokens.grid.to(device)
        token_shape = torch.ones(num_images, image_pos.shape[1], 2, dtype=torch.long, device=device)
        if num_images:
            # every image's table of grid shapes, padded to the most grids: (I, G, 2)
            most = max(len(shapes) for shapes in tokens.shapes)
            table = torch.tensor([list(shapes) + [(1, 1)] * (most - len(shapes)) for shapes in tokens.shapes],
                                 dtype=torch.long, device=device)
            index = torch.where(image_valid, token_grid[..., 0], 0)
            token_shape = torch.where(image_valid[..., None],
                                      table.gather(1, index[..., None].expand(-1, -1, 2)), token_shape)

        text = valid & ~tokens.vision.to(device)
        if labels is not None:
            text = text & (labels.to(device) == IGNORE_INDEX)
        if prompt_len is not None:
            text = text & (torch.arange(l, device=device) < prompt_len)[None, :]
        after = torch.arange(l, device=device)[None, :] > image_pos.amax(1, keepdim=True)
        text_rows = after & text[image_sample]
        return cls(batch=b, seq_len=l, pad_bias=pad_bias, image_sample=image_sample, image_slot=image_slot,
                   image_pos=image_pos, image_valid=image_valid, token_grid=token_grid, token_shape=token_shape,
                   grid_shapes=tokens.shapes, n_tokens=image_valid.sum(1), text_rows=text_rows,
                   images_per_sample=images_per_sample, slot_images=slot_images)

    def image_zeros(self, fill_invalid: float = float("-inf")) -> torch.Tensor:
        """(I, N) float32: 0 on every image token, ``fill_invalid`` past each image's count."""
        zeros = self.pad_bias.new_zeros(self.image_pos.shape)
        return zeros.masked_fill(~self.image_valid, fill_invalid)

    def scatter(self, img_values: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
        """(B, L): ``base`` (B, L) with the image positions replaced by ``img_values`` (I, N), e.g.
        the key bias from ``pad_bias`` and the images' log masks. Differentiable in img_values."""
        if self.num_images == 0:
            return base
        spare = torch.cat([base, base[:, :1]], dim=1)
        return spare.index_put(self._scatter_index, img_values.reshape(-1).to(base.dtype))[:, :-1]

    @cached_property
    def _scatter_index(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows, cols) of every image token in (B, L + 1), flat; past an image's count the spare
        column L. Made at the first ``scatter`` of a forward and shared by its ATP layers."""
        rows = self.image_sample[:, None].expand_as(self.image_pos)
        cols = torch.where(self.image_valid, self.image_pos, self.seq_len)
        return rows.reshape(-1), cols.reshape(-1)

    def per_sample_mean(self, per_image: torch.Tensor) -> torch.Tensor:
        """(I, ...) -> (B, ...): mean over each sample's images (0 for samples without one)."""
        out = per_image.new_zeros((self.batch,) + per_image.shape[1:])
        out = out.index_add(0, self.image_sample, per_image)
        return out / self._images_at_least_one(per_image.dtype).view((-1,) + (1,) * (per_image.dim() - 1))

    def _images_at_least_one(self, dtype: torch.dtype) -> torch.Tensor:
        """(B,) ``images_per_sample.clamp_min(1)`` in ``dtype``, made once per layout and dtype."""
        cache = self.__dict__.setdefault("_denominators", {})
        if dtype not in cache:
            cache[dtype] = self.images_per_sample.clamp_min(1).to(dtype)
        return cache[dtype]


def valid_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> torch.Tensor:
    """(B, L) bool: the real tokens of ``input_ids`` (B, L) by the padding ``attention_mask``."""
    if input_ids.dim() != 2:
        raise ValueError(f"VisionLayout: input_ids must be (B, L), got {tuple(input_ids.shape)}")
    if attention_mask is None:
        return torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"VisionLayout: attention_mask must be (B, L) = {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    return attention_mask.to(device=input_ids.device).bool()
