"""The slots of a pruned sequence (inference with real pruning): after an ATP layer drops tokens,
which original positions each sample's shorter row holds (``SeqView``), and the gathers and
scatters between original positions and slots (``gather_slots``). No host sync but the new
length (``SeqView.sizes``).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Optional, Tuple

import torch

__all__ = ["SeqView", "gather_slots"]


def gather_slots(x: torch.Tensor, index: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """``out[b, j] = x[b, index[b, j]]`` along dim 1, ``fill`` where ``index`` is -1.
    x (B or 1, L, ...), index (B, Lc) long -> (B, Lc, ...)."""
    return _gather(x, index.clamp_min(0), index < 0, fill)


def _gather(x: torch.Tensor, index: torch.Tensor, empty: torch.Tensor, fill: float) -> torch.Tensor:
    """``gather_slots`` with its index clamped (``index.clamp_min(0)``) and its empty slots
    (``index < 0``) given."""
    b, lc = index.shape
    x = x.expand((b,) + x.shape[1:])
    trail = (1,) * (x.dim() - 2)
    out = x.gather(1, index.view(b, lc, *trail).expand((b, lc) + x.shape[2:]))
    return out.masked_fill(empty.view(b, lc, *trail), fill)


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
        tokens the valid slots in all (known to ``keep``, which makes every view)
    """

    orig: torch.Tensor
    src: torch.Tensor
    valid: torch.Tensor
    inv: torch.Tensor
    tokens: int

    @property
    def length(self) -> int:
        return int(self.orig.shape[1])

    @cached_property
    def _orig_index(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.orig.clamp_min(0), self.orig < 0

    @cached_property
    def _src_index(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.src.clamp_min(0), self.src < 0

    def gather(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``gather_slots(x, self.orig, fill)``: x (B or 1, L, ...) in original positions -> its
        values in this view's slots (B, Lc, ...). The index is prepared once per view (every
        layer from here on gathers with it)."""
        return _gather(x, *self._orig_index, fill)

    def gather_src(self, x: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """``gather_slots(x, self.src, fill)``: x (B or 1, Lc_prev, ...) in the previous view's
        slots -> this view's."""
        return _gather(x, *self._src_index, fill)

    @staticmethod
    def sizes(counts: torch.Tensor) -> Tuple[int, int]:
        """(the longest row, the sum) of ``counts`` (B,), the tokens each row keeps: the new
        view's length and its tokens, in one host sync (the length is a shape that depends on
        data)."""
        if counts.shape[0] == 0:
            return 0, 0
        length, tokens = torch.stack([counts.max(), counts.sum()]).tolist()
        return int(length), int(tokens)

    @classmethod
    def keep(cls, keep: torch.Tensor, prev: Optional["SeqView"], seq_len: int,
             counts: Optional[torch.Tensor] = None, sizes: Optional[Tuple[int, int]] = None) -> "SeqView":
        """The view of the slots of ``prev`` (identity if None) where ``keep`` (B, Lc_prev) holds
        (``keep`` within ``prev.valid``). ``counts`` (``keep.sum(1)``) and ``sizes``
        (``SeqView.sizes(counts)``) where the caller has them."""
        b, n = keep.shape
        counts = keep.sum(1) if counts is None else counts
        length, tokens = SeqView.sizes(counts) if sizes is None else sizes  # the one host sync
        # Each kept column's slot; dropped columns go to a spare slot (length) that is cut off.
        slot = torch.where(keep, keep.cumsum(1) - 1 + (length - counts)[:, None], length)
        cols = torch.arange(n, device=keep.device).expand(b, n)
        src = _scatter_cut(torch.full((b, length), -1, dtype=torch.long, device=keep.device), slot, cols)
        orig = src if prev is None else gather_slots(prev.orig, src, -1)
        valid = orig >= 0
        slots = torch.arange(length, device=keep.device).expand(b, length)
        inv = _scatter_cut(torch.full((b, seq_len), length, dtype=torch.long, device=keep.device),
                           torch.where(valid, orig, seq_len), slots)
        return cls(orig=orig, src=src, valid=valid, inv=inv, tokens=tokens)

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
