"""Tiny random models of every supported family, built from configs (no download): the real
image layouts (LLaVA-1.5's 24 x 24 grid, LLaVA-NeXT's anyres tiles, Qwen2-VL's dynamic grids and
M-RoPE) with decoders small enough for CPU tests and smoke runs, and batches for them."""
from __future__ import annotations

import torch

__all__ = ["tiny_llava", "tiny_llava_next", "tiny_llava_onevision", "tiny_internvl", "tiny_qwen2_vl", "tiny_qwen3_vl", "family_batch", "TINY_VOCAB", "TINY_IMAGE_TOKEN",
           "TINY_FAMILIES"]

TINY_VOCAB = 128
TINY_IMAGE_TOKEN = TINY_VOCAB - 1


def _text_config(kind: str, num_layers: int):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=2048,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if kind == "llama":
        return LlamaConfig(**common)
    if kind == "qwen2":
        return Qwen2Config(**common)
    raise ValueError(f"tiny_llava: decoder must be 'llama' or 'qwen2', got {kind!r}")


def tiny_llava(num_layers: int = 4, decoder: str = "llama", seed: int = 0, attn_implementation: str = "sdpa",
               image_size: int = 48):
    """Random ``LlavaForConditionalGeneration``: CLIP vision tower with ``image_size`` 48, patch 2
    (24 x 24 patches, CLS dropped, LLaVA-1.5's grid; 24 gives 12 x 12 for CPU experiments), text
    model of hidden 64, 4 query heads, 2 KV heads (GQA), ``num_layers`` layers; ``decoder`` is
    "llama" (LLaVA-1.5) or "qwen2"."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=image_size, patch_size=2, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
    text = _text_config(decoder, num_layers)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model


# LLaVA-NeXT: 16 px tiles of 8 x 8 tokens; pinpoints of 1 x 2, 2 x 1 and 2 x 2 tiles.
NEXT_TILE = 16
NEXT_PINPOINTS = [[16, 32], [32, 16], [32, 32]]


def tiny_llava_next(num_layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    """Random ``LlavaNextForConditionalGeneration`` (anyres): CLIP tower of 16 px tiles, patch 2
    (8 x 8 tokens per tile, CLS dropped), image_grid_pinpoints NEXT_PINPOINTS, the llama decoder
    of ``tiny_llava``."""
    from transformers import CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    vision = CLIPVisionConfig(image_size=NEXT_TILE, patch_size=2, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
    config = LlavaNextConfig(vision_config=vision, text_config=_text_config("llama", num_layers),
                             image_token_id=TINY_IMAGE_TOKEN, image_grid_pinpoints=NEXT_PINPOINTS,
                             vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaNextForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model


ONEVISION_VIDEO = TINY_VOCAB - 2


def tiny_llava_onevision(num_layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    """Random ``LlavaOnevisionForConditionalGeneration``: SigLIP tower (no CLS) of 16 px tiles,
    patch 2 (8 x 8 tokens per tile), NEXT_PINPOINTS, ``anyres_max_1`` (a canvas of more than one
    tile's worth of tokens is shrunk), video frames pooled to 4 x 4; the qwen2 decoder of
    ``tiny_llava``."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, SiglipVisionConfig

    vision = SiglipVisionConfig(image_size=NEXT_TILE, patch_size=2, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=1, num_attention_heads=2)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=_text_config("qwen2", num_layers),
                                  image_token_id=TINY_IMAGE_TOKEN, video_token_id=ONEVISION_VIDEO,
                                  image_grid_pinpoints=NEXT_PINPOINTS, vision_aspect_ratio="anyres_max_1",
                                  vision_feature_layer=-1, vision_feature_select_strategy="full",
                                  tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model


# Qwen2-VL: special tokens at the top of the tiny vocabulary.
QWEN_IMAGE, QWEN_VIDEO, QWEN_START, QWEN_END = 120, 121, 122, 123


def tiny_internvl(num_layers: int = 4, seed: int = 0, attn_implementation: str = "sdpa"):
    """Random ``InternVLForConditionalGeneration``: InternViT of 16 px tiles, patch 2, pixel
    shuffle 0.5 (4 x 4 tokens per tile); the qwen2 decoder of ``tiny_llava``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    vision = InternVLVisionConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                  image_size=[NEXT_TILE, NEXT_TILE], patch_size=[2, 2])
    config = InternVLConfig(vision_config=vision, text_config=_text_config("qwen2", num_layers),
                            image_token_id=TINY_IMAGE_TOKEN, downsample_ratio=0.5, vision_feature_layer=-1,
                            vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model


QWEN_TOKENS = dict(image_token_id=QWEN_IMAGE, video_token_id=QWEN_VIDEO, vision_start_token_id=QWEN_START,
                   vision_end_token_id=QWEN_END, tie_word_embeddings=False)


def _qwen_text(num_layers: int, interleaved: bool = False, **extra):
    """The tiny decoder with M-RoPE sections (2, 3, 3) (head_dim 16)."""
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    if interleaved:
        rope["mrope_interleaved"] = True
    return dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=2048, rope_parameters=rope,
                pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, **extra)


def tiny_qwen2_vl(num_layers: int = 4, seed: int = 0, version: str = "2", attn_implementation: str = "sdpa"):
    """Random ``Qwen2VLForConditionalGeneration`` (``version`` "2") or
    ``Qwen2_5_VLForConditionalGeneration`` ("2.5"): vision patch 2, spatial merge 2, temporal
    patch 2, one vision block; text hidden 64, head_dim 16, M-RoPE sections (2, 3, 3)."""
    if version == "2":
        from transformers import Qwen2VLConfig as Config, Qwen2VLForConditionalGeneration as Model
    elif version == "2.5":
        from transformers import Qwen2_5_VLConfig as Config, Qwen2_5_VLForConditionalGeneration as Model
    else:
        raise ValueError(f"tiny_qwen2_vl: version must be '2' or '2.5', got {version!r}")
    vision = dict(depth=1, embed_dim=32, hidden_size=64, out_hidden_size=64, intermediate_size=64, num_heads=2,
                  patch_size=2, spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    config = Config(vision_config=vision, text_config=_qwen_text(num_layers), **QWEN_TOKENS)
    torch.manual_seed(seed)
    model = Model(config)
    model.set_attn_implementation(attn_implementation)
    return model


def tiny_qwen3_vl(num_layers: int = 4, seed: int = 0, deepstack=(0,), attn_implementation: str = "sdpa"):
    """Random ``Qwen3VLForConditionalGeneration``: the vision sizes of ``tiny_qwen2_vl`` with two
    blocks, deepstack features from the blocks ``deepstack`` (added after that many decoder
    layers), interleaved M-RoPE (2, 3, 3) at head_dim 16."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=2,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3, num_position_embeddings=64,
                  deepstack_visual_indexes=list(deepstack))
    config = Qwen3VLConfig(vision_config=vision, text_config=_qwen_text(num_layers, head_dim=16, interleaved=True),
                           **QWEN_TOKENS)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model


TINY_FAMILIES = {"llava": tiny_llava, "internvl": tiny_internvl, "llava_next": tiny_llava_next, "llava_onevision": tiny_llava_onevision,
                 "qwen2_vl": tiny_qwen2_vl,
                 "qwen2_5_vl": lambda **kw: tiny_qwen2_vl(version="2.5", **kw), "qwen3_vl": tiny_qwen3_vl}


def family_batch(model, images, seed: int = 0, text=6, answer: int = 3, padding: str = "left"):
    """A batch of random tokens and pixels for ``model``, a model of any supported family (the
    tiny ones here, or full-size shapes with random weights: bench/e2e_bench.py). Sample b holds
    the images ``images[b]`` (a list; a LLaVA-1.5 image is None, a LLaVA-NeXT/OneVision image its
    (H, W) pixel size or, OneVision only, ("video", F) a video of F frames, a Qwen-VL image its
    (T, H, W) patch grid, T > 1 a video, an InternVL image its number of tiles), each after ``text`` prompt tokens (an int, or (before
    each image, after the last)), then ``answer`` answer tokens (labels). Padded on ``padding``.
    Image placeholders as the model's processor lays them out. Returns the model's keyword
    arguments."""
    g = torch.Generator().manual_seed(seed)
    kind = type(model).__name__
    cfg, vc = model.config, model.config.vision_config
    before, after = (text, text) if isinstance(text, int) else text

    def words(n):
        return torch.randint(3, 100, (n,), generator=g).tolist()

    seqs, answers, pixels = [], [], []
    sizes, image_thw, video_thw, video_pixels = [], [], [], []
    for sample in images:
        ids = [1]
        for image in sample:
            ids += words(before)
            if kind.startswith("Qwen"):
                t, h, w = image
                m = vc.spatial_merge_size
                token = cfg.video_token_id if t > 1 else cfg.image_token_id
                ids += [cfg.vision_start_token_id] + [token] * (t * h * w // (m * m)) + [cfg.vision_end_token_id]
                px = torch.randn(t * h * w, vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2, generator=g)
                (video_thw if t > 1 else image_thw).append((t, h, w))
                (video_pixels if t > 1 else pixels).append(px)
            elif kind.startswith("LlavaOnevision") and image[0] == "video":
                frames, side = image[1], -(-(vc.image_size // vc.patch_size) // 2)  # pooled: ceil(H / 2)
                ids += [cfg.video_token_id] * (frames * side * side + 1)
                video_pixels.append(torch.randn(frames, 3, vc.image_size, vc.image_size, generator=g))
            elif kind.startswith("Llava") and hasattr(cfg, "image_grid_pinpoints"):  # NeXT, OneVision: anyres
                from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

                onevision = kind.startswith("LlavaOnevision")
                alone = not onevision or sum(1 for im in sample if im[0] != "video") == 1
                n = image_size_to_num_patches(list(image), cfg.image_grid_pinpoints, vc.image_size) if alone else 1
                tiles = [torch.zeros(n, (vc.image_size // vc.patch_size) ** 2, 1)]
                if onevision:
                    _, lens = model.model.pack_image_features(tiles, torch.tensor([image]), image_newline=torch.zeros(1),
                                                              vision_aspect_ratio=cfg.vision_aspect_ratio)
                else:
                    _, lens = model.model.pack_image_features(tiles, torch.tensor([image]), "default",
                                                              image_newline=torch.zeros(1))
                ids += [cfg.image_token_id] * int(lens[0])
                sizes.append(image)
                pixels.append(torch.randn(n, 3, vc.image_size, vc.image_size, generator=g))
            elif kind.startswith("InternVL"):  # ``image`` tiles of s x s tokens
                side = int(vc.image_size[0] // vc.patch_size[0] * cfg.downsample_ratio)
                ids += [cfg.image_token_id] * (image * side * side)
                pixels.append(torch.randn(image, 3, *vc.image_size, generator=g))
            else:
                ids += [cfg.image_token_id] * (vc.image_size // vc.patch_size) ** 2
                pixels.append(torch.randn(3, vc.image_size, vc.image_size, generator=g))
        ids += words(after)
        ans = words(answer)
        seqs.append(ids + ans)
        answers.append(len(ans))
    length = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for b, (s, a) in enumerate(zip(seqs, answers)):
        start = length - len(s) if padding == "left" else 0
        input_ids[b, start:start + len(s)] = torch.tensor(s)
        mask[b, start:start + len(s)] = 1
        labels[b, start + len(s) - a:start + len(s)] = input_ids[b, start + len(s) - a:start + len(s)]
    out = {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
    if kind.startswith("Qwen"):
        types = torch.zeros_like(input_ids, dtype=torch.int32)
        types[input_ids == cfg.image_token_id] = 1
        types[input_ids == cfg.video_token_id] = 2
        out["mm_token_type_ids"] = types
        if pixels:
            out.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.tensor(image_thw))
        if video_pixels:
            out.update(pixel_values_videos=torch.cat(video_pixels), video_grid_thw=torch.tensor(video_thw))
    elif sizes or video_pixels:  # anyres
        if pixels:
            most = max(p.shape[0] for p in pixels)
            out["pixel_values"] = torch.stack([torch.cat([p, p.new_zeros(most - p.shape[0], *p.shape[1:])]) for p in pixels])
            out["image_sizes"] = torch.tensor(sizes)
        if kind.startswith("LlavaOnevision"):
            out["batch_num_images"] = torch.tensor([sum(1 for im in s if im[0] != "video") for s in images])
        if video_pixels:
            out["pixel_values_videos"] = torch.stack(video_pixels)
    elif pixels:
        out["pixel_values"] = torch.cat(pixels) if kind.startswith("InternVL") else torch.stack(pixels)
    return out
