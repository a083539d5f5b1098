"""What the lmms-eval plugin (``atp_llava.lmms_eval_model``) reads: its model_args' lists and
thresholds, and a request's text and images turned into a batch of the model's inputs
(``RequestInputs``, a base of ``ATPLlava``)."""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from loguru import logger as eval_logger

from .cli import int_list, list_items
from .data import CLIP_MEAN, CLIP_STD, _preprocess, collate, encode_prompt, load_image

_VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".flv", ".wmv", ".m4v")


def _int_list(value, name: str) -> Optional[Tuple[int, ...]]:
    """model_args list: 4, [1, 2, 3] (lmms-eval may parse them) or a text cli.int_list reads
    ("[1,2,3]", "1:2:3", "1 2 3"; "" is None) -> tuple of ints."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (int(value),)
    if isinstance(value, (list, tuple)):
        return tuple(int(v) for v in value)
    try:
        return int_list(None if value is None else str(value))
    except ValueError:
        raise ValueError(f"atp_llava model_args: {name} must be integers like [1,2,3] or 1:2:3, "
                         f"got {value!r}") from None


def _theta(value) -> Optional[Tuple[float, float]]:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        parts = list_items(str(value))
    try:
        out = tuple(float(p) for p in parts)
    except ValueError:
        out = ()
    if len(out) != 2:
        raise ValueError(f"atp_llava model_args: theta must be two numbers theta_r, theta_s like [0.5,0.5] or "
                         f"0.5:0.5, got {value!r}")
    return out


class RequestInputs:
    """ATPLlava's inputs: its image processor, a request's images as pixel values, its prompt as
    token ids, a batch of both. Reads the attributes ``ATPLlava.__init__`` sets (``_tokenizer``,
    ``_image_processor``, ``image_size``, ``n_grid``, ``image_token_id``, ``template``,
    ``pad_token_id``, ``_dtype``, ``_device``) and lmms-eval's ``task_dict``."""

    def _load_image_processor(self, path: str):
        if not os.path.exists(os.path.join(path, "preprocessor_config.json")):
            return None
        from transformers import AutoImageProcessor

        try:
            return AutoImageProcessor.from_pretrained(path)
        except (OSError, ValueError, ImportError) as e:
            eval_logger.warning(f"atp_llava: could not load the image processor in {path} ({e}); using CLIP "
                                "preprocessing")
            return None

    def _pixels(self, visuals: Sequence[Any]) -> Optional[torch.Tensor]:
        """(k, 3, S, S) pixel values of one request's images (PIL images, arrays, tensors or paths)."""
        if not visuals:
            return None
        images = []
        for v in visuals:
            if isinstance(v, (str, os.PathLike)) and os.fspath(v).lower().endswith(_VIDEO_EXTENSIONS):
                raise NotImplementedError(f"atp_llava: video input ({v}) is not supported, images only")
            if isinstance(v, dict):
                raise NotImplementedError(f"atp_llava: non-image visual {sorted(v)} (audio?) is not supported")
            if hasattr(v, "convert"):  # PIL
                v = v.convert("RGB")
            images.append(v)
        if self._image_processor is not None:
            opened = []
            for v in images:
                if isinstance(v, (str, os.PathLike)):
                    from PIL import Image

                    v = Image.open(os.fspath(v)).convert("RGB")
                opened.append(v)
            pixels = self._image_processor(images=opened, return_tensors="pt")["pixel_values"]
        else:
            import numpy as np

            pixels = torch.stack([_preprocess(load_image(np.asarray(v) if hasattr(v, "getpixel") else v),
                                              self.image_size, CLIP_MEAN, CLIP_STD) for v in images])
        if tuple(pixels.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(f"atp_llava: the image processor gives {tuple(pixels.shape[-2:])} images, the vision "
                             f"tower takes {self.image_size} x {self.image_size}")
        return pixels.to(torch.float32)

    def _encode(self, text: str) -> List[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=False)) if text else []

    def _prompt_ids(self, context: str, n_images: int) -> List[int]:
        """data.encode_prompt in this model's template: the images at the context's own <image>
        placeholders, the rest at the template's {image}."""
        return encode_prompt(self._tokenizer, context, n_images, self.image_token_id, self.n_grid, self.template)

    def _visuals(self, doc_to_visual, task: str, split: str, doc_id) -> List[Any]:
        if doc_to_visual is None:
            return []
        out = doc_to_visual(self.task_dict[task][split][doc_id])
        if out is None:
            return []
        flat = []
        for v in out if isinstance(out, (list, tuple)) else [out]:
            flat.extend(v if isinstance(v, (list, tuple)) else [v])
        return flat

    def _batch(self, examples: List[Dict[str, Any]], padding_side: str) -> Dict[str, torch.Tensor]:
        for ex in examples:
            ex.setdefault("labels", [-100] * len(ex["input_ids"]))
            if ex["pixel_values"] is None:
                ex["pixel_values"] = torch.zeros(0, 3, self.image_size, self.image_size)
        inputs = collate(examples, pad_token_id=self.pad_token_id, padding_side=padding_side)
        inputs.pop("labels")
        if "pixel_values" in inputs:  # absent when no example has an image
            inputs["pixel_values"] = inputs["pixel_values"].to(self._dtype)
        return {k: v.to(self._device) for k, v in inputs.items()}
