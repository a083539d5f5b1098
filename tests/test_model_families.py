"""ATP on every supported model family through its adapter (atp_llava.models): LLaVA-NeXT
(anyres: base tile + unpadded canvas with row newlines), LLaVA-OneVision (the same with a
shrunk canvas, one tile per image of a multi-image sample, pooled video frames), Qwen2-VL and
Qwen2.5-VL (dynamic grids, video, M-RoPE), Qwen3-VL (the same with deepstack), InternVL
(images of several tiles). LLaVA-1.5 has its own test files (test_llava_*.py).

Tiny random models of each family (atp_llava.tools.tiny) in float64, so that two paths that compute
the same thing in a different order cannot take different pruning decisions by rounding. Every
batch holds images of different sizes (ragged token counts and grids).
"""
from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")

from atp_llava import ATPConfig, VisionLayout, apply_atp, get_atp_controller  # noqa: E402
from atp_llava.core.efficiency import layer_flops  # noqa: E402
from atp_llava.core.layout import valid_mask  # noqa: E402
from atp_llava.tools.tiny import (ONEVISION_VIDEO, QWEN_END, QWEN_IMAGE, QWEN_START, QWEN_VIDEO, TINY_FAMILIES, TINY_IMAGE_TOKEN,  # noqa: E402
                            family_batch)
from test_llava_inference import pruned_and_masked  # noqa: E402
from test_llava_training import train_atp  # noqa: E402

KEEP_ALL = (-5.0, -5.0)
THETA = (0.5, 0.5)
NEW = 6
# a random model may sample any id: keep the vision encoder's placeholders out of its answers
SUPPRESS = [TINY_IMAGE_TOKEN, ONEVISION_VIDEO, QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END]

# Per family, the images of a 3-sample batch: LLaVA-NeXT/OneVision (H, W) pixels or ("video", F),
# Qwen (T, H, W) patches (T = 2: a video). Every sample differs in image count, size or aspect.
IMAGES = {
    "llava_next": [[(16, 30)], [(30, 20), (16, 16)], [(32, 32)]],
    "llava_onevision": [[(16, 30)], [(30, 20), (16, 16)], [(32, 32), ("video", 2)]],
    "qwen2_vl": [[(1, 8, 12)], [(1, 12, 8), (1, 8, 8)], [(2, 8, 8)]],
    "qwen2_5_vl": [[(1, 8, 12)], [(1, 12, 8), (1, 8, 8)], [(2, 8, 8)]],
    "internvl": [[3], [1, 5], [2]],  # tiles per image
    # Qwen3-VL's videos come frame by frame between timestamps: images only here
    "qwen3_vl": [[(1, 8, 12)], [(1, 12, 8), (1, 8, 8)], [(1, 8, 8)]],
}
FAMILIES = sorted(IMAGES)


def f64(batch):
    return {k: (v.double() if v.is_floating_point() else v) for k, v in batch.items()}


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return request.param


@pytest.fixture(scope="module")
def stock(family):
    return TINY_FAMILIES[family](num_layers=4).double().eval()


def atp(stock, **kw):
    kw.setdefault("layers", (1, 2, 3))
    kw.setdefault("theta_override", THETA)
    kw.setdefault("target_ratio", 0.5)
    return apply_atp(copy.deepcopy(stock), ATPConfig(**kw)).eval()


def batch_of(stock, family, padding="right", seed=0, labels=True):
    b = f64(family_batch(stock, IMAGES[family], seed=seed, padding=padding))
    if not labels:
        b.pop("labels")
    return b


def layout_of(model, batch):
    ctrl = get_atp_controller(model)
    valid = valid_mask(batch["input_ids"], batch.get("attention_mask"))
    return VisionLayout.from_tokens(ctrl.adapter.image_tokens(batch, valid), batch["input_ids"],
                                    batch.get("attention_mask"))


def survivors(model, batch, stats):
    """(B, L) bool: the real tokens that are not image tokens (text, newlines, boundaries) and
    the image tokens kept through every ATP layer."""
    lay = layout_of(model, batch)
    keep = valid_mask(batch["input_ids"], batch.get("attention_mask")).clone()
    rows = lay.image_sample[:, None].expand_as(lay.image_pos)
    v = lay.image_valid
    keep[rows[v], lay.image_pos[v]] = stats["keep_codes"][-1][v] > 0
    return keep


def sample_alone(batch, images, i):
    """Sample ``i`` of a right-padded family batch as a batch of one (its images' inputs sliced)."""
    n = int(batch["attention_mask"][i].sum())
    out = {k: batch[k][i:i + 1, :n] for k in ("input_ids", "attention_mask", "labels", "mm_token_type_ids")
           if k in batch}
    before = [img for sample in images[:i] for img in sample]
    mine = images[i]
    if "image_sizes" in batch:  # LLaVA-NeXT/OneVision: one row of pixel_values per image or video
        for key, px, kind in (("image_sizes", "pixel_values", lambda im: im[0] != "video"),
                              (None, "pixel_values_videos", lambda im: im[0] == "video")):
            k = sum(1 for im in before if kind(im))
            own = sum(1 for im in mine if kind(im))
            if own:
                out[px] = batch[px][k:k + own]
                if key:
                    out[key] = batch[key][k:k + own]
        if "batch_num_images" in batch:
            out["batch_num_images"] = batch["batch_num_images"][i:i + 1]
    elif "mm_token_type_ids" in batch:  # Qwen2-VL: T*H*W pixel rows per image, images and videos apart
        for kind, key, px in ((lambda g: g[0] == 1, "image_grid_thw", "pixel_values"),
                              (lambda g: g[0] > 1, "video_grid_thw", "pixel_values_videos")):
            prev = [g for g in before if kind(g)]
            own = [g for g in mine if kind(g)]
            if own:
                start = sum(t * h * w for t, h, w in prev)
                rows = sum(t * h * w for t, h, w in own)
                out[px] = batch[px][start:start + rows]
                out[key] = batch[key][len(prev):len(prev) + len(own)]
    else:  # InternVL: one row of pixel_values per tile
        start = sum(before)
        out["pixel_values"] = batch["pixel_values"][start:start + sum(mine)]
    return out


# ----------------------------------------------------------------------------------------------
# the layout each adapter finds


def test_layout_follows_the_models_own_packing(stock, family):
    model = atp(stock)
    batch = batch_of(stock, family)
    lay = layout_of(model, batch)
    images = [img for sample in IMAGES[family] for img in sample]
    assert lay.num_images == len(images) and lay.images_per_sample.tolist() == [len(s) for s in IMAGES[family]]
    assert len(set(lay.n_tokens.tolist())) > 1  # ragged
    ids = batch["input_ids"]
    for i, shapes in enumerate(lay.grid_shapes):
        pos = lay.image_pos[i][lay.image_valid[i]]
        grid = lay.token_grid[i][lay.image_valid[i]]
        assert sum(h * w for h, w in shapes) == pos.numel()  # every grid filled exactly once
        for g, (h, w) in enumerate(shapes):
            on = grid[:, 0] == g
            cells = grid[on, 1] * w + grid[on, 2]
            assert torch.equal(cells, torch.arange(h * w))  # row-major
        if family.startswith("llava"):
            span = ids[int(lay.image_sample[i]), int(pos[0]):int(pos[-1]) + 2]
            if images[i][0] == "video":  # F pooled frames, one newline at the end
                assert shapes == ((4, 4),) * images[i][1]
                assert int((span == stock.config.video_token_id).sum()) == pos.numel() + 1
            else:
                # the base tile, then one newline per canvas row (one after the base tile without
                # a canvas), also image_token_id, not among the image's tokens
                assert shapes[0] == (8, 8)
                newlines = shapes[1][0] if len(shapes) > 1 else 1
                assert int((span == stock.config.image_token_id).sum()) == pos.numel() + newlines
        elif family == "internvl":  # tiles of 4 x 4 tokens, no arrangement
            assert shapes == ((4, 4),) * images[i]
        else:
            t, h, w = images[i]
            assert shapes == ((h // 2, w // 2),) * t
    # S_cross rows: after the image, never a vision or structural token
    structural = torch.isin(ids, torch.tensor([stock.config.image_token_id,
                                               getattr(stock.config, "video_token_id", -1) or -1,
                                               getattr(stock.config, "vision_start_token_id", -1) or -1,
                                               getattr(stock.config, "vision_end_token_id", -1) or -1]))
    assert not (lay.text_rows & structural[lay.image_sample]).any()


# ----------------------------------------------------------------------------------------------
# training


@pytest.mark.parametrize("budget", ["soft", "hard"])
def test_training_step_reaches_every_threshold_and_the_lm_stays_frozen(family, budget):
    stock = TINY_FAMILIES[family](num_layers=4)
    model = apply_atp(stock, ATPConfig(layers=(1, 2, 3), init_threshold=0.5, target_ratio=0.3,
                                       budget=budget)).train()
    batch = family_batch(model, IMAGES[family])
    out = model(**batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for layer, mlp in model.atp.mlps.items():
        for p in mlp.parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, layer
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("atp."))
    # N_bar is tokens per image; the keep ratio's target follows each sample's real count
    lay = layout_of(model, batch)
    target = (0.3 * lay.tokens_per_image).mean()
    assert torch.allclose(out.atp_stats["n_target"].double(), target.double())
    assert (out.atp_stats["tokens"] <= lay.tokens_per_image[:, None] + 1e-6).all()


def test_train_lm_freezes_the_vision_encoder(family):
    model = apply_atp(TINY_FAMILIES[family](num_layers=4), ATPConfig(layers=(1, 2), train_lm=True,
                                                                    target_ratio=0.5))
    prefixes = get_atp_controller(model).adapter.vision_prefixes()
    names = [n for n, _ in model.named_parameters()]
    assert any(n.startswith(prefixes) for n in names)
    for n, p in model.named_parameters():
        assert p.requires_grad == (not n.startswith(prefixes)), n


def test_a_few_steps_then_save_and_load_give_the_same_thresholds(family, tmp_path):
    from atp_llava import load_atp, read_atp_config, save_atp

    model = apply_atp(TINY_FAMILIES[family](num_layers=4), ATPConfig(layers=(1, 2, 3), target_ratio=0.3,
                                                                    mlp_width=32)).train()
    batch = family_batch(model, IMAGES[family])
    train_atp(model, batch)
    path = tmp_path / "atp.safetensors"
    save_atp(model, path)
    assert read_atp_config(path) == model.atp.config
    fresh = load_atp(TINY_FAMILIES[family](num_layers=4), path)
    model.eval(), fresh.eval()
    with torch.no_grad():
        a, b = model(**batch), fresh(**batch)
    assert torch.equal(a.atp_stats["theta_r"], b.atp_stats["theta_r"]) and torch.equal(a.logits, b.logits)


# ----------------------------------------------------------------------------------------------
# inference with real pruning


def test_real_pruning_equals_the_training_path_with_hard_masks(stock, family):
    model = atp(stock)
    batch = batch_of(stock, family, padding="left")
    pruned, masked = pruned_and_masked(model, batch)
    lay = layout_of(model, batch)
    assert (pruned.atp_stats["tokens"][:, -1] < lay.tokens_per_image - 0.5).all()  # it pruned, every sample
    keep = survivors(model, batch, pruned.atp_stats)
    err = (pruned.logits - masked.logits)[keep].abs().max().item()
    assert err < 1e-10, err
    # the efficiency report counts each sample's real tokens
    real = batch["attention_mask"].sum(1).double()
    assert torch.equal(pruned.atp_stats["tokens_seen"][:, 0], real)
    hidden, ffn = stock.config.text_config.hidden_size, stock.config.text_config.intermediate_size
    assert torch.allclose(pruned.atp_stats["flops_full"], 4 * layer_flops(real, hidden, ffn))


def test_a_ragged_batch_equals_each_sample_alone(stock, family):
    model = atp(stock)
    batch = batch_of(stock, family, seed=2)
    with torch.no_grad():
        out = model(**batch)
        tokens = out.atp_stats["tokens"]
        assert len({tuple(t) for t in tokens.tolist()}) == 3, "the samples should keep different counts"
        for i in range(3):
            one = sample_alone(batch, IMAGES[family], i)
            alone = model(**one)
            assert torch.equal(alone.atp_stats["tokens"][0], tokens[i])
            keep = survivors(model, one, alone.atp_stats)[0]
            n = one["input_ids"].shape[1]
            err = (alone.logits[0] - out.logits[i, :n])[keep].abs().max().item()
            assert err < 1e-10, (i, err)


def test_kept_tokens_keep_the_stock_models_positions(stock, family):
    """The (cos, sin) the decoder layers after the last ATP layer get for the kept tokens are
    the stock model's for those tokens (M-RoPE ids gathered with the tokens)."""
    model = atp(stock)
    batch = batch_of(stock, family, padding="left")
    seen = {}

    def grab(name):
        def hook(module, args, kwargs):
            seen[name] = kwargs["position_embeddings"][0]
        return hook

    handles = [stock.model.language_model.layers[3].register_forward_pre_hook(grab("stock"), with_kwargs=True),
               model.model.language_model.layers[3].register_forward_pre_hook(grab("atp"), with_kwargs=True)]
    try:
        with torch.no_grad():
            stock(**batch)
            out = model(**batch)
    finally:
        for h in handles:
            h.remove()
    keep = survivors(model, batch, out.atp_stats)
    assert seen["atp"].shape[1] < seen["stock"].shape[1]
    full = seen["stock"].expand(keep.shape[0], -1, -1)  # 1D RoPE: one row for the batch
    for b in range(keep.shape[0]):
        n = int(keep[b].sum())
        assert torch.equal(seen["atp"][b, -n:], full[b, keep[b]]), b


def test_keep_all_generate_equals_stock(stock, family):
    model = atp(stock, theta_override=KEEP_ALL)
    prompts = batch_of(stock, family, padding="left", seed=1, labels=False)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, suppress_tokens=SUPPRESS)
    with torch.no_grad():
        ref = stock.generate(**prompts, **kw)
        out = model.generate(**prompts, **kw)
    assert torch.equal(out, ref)


def test_generate_with_the_pruned_cache_equals_recomputing_the_prefix(stock, family):
    model = atp(stock)
    prompts = batch_of(stock, family, padding="left", seed=1, labels=False)
    kw = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, return_dict_in_generate=True,
              output_logits=True, suppress_tokens=SUPPRESS)
    with torch.no_grad():
        cached = model.generate(**prompts, **kw)
        report = model.atp_report
        recomputed = model.generate(**prompts, use_cache=False, **kw)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.logits, recomputed.logits):
        assert (a - b).abs().max() < 1e-10
    assert report.generated == NEW


# ----------------------------------------------------------------------------------------------
# refusals


def test_refusals_name_the_reason():
    qwen = TINY_FAMILIES["qwen2_vl"](num_layers=2)
    with pytest.raises(ValueError, match="already 3D"):
        apply_atp(qwen, ATPConfig(layers=(1,), rope_2d=True))
    with pytest.raises(ValueError, match="image_grid does not apply"):
        apply_atp(qwen, ATPConfig(layers=(1,), image_grid=(4, 4)))
    with pytest.raises(TypeError, match="supported model classes: .*LlavaForConditionalGeneration"):
        apply_atp(qwen.model.language_model, ATPConfig(layers=(1,)))


def test_a_known_family_without_an_adapter_is_refused_with_its_reason():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    cfg = Gemma3Config(text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=300),
                       vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                          num_attention_heads=2, image_size=28, patch_size=14),
                       mm_tokens_per_image=4)
    with pytest.raises(TypeError, match="Gemma3ForConditionalGeneration is not supported: .*sliding-window"):
        apply_atp(Gemma3ForConditionalGeneration(cfg), ATPConfig(layers=(1,)))


def test_qwen3_vl_atp_layers_start_after_the_deepstack_layers():
    model = TINY_FAMILIES["qwen3_vl"](num_layers=4, deepstack=(0, 1))
    with pytest.raises(ValueError, match="first allowed ATP layer is 2"):
        apply_atp(model, ATPConfig(layers=(1, 3)))
    apply_atp(model, ATPConfig(layers=(2, 3), target_ratio=0.5))
