"""Datasets of (image, prompt, answer) for ATP-LLaVA training, and their collator.

Every dataset yields examples of the same form:
    {"pixel_values": (k, 3, S, S) float32, "input_ids": list[int], "labels": list[int]}
where ``input_ids`` already holds ``n_grid`` image tokens per image (k images) and ``labels`` is
-100 on everything but the answer (HF convention).

* ``SyntheticDataset``: random images and token prompts with a learnable answer (an image class),
  for smoke tests of the whole pipeline on a tiny model, no tokenizer needed.
* ``RecordsDataset``: a list of dicts or a local JSON/JSONL file of records
  ``{"image": path | [paths], "prompt": str, "answer": str}`` tokenized with a Hugging Face
  tokenizer in the LLaVA-1.5 template, or pre-tokenised records
  ``{"image": ..., "prompt_ids": [int], "answer_ids": [int]}`` that need no tokenizer. Images
  load from ``.pt``/``.npy`` arrays (C, H, W) or (H, W, C), or any format PIL reads when PIL is
  installed.
* ``encode_prompt``: a prompt and its images as token ids in a template, the one prompt
  encoding of training (RecordsDataset), visualize.py and the lmms-eval plugin.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..core.layout import IGNORE_INDEX

__all__ = ["SyntheticDataset", "RecordsDataset", "collate", "load_image", "encode_prompt", "CLIP_MEAN", "CLIP_STD",
           "LLAVA_TEMPLATE", "IMAGE_PLACEHOLDER"]

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LLAVA_TEMPLATE = "USER: {image}\n{prompt} ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"  # where a prompt's text puts an image (encode_prompt)
_MARKER = "\x00IMAGE\x00"  # an image's place while the prompt is text; no tokenizer's text holds it


def encode_prompt(tokenizer, prompt: str, num_images: int, image_token_id: int, n_grid: int,
                  template: str = LLAVA_TEMPLATE) -> List[int]:
    """The token ids of ``prompt`` with ``num_images`` images, as training, the tools and the
    lmms-eval plugin all encode it: the tokenizer's bos, then ``template`` with ``{prompt}``
    replaced by ``prompt`` and every image as ``n_grid`` image tokens (``image_token_id``). The
    images go at the prompt's own IMAGE_PLACEHOLDERs (``<image>``) in order, the rest at the
    template's ``{image}``, newline-separated (none left: ``{image}`` and its newline are dropped).
    The text between images is encoded without special tokens. ValueError if the prompt has more
    placeholders than images.

    ``tokenizer``: any Hugging Face tokenizer (``encode``, ``bos_token_id``)."""
    placed = prompt.count(IMAGE_PLACEHOLDER)
    if placed > num_images:
        raise ValueError(f"encode_prompt: the prompt has {placed} {IMAGE_PLACEHOLDER} placeholders for "
                         f"{num_images} images")
    rest = num_images - placed
    if not rest:
        template = template.replace("{image}\n", "").replace("{image}", "")
    # {image} first: a prompt's own text "{image}" stays text
    text = template.replace("{image}", "\n".join([_MARKER] * rest)).replace(
        "{prompt}", prompt.replace(IMAGE_PLACEHOLDER, _MARKER))
    ids: List[int] = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    pieces = text.split(_MARKER)
    for j, piece in enumerate(pieces):
        if piece:
            ids += tokenizer.encode(piece, add_special_tokens=False)
        if j < len(pieces) - 1:
            ids += [image_token_id] * n_grid
    return ids


class SyntheticDataset(torch.utils.data.Dataset):
    """``n`` random examples: each has 1..max_images images of one of ``num_classes`` patterns
    plus noise, a prompt of random tokens, and an answer that names the class of every image.

    Token ids: 1 bos, 2 eos, ``image_token_id`` for vision tokens, prompt words in
    [3, 3 + 64), answers ``answer_base + class``.

    ``offset``: example ``i`` is example ``offset + i`` of the stream ``seed`` defines (same
    class patterns), so ``SyntheticDataset(m, ..., offset=n)`` is a held-out split of ``n``
    training examples.
    """

    def __init__(self, n: int, image_token_id: int, n_grid: int, image_size: int, vocab_size: int,
                 max_images: int = 1, num_classes: int = 8, seed: int = 0, offset: int = 0):
        if vocab_size < 3 + 64 + num_classes + 1:
            raise ValueError(f"SyntheticDataset: vocab_size {vocab_size} too small")
        if offset < 0:
            raise ValueError(f"SyntheticDataset: offset must be >= 0, got {offset}")
        self.n, self.image_token_id, self.n_grid, self.image_size = n, image_token_id, n_grid, image_size
        self.max_images, self.num_classes, self.seed, self.offset = max_images, num_classes, seed, offset
        self.answer_base = 3 + 64
        g = torch.Generator().manual_seed(seed)
        self.patterns = torch.randn(num_classes, 3, image_size, image_size, generator=g)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Dict[str, Any]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.offset + i)
        k = int(torch.randint(1, self.max_images + 1, (1,), generator=g))
        classes = torch.randint(0, self.num_classes, (k,), generator=g)
        pixels = self.patterns[classes] + 0.5 * torch.randn(k, 3, self.image_size, self.image_size, generator=g)
        words = lambda m: torch.randint(3, 3 + 64, (m,), generator=g).tolist()  # noqa: E731
        ids = [1] + words(int(torch.randint(2, 6, (1,), generator=g)))
        for _ in range(k):
            ids += [self.image_token_id] * self.n_grid + words(int(torch.randint(1, 4, (1,), generator=g)))
        ids += words(int(torch.randint(3, 10, (1,), generator=g)))
        answer = [self.answer_base + int(c) for c in classes] + [2]
        return {"pixel_values": pixels, "input_ids": ids + answer,
                "labels": [IGNORE_INDEX] * len(ids) + answer}


def load_image(image: Union[str, os.PathLike, torch.Tensor, Any]) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from a path (.pt, .npy, or a PIL-readable file), a tensor or an
    array ((C, H, W) or (H, W, C); uint8 is scaled by 1/255)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if path.endswith(".pt"):
            image = torch.load(path, map_location="cpu", weights_only=True)
        elif path.endswith(".npy"):
            import numpy as np

            image = torch.from_numpy(np.load(path))
        else:
            try:
                from PIL import Image
            except ImportError as e:  # pragma: no cover - depends on the environment
                raise ImportError(f"load_image: reading {path!r} needs PIL (pip install pillow); "
                                  ".pt and .npy images need nothing") from e
            import numpy as np

            image = torch.from_numpy(np.array(Image.open(path).convert("RGB")))  # a writable copy
    t = torch.as_tensor(image)
    if t.dim() != 3:
        raise ValueError(f"load_image: expected a 3D image, got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3) and t.shape[-1] in (1, 3):
        t = t.permute(2, 0, 1)
    t = t.float() / 255.0 if t.dtype == torch.uint8 else t.float()
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t.contiguous()


def _preprocess(image: torch.Tensor, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Resize (bicubic, no crop) to size x size and normalise as the CLIP image processor does."""
    x = F.interpolate(image[None], size=(size, size), mode="bicubic", align_corners=False)[0].clamp(0, 1)
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


class RecordsDataset(torch.utils.data.Dataset):
    """Records from a list or a local .json (a list) / .jsonl file, in one of two forms:

    * ``{"image": path | [paths] | tensor, "prompt": str, "answer": str}``, tokenized with
      ``tokenizer`` in the LLaVA-1.5 template (``encode_prompt``)::

          <bos> USER: <image>\\n{prompt} ASSISTANT: {answer}<eos>

      Each image becomes ``n_grid`` image tokens; several images go newline-separated at the
      template's ``<image>``, or, where the prompt's text holds ``<image>`` placeholders (as
      LLaVA's own instruction data does), there. ``tokenizer`` is any Hugging Face tokenizer
      (``encode``, ``bos_token_id``, ``eos_token_id``).
    * ``{"image": ..., "prompt_ids": [int], "answer_ids": [int]}``, pre-tokenised: used as they
      are (bos, template and eos are the record's), no tokenizer needed. ``prompt_ids`` holds
      ``image_token_id`` once per image where that image goes (expanded to ``n_grid`` tokens),
      or already ``n_grid`` times per image.

    Relative image paths resolve against the file's folder. ``vocab_size``: when given, token
    ids at or above it are refused (a tokenizer that does not belong to the model).
    """

    def __init__(self, records: Union[str, os.PathLike, List[Dict[str, Any]]], tokenizer, image_token_id: int,
                 n_grid: int, image_size: int, image_mean: Sequence[float] = CLIP_MEAN,
                 image_std: Sequence[float] = CLIP_STD, template: str = LLAVA_TEMPLATE,
                 vocab_size: Optional[int] = None):
        root = None
        source = "records"
        if isinstance(records, (str, os.PathLike)):
            path = source = os.fspath(records)
            root = os.path.dirname(os.path.abspath(path))
            with open(path) as f:
                records = ([json.loads(line) for line in f if line.strip()] if path.endswith(".jsonl")
                           else json.load(f))
        for i, r in enumerate(records):
            if "image" not in r:
                raise ValueError(f"RecordsDataset: record {i} of {source} lacks 'image'")
            if {"prompt_ids", "answer_ids"} <= set(r):
                for key in ("prompt_ids", "answer_ids"):
                    if not all(isinstance(t, int) and t >= 0 for t in r[key]):
                        raise ValueError(f"RecordsDataset: record {i} of {source}: {key} must be a list of "
                                         "non-negative token ids")
            elif {"prompt", "answer"} <= set(r):
                if tokenizer is None:
                    raise ValueError(
                        f"RecordsDataset: record {i} of {source} has a text prompt and answer but there is no "
                        "tokenizer: pass one (python -m atp_llava.train: --tokenizer PATH, any Hugging Face "
                        "tokenizer directory, or --model with a checkpoint that has one), or pre-tokenise the "
                        f"records as prompt_ids / answer_ids (lists of token ids, the image token "
                        f"{image_token_id} once per image)")
            else:
                raise ValueError(f"RecordsDataset: record {i} of {source} needs 'prompt' and 'answer' (text) or "
                                 f"'prompt_ids' and 'answer_ids' (token ids); it has {sorted(r)}")
        self.records, self.root, self.tokenizer = list(records), root, tokenizer
        self.image_token_id, self.n_grid, self.image_size = image_token_id, n_grid, image_size
        self.image_mean, self.image_std, self.template = tuple(image_mean), tuple(image_std), template
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return len(self.records)

    def _resolve(self, image):
        if isinstance(image, (str, os.PathLike)) and self.root and not os.path.isabs(image):
            return os.path.join(self.root, image)
        return image

    def _encode(self, text: str) -> List[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _tokenize(self, r: Dict[str, Any], num_images: int) -> Tuple[List[int], List[int]]:
        """(prompt ids with n_grid image tokens per image, answer ids) of a text record."""
        ids = encode_prompt(self.tokenizer, r["prompt"], num_images, self.image_token_id, self.n_grid, self.template)
        answer = self._encode(" " + r["answer"])
        if self.tokenizer.eos_token_id is not None:
            answer.append(self.tokenizer.eos_token_id)
        return ids, answer

    def _pretokenised(self, i: int, r: Dict[str, Any], num_images: int) -> Tuple[List[int], List[int]]:
        prompt, answer = list(r["prompt_ids"]), list(r["answer_ids"])
        count = prompt.count(self.image_token_id)
        if count == num_images * self.n_grid:
            return prompt, answer
        if count != num_images:
            raise ValueError(f"RecordsDataset: record {i}: prompt_ids holds the image token {self.image_token_id} "
                             f"{count} times for {num_images} image(s): expected once per image (or "
                             f"{self.n_grid} times per image)")
        ids: List[int] = []
        for t in prompt:
            ids += [t] * self.n_grid if t == self.image_token_id else [t]
        return ids, answer

    def __getitem__(self, i: int) -> Dict[str, Any]:
        r = self.records[i]
        images = r["image"] if isinstance(r["image"], (list, tuple)) else [r["image"]]
        pixels = torch.stack([_preprocess(load_image(self._resolve(im)), self.image_size, self.image_mean,
                                          self.image_std) for im in images])
        if "prompt_ids" in r and "answer_ids" in r:
            ids, answer = self._pretokenised(i, r, len(images))
        else:
            ids, answer = self._tokenize(r, len(images))
        if self.image_token_id in answer:
            raise ValueError(f"RecordsDataset: record {i}: the answer holds the image token {self.image_token_id}")
        if self.vocab_size is not None:
            top = max(ids + answer)
            if top >= self.vocab_size:
                raise ValueError(f"RecordsDataset: record {i} has token id {top}, the model's vocabulary has "
                                 f"{self.vocab_size}: the tokenizer does not belong to this model")
        return {"pixel_values": pixels, "input_ids": ids + answer, "labels": [IGNORE_INDEX] * len(ids) + answer}


def collate(batch: List[Dict[str, Any]], pad_token_id: int = 0, padding_side: str = "right") -> Dict[str, torch.Tensor]:
    """Pad a list of examples into model inputs.

    Returns input_ids, attention_mask, labels (B, L) and pixel_values (sum of images, 3, S, S) in
    sample order, as LlavaForConditionalGeneration expects; a batch without images (examples whose
    pixel_values have 0 images) has no pixel_values (the vision tower does not run).
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"collate: padding_side must be 'left' or 'right', got {padding_side!r}")
    length = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    for b, ex in enumerate(batch):
        n = len(ex["input_ids"])
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[b, sl] = torch.tensor(ex["input_ids"], dtype=torch.long)
        labels[b, sl] = torch.tensor(ex["labels"], dtype=torch.long)
        mask[b, sl] = 1
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    pixels = torch.cat([ex["pixel_values"] for ex in batch], dim=0)
    if pixels.shape[0]:
        out["pixel_values"] = pixels
    return out
