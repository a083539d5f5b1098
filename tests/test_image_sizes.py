"""Any image: every family's layout, spatial score and threshold input for images from one
token thin to many tiles, any aspect ratio, one or two per sample, through the real forward in
training and in eval with real pruning. LLaVA-1.5 is not here: its processor resizes every
image to the one grid its vision tower takes.

Sizes as ``atp_llava.tools.tiny.family_batch`` takes them: LLaVA-NeXT/OneVision (H, W) pixels (tiles
of 16 px, 8 x 8 tokens; unpadding a 1 x 64 or 64 x 1 image leaves a canvas 0 tokens across),
Qwen-VL (T, H, W) patches (merged 2 x 2: a 2 x 40 grid is 1 x 20 tokens), InternVL tiles.
"""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

from atp_llava import ATPConfig, apply_atp, default_strides, spatial_score  # noqa: E402
from atp_llava.tools.tiny import TINY_FAMILIES, family_batch  # noqa: E402
from test_llava_inference import pruned_and_masked  # noqa: E402
from test_model_families import f64, layout_of, survivors  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the spatial score of any grid


@given(h=st.integers(1, 48), w=st.integers(1, 48), lam=st.sampled_from([1.0, 3.0, 8.0]))
def test_every_stride_samples_a_lattice_with_a_token_in_every_whole_cell_of_any_grid(h, w, lam):
    full = spatial_score((h, w), lam).view(h, w)
    assert full.shape == (h, w) and ((full >= 0) & (full <= 1)).all()
    for s in default_strides((h, w), lam):
        mine = spatial_score((h, w), lam, strides=(s,)).view(h, w)
        rows, cols = mine.amax(1).nonzero().squeeze(1), mine.amax(0).nonzero().squeeze(1)
        # a lattice: every sampled row meets every sampled column, at the stride's one level
        assert int((mine > 0).sum()) == len(rows) * len(cols)
        assert torch.equal(mine[mine > 0], torch.full((len(rows) * len(cols),), 1.0 - lam / (s * s)))
        for idx, side in ((rows, h), (cols, w)):
            # one token in each whole s-wide cell, at most one in each cell, and one along a
            # side that ends before the cell's centre (its last token)
            assert max(1, side // s) <= len(idx) <= -(-side // s), (s, side, idx)
            assert (idx.diff() == s).all()
            assert int(idx[0]) == min((s - 1) // 2, side - 1)
        # the full map keeps each token's highest level
        assert (full >= mine).all()


# ----------------------------------------------------------------------------------------------
# every family, any image, train and eval


def _anyres(max_images):
    return st.lists(st.tuples(st.integers(1, 96), st.integers(1, 96)), min_size=1, max_size=max_images)


def _qwen(video):
    t = st.sampled_from([1, 2]) if video else st.just(1)
    return st.lists(st.tuples(t, st.integers(1, 20).map(lambda a: 2 * a), st.integers(1, 20).map(lambda a: 2 * a)),
                    min_size=1, max_size=2)


SIZES = {
    "llava_next": _anyres(1),  # one image per sample
    "llava_onevision": _anyres(2),
    "qwen2_vl": _qwen(video=True),
    "qwen2_5_vl": _qwen(video=True),
    "qwen3_vl": _qwen(video=False),  # its videos come frame by frame between timestamps
    "internvl": st.lists(st.integers(1, 6), min_size=1, max_size=2),
}
STOCK = {}


def _stock(family):
    if family not in STOCK:
        STOCK[family] = TINY_FAMILIES[family](num_layers=4).double()
    return STOCK[family]


@pytest.mark.parametrize("family", sorted(SIZES))
@settings(max_examples=6)
@given(data=st.data())
def test_any_image_size_trains_and_prunes(family, data):
    images = [data.draw(SIZES[family], label=f"sample {i}") for i in range(2)]
    stock = _stock(family)
    batch = f64(family_batch(stock, images, seed=0, padding="right"))

    # training: the threshold MLPs see every image, the loss and every gradient are finite
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_ratio=0.5)).train()
    lay = layout_of(model, batch)
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for layer, mlp in model.atp.mlps.items():
        for p in mlp.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), layer
    tokens = out.atp_stats["tokens"]
    assert ((tokens >= 1 - 1e-6) & (tokens <= lay.tokens_per_image[:, None] + 1e-6)).all()

    # eval: real pruning equals the hard masks in place, token for token
    model = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(1, 2, 3), target_ratio=0.5,
                                                      theta_override=(0.5, 0.5))).eval()
    pruned, masked = pruned_and_masked(model, batch)
    keep = survivors(model, batch, pruned.atp_stats)
    assert torch.isfinite(pruned.logits[keep]).all()
    err = (pruned.logits - masked.logits)[keep].abs().max().item()
    assert err < 1e-10, err
