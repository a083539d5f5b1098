"""A tiny random LLaVA built from configs: the real 24 x 24 = 576-token image layout with a
decoder small enough for CPU tests and smoke runs (no download)."""
from __future__ import annotations

import torch

__all__ = ["tiny_llava", "TINY_VOCAB", "TINY_IMAGE_TOKEN"]

TINY_VOCAB = 128
TINY_IMAGE_TOKEN = TINY_VOCAB - 1


def tiny_llava(num_layers: int = 4, decoder: str = "llama", seed: int = 0, attn_implementation: str = "sdpa",
               image_size: int = 48):
    """Random ``LlavaForConditionalGeneration``: CLIP vision tower with ``image_size`` 48, patch 2
    (24 x 24 patches, CLS dropped, LLaVA-1.5's grid; 24 gives 12 x 12 for CPU experiments), text
    model of hidden 64, 4 query heads, 2 KV heads (GQA), ``num_layers`` layers; ``decoder`` is
    "llama" (LLaVA-1.5) or "qwen2"."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(image_size=image_size, patch_size=2, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=1, num_attention_heads=2, projection_dim=32)
    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=2048,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if decoder == "llama":
        from transformers import LlamaConfig

        text = LlamaConfig(**common)
    elif decoder == "qwen2":
        from transformers import Qwen2Config

        text = Qwen2Config(**common)
    else:
        raise ValueError(f"tiny_llava: decoder must be 'llama' or 'qwen2', got {decoder!r}")
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=TINY_IMAGE_TOKEN,
                         vision_feature_layer=-1, vision_feature_select_strategy="default")
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.set_attn_implementation(attn_implementation)
    return model
