"""The ATP step (paper Eq. 3-11, DESIGN §3.2-3.4): before an ATP decoder layer, the scores of
the layer before, the thresholds, the masks, and what the layers from here on see, as plain
functions over the per-forward state (``ATPState``), the ATP modules and the config. The hooks
(patch.py) call ``atp_step``; a test can call it on a state it built.
"""
from __future__ import annotations

from typing import Optional

import torch

import atp_ops

from .config import ATPConfig
from .layout import VisionLayout
from .modules import ATPModules
from .seqview import SeqView, gather_slots
from .state import ATPState

__all__ = ["KEEP_REDUNDANT", "KEEP_SPATIAL", "atp_step", "drop", "image_scores", "top_k", "last_rows"]


# Why a token survived an ATP layer with hard masks (atp_stats["keep_codes"]); a bit each.
KEEP_REDUNDANT = 1  # S_red > theta_r, or among the image's top ATPConfig.min_keep by S_red (fixed, fastv and
                    # random modes: selected)
KEEP_SPATIAL = 2    # S_spatial > theta_s


def atp_step(state: ATPState, layer: int, hidden: torch.Tensor, atp: ATPModules, config: ATPConfig,
             generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The ATP module before decoder layer ``layer``: scores from the layer before, thresholds,
    masks; returns the hidden states the layer runs on (gathered when tokens leave).

    ``state`` holds the score layer's capture (``state.captures``) and takes this layer's masks,
    counts, thresholds and keep codes; ``hidden`` (B, Lc, d) are the layer's input hidden states;
    ``atp`` the model's ATPModules, ``config`` its ATPConfig; ``generator`` the draws of mode
    "random" (None: torch's default generator)."""
    lay = state.layout
    score_layer = ATPConfig.score_layer(layer)
    capture = state.captures.pop(score_layer, None)
    if capture is None:
        raise RuntimeError(f"ATP layer {layer}: decoder layer {score_layer} did not run with atp attention")
    if lay.num_images == 0:
        for counts in (state.kept, state.kept_soft, state.kept_hard):
            counts.append(state.img_bias.new_zeros(0))
        if config.mode == "adaptive":
            state.theta_r.append(state.img_bias.new_zeros(0))
            state.theta_s.append(state.img_bias.new_zeros(0))
            if config.theta_override is None:
                # No image, but the layer's threshold MLP still runs (on a zero input), and
                # its output joins the loss with weight 0: every rank runs the same modules
                # in the same order and every ATP parameter gets a gradient (FSDP2's and
                # ZeRO-3's collectives, DDP without find_unused_parameters). It joins the
                # key_bias of the layers from here on as well, so that the backward runs
                # through the same decoder layers as a batch with images (FSDP2 gathers each
                # layer's parameters for its backward: a rank that skipped them would hang).
                tr, ts = atp(layer, *atp.null_input(state.img_bias.device))
                null = (tr.sum() + ts.sum()) * 0.0
                state.null_terms.append(null)
                if null.requires_grad:
                    state.current_bias = state.current_bias + null.to(state.current_bias.dtype)
        return drop(state, hidden)
    q, k, lse, bias_used, scale, causal = capture
    prev = state.img_bias
    # the tokens this forward still holds: isfinite(prev) in one op (a log mask is <= 0, never +inf)
    kept = prev > float("-inf")
    if config.mode != "random":
        cross_rows = lay.text_rows if config.mode != "fastv" else last_rows(lay.text_rows)
        s_self, s_cross = image_scores(lay, state.view, q, k, lse, bias_used, prev.detach(), cross_rows, scale,
                                       causal)
    if config.mode == "adaptive":
        s_red = atp_ops.redundant_score(s_self, s_cross, kept)
        s_spatial, cells = state.spatial_and_cells(atp)
        theta_r, theta_s = atp(layer, s_self.detach(), s_cross.detach(), kept, cells, atp.globals(lay, kept))
        soft = atp_ops.atp_soft_mask(s_red, s_spatial, theta_r, theta_s, config.temperature)  # log M, Eq. 9-11
        by_red = (s_red > theta_r[:, None]) | top_k(s_red, state.img_keep, config.min_keep)
        by_spatial = s_spatial > theta_s[:, None]
        if state.hard:
            # the keep codes first, and the keep mask from them: (by_red & keep) * KEEP_REDUNDANT
            # + (by_spatial & keep) * KEEP_SPATIAL, where keep = (by_red | by_spatial) & img_keep
            codes = (by_red.to(torch.uint8) * KEEP_REDUNDANT).add_(by_spatial.to(torch.uint8), alpha=KEEP_SPATIAL) \
                .mul_(state.img_keep)
            state.keep_codes.append(codes)
            keep = codes != 0
        else:
            keep = (by_red | by_spatial) & state.img_keep
        if state.hard or state.img_mask is not None:
            new = prev.masked_fill(~keep, float("-inf"))
        else:  # the paper's soft masks, accumulated in log space
            new = prev + soft
        state.img_soft = state.img_soft + soft.detach()
        state.theta_r.append(theta_r)
        state.theta_s.append(theta_s)
    else:
        if config.mode == "random":  # uniform draws: the top k of i.i.d. keys is a uniform k-subset
            ranking = torch.rand(kept.shape, generator=generator).to(kept.device)
        elif config.mode == "fastv":
            ranking = s_cross
        else:
            ranking = atp_ops.redundant_score(s_self, s_cross, kept)
        keep = top_k(ranking, kept, config.fixed_keep[config.layers.index(layer)])
        new = prev.masked_fill(~keep, float("-inf"))
        state.img_soft = new
        if state.hard:
            state.keep_codes.append(keep.to(torch.uint8) * KEEP_REDUNDANT)
    state.img_bias = new
    state.img_keep = keep
    # The hard counts. With hard masks ``new`` is 0 on the kept tokens and -inf elsewhere (so is
    # img_soft in the fixed-count modes): exp(new).sum(-1) is this very count, an exact integer
    # in floating point, so the count is computed once and appended to every list it equals.
    hard_count = keep.sum(-1).to(prev.dtype)
    state.kept_hard.append(hard_count)
    hard_bias = state.hard or config.mode != "adaptive"  # new (and img_bias) is 0 / -inf
    state.kept_soft.append(hard_count if config.mode != "adaptive" else state.img_soft.exp().sum(-1))
    if state.img_mask is not None:
        # Straight-through (ATPConfig.budget "hard"): the value of the hard mask, the
        # gradient of the soft one; the layers see it as a multiplicative key_mask.
        m = soft.exp()
        state.img_mask = state.img_mask * (m + (keep.to(m.dtype) - m).detach())
        state.kept.append(state.img_mask.sum(-1))
        state.current_mask = lay.scatter(state.img_mask, torch.ones_like(lay.pad_bias))
    else:
        state.kept.append(hard_count if hard_bias else new.exp().sum(-1))
        state.current_bias = lay.scatter(new, lay.pad_bias)
    return drop(state, hidden)


def drop(state: ATPState, hidden: torch.Tensor) -> torch.Tensor:
    """Pruned forward: the tokens whose bias is -inf leave; the rest are gathered into the new
    view (``state.current_bias`` moves to its slots). Otherwise nothing moves."""
    if not state.prune:
        return hidden
    view = state.view
    bias = state.current_bias if view is None else view.gather(state.current_bias, float("-inf"))
    keep = bias > float("-inf")  # isfinite(bias) in one op: a key bias is <= 0, never +inf
    counts = keep.sum(1)
    # The pruned forward's one host sync per ATP layer (SeqView.sizes): the new length, a shape
    # that depends on data, and the tokens kept, which say whether any left (keep lies within
    # view.valid: the empty slots' bias is -inf), hence whether the layers' inputs move.
    sizes = SeqView.sizes(counts)
    if view is not None and sizes[1] == view.tokens:
        state.current_bias = bias
        return hidden
    state.view = SeqView.keep(keep, view, state.layout.seq_len, counts, sizes)
    state.current_bias = state.view.gather_src(bias, float("-inf"))
    state.position_embeddings = state.position_ids = None
    return state.view.gather_src(hidden)


def image_scores(lay: VisionLayout, view: Optional[SeqView], q, k, lse, bias_used, prev_img_bias, cross_rows,
                 scale, causal):
    """S_self, S_cross (I, N) of every image from one score layer, one atp_scores call per
    image slot (so per-sample row weights stay a (B, Lc) tensor over the slots the layer ran
    on). ``cross_rows`` (I, L): the rows of S_cross, in original positions."""
    b, lc = q.shape[0], q.shape[2]
    n_img, n = lay.image_pos.shape
    s_self = s_cross = None
    w_img = prev_img_bias.exp()  # Eq. 3 rows weighted by their current soft mask (§3.2)
    for slot in lay.slots:
        # Per-sample tensors of the slot's images: (I_s, ...) where the slot has an image in
        # every sample, else scattered into zero rows of (B, ...) (samples without one weigh 0).
        def rows_of(x: torch.Tensor) -> torch.Tensor:
            return x if slot.every_sample else x[slot.samples]

        def per_sample(x: torch.Tensor) -> torch.Tensor:
            return x if slot.every_sample else x.new_zeros((b,) + x.shape[1:]).index_copy_(0, slot.samples, x)

        def images_of(x: torch.Tensor) -> torch.Tensor:
            return x if slot.all_images else x[slot.images]

        # the image's tokens in the slots (lc: gone or past the image's count, a spare
        # column that is dropped)
        pos = slot.pos if view is None else rows_of(view.inv).gather(1, slot.pos)
        pos = torch.where(slot.valid, pos, lc)
        w_self = lse.new_zeros(pos.shape[0], lc + 1, dtype=torch.float32).scatter_(
            1, pos, images_of(w_img).to(torch.float32))
        rows = images_of(cross_rows)
        if view is not None:
            rows = view.gather(rows, False) if slot.every_sample else gather_slots(rows, view.orig[slot.samples], False)
        w_cross = per_sample(rows.float())
        ss, sc = atp_ops.atp_scores(q, k, lse, bias_used, per_sample(w_self)[:, :lc].contiguous(), w_cross,
                                    causal=causal, scale=scale)
        ss = rows_of(torch.nn.functional.pad(ss, (0, 1))).gather(1, pos).float()
        sc = rows_of(torch.nn.functional.pad(sc, (0, 1))).gather(1, pos).float()
        if slot.all_images:
            s_self, s_cross = ss.to(prev_img_bias.dtype), sc.to(prev_img_bias.dtype)
        else:
            if s_self is None:
                s_self, s_cross = prev_img_bias.new_zeros(n_img, n), prev_img_bias.new_zeros(n_img, n)
            s_self[slot.images] = ss
            s_cross[slot.images] = sc
    return s_self, s_cross


def top_k(score: torch.Tensor, kept: torch.Tensor, k: int) -> torch.Tensor:
    """(I, N) bool: the ``k`` tokens with the highest ``score`` among each image's ``kept``
    ones (all of them where fewer are kept). The fixed-ratio baseline's selection (paper
    Table 2; FastV with S_cross as the score) and the hard masks' floor (ATPConfig.min_keep)."""
    ranked = score.masked_fill(~kept, float("-inf"))
    if k == 1:
        # the first highest (argmax's tie rule, the stable descending argsort's first entry)
        return torch.zeros_like(kept).scatter_(1, ranked.argmax(-1, keepdim=True), True) & kept
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1], device=order.device)
                                            .expand_as(order))
    return (rank < k) & kept


def last_rows(rows: torch.Tensor) -> torch.Tensor:
    """(I, L) bool -> the same with only the last True of each row kept (FastV's one query row)."""
    last = torch.where(rows, torch.arange(rows.shape[1], device=rows.device), -1).amax(1)
    # no host sync: a row without any True writes False over its column 0
    return torch.zeros_like(rows).scatter_(1, last.clamp_min(0)[:, None], (last >= 0)[:, None])
