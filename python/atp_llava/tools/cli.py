"""What the atp_llava command-line tools share: which model to run and a synthetic prompt batch.

    --tiny                      a tiny random LLaVA (tiny.py), no download
    --model DIR                 a saved Hugging Face LlavaForConditionalGeneration
    --atp FILE                  ATP weights and config saved by atp_llava.save_atp, or else
    --layers 1,2,3 --theta R S  ATP layers with fixed thresholds (theta_override), or
    --mode fastv --layers K --keep N   the FastV baseline (fixed-ratio: --mode fixed --keep a,b,c;
                                       random selection at those counts: --mode random --keep a,b,c)

``load_model`` is the one loader of the model every tool runs (train.py, report.py,
visualize.py, lmms_eval_model.py); ``model_atp`` turns these ATP options into what it takes;
``int_list`` parses every list of integers the tools take (these options, train.py's,
lmms_eval_model.py's model_args).
"""
from __future__ import annotations

import argparse
import os
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ..core.config import MODES, ATPConfig

__all__ = ["list_items", "int_list", "add_model_args", "check_model_args", "model_atp", "load_model",
           "model_from_args", "synthetic_prompts"]


def list_items(text: str) -> List[str]:
    """The items of a list written as text: separated by commas, colons, semicolons or white
    space, the whole optionally in brackets ("[1,2,3]", "1:2:3", "0.5 0.5"); empty items are
    skipped."""
    return [p for p in re.split(r"[\s,:;]+", text.strip().strip("[]()")) if p]


def int_list(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """"1,2,3" -> (1, 2, 3). Integers are separated by commas (also colons, semicolons or white
    space, and the list may stand in brackets: "[1,2,3]", "1:2:3", the forms lmms-eval's
    model_args allow); empty items are skipped ("1,2," is (1, 2)). None, "" and a text with no
    integer at all give None: the option is not given and its default applies, as when it is left
    out (a script's ``--layers "$LAYERS"`` with LAYERS empty). Anything else raises ValueError."""
    if text is None:
        return None
    parts = list_items(text)
    if not parts:
        return None
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"expected integers like 1,2,3, got {text!r}") from None


def add_model_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (24x24 image grid), no download")
    src.add_argument("--model", metavar="DIR", help="a saved Hugging Face LLaVA (LlavaForConditionalGeneration)")
    p.add_argument("--tiny-layers", type=int, default=4, help="decoder layers of --tiny")
    p.add_argument("--tiny-decoder", default="llama", choices=("llama", "qwen2"))
    p.add_argument("--seed", type=int, default=0,
                   help="--tiny weights; synthetic prompts and images; --mode random's draws")
    p.add_argument("--atp", metavar="FILE", help="trained ATP weights (atp_llava.io.save_atp); their config is used")
    p.add_argument("--layers", type=int_list, default=None,
                   help="without --atp: ATP layer indexes, comma-separated (default: 1,2,3 with --tiny, else 4,14,24)")
    p.add_argument("--theta", type=float, nargs=2, metavar=("R", "S"), default=None,
                   help="without --atp: fixed thresholds theta_r, theta_s (needed with --model in adaptive mode)")
    p.add_argument("--init-threshold", type=float, default=None,
                   help="--tiny without --atp or --theta: the untrained thresholds (default 0.5)")
    p.add_argument("--mode", default="adaptive", choices=MODES, help="without --atp: ATP, or a baseline")
    p.add_argument("--keep", type=int_list, default=None, help="--mode fixed/fastv/random: tokens kept per ATP layer")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")


def model_atp(*, tiny: bool, atp: Union[None, str, os.PathLike] = None, layers: Optional[Sequence[int]] = None,
              theta: Optional[Sequence[float]] = None, mode: str = "adaptive", keep: Optional[Sequence[int]] = None,
              init_threshold: Optional[float] = None, seed: int = 0) -> Union[str, os.PathLike, ATPConfig]:
    """The ATP the tools' options ask for, as ``load_model`` takes it: the trained weights file
    ``atp`` (with its own config), or else an ATPConfig of untrained modules at ``layers``
    (default 1,2,3 with ``tiny``, else 4,14,24), fixed thresholds ``theta`` (theta_r, theta_s),
    ``mode`` with ``keep`` tokens per ATP layer, initial thresholds ``init_threshold`` (default
    0.5) and ``seed`` for mode "random"'s draws. ValueError for combinations that cannot mean
    anything (and for what ATPConfig refuses)."""
    if atp:
        if layers or theta or init_threshold is not None or keep:
            raise ValueError("--layers, --theta, --init-threshold and --keep set up untrained ATP modules; --atp "
                             "loads trained ones with their own config")
        return atp
    if not tiny and theta is None and mode == "adaptive":
        raise ValueError("--model needs --atp FILE (trained ATP weights) or --theta R S: untrained threshold MLPs "
                         "would decide at random")
    return ATPConfig(layers=layers or ((1, 2, 3) if tiny else (4, 14, 24)), theta_override=theta, mode=mode,
                     fixed_keep=keep, init_threshold=0.5 if init_threshold is None else init_threshold,
                     random_seed=seed)


def _atp_options(args: argparse.Namespace) -> Dict[str, Any]:
    return dict(tiny=args.tiny, atp=args.atp, layers=args.layers, theta=args.theta, mode=args.mode, keep=args.keep,
                init_threshold=args.init_threshold, seed=args.seed)


def check_model_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """parser.error for model arguments that cannot mean anything (``model_atp``'s refusals)."""
    try:
        model_atp(**_atp_options(args))
    except ValueError as e:
        parser.error(str(e))


def load_model(checkpoint: Union[None, str, os.PathLike] = None, *, tiny: bool = False, tiny_layers: int = 4,
               tiny_decoder: str = "llama", tiny_image_size: Optional[int] = None, seed: int = 0,
               dtype: Union[str, torch.dtype] = "float32", atp: Union[None, str, os.PathLike, ATPConfig] = None,
               device: Union[None, str, torch.device] = None) -> nn.Module:
    """The model every atp_llava tool runs, in eval mode: the saved LlavaForConditionalGeneration
    ``checkpoint`` (a directory or hub id) or, with ``tiny``, a tiny random LLaVA (tiny.py:
    ``tiny_layers`` decoder layers of ``tiny_decoder``, image side ``tiny_image_size``, default
    tiny_llava's, weights from ``seed``), in ``dtype``; with the ATP of ``atp``: a weights file
    (save_atp; its config is used) or an ATPConfig (untrained modules; ``layers`` None: the
    model's default_layers), or None for the stock model; on ``device`` (default: cuda if
    available, else cpu)."""
    from ..io import load_atp
    from ..patch import apply_atp

    if tiny == (checkpoint is not None):
        raise ValueError("load_model: name a checkpoint or set tiny=True (one of the two)")
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if tiny:
        from .tiny import tiny_llava

        size = {} if tiny_image_size is None else {"image_size": tiny_image_size}
        model = tiny_llava(tiny_layers, decoder=tiny_decoder, seed=seed, **size).to(dtype)
    else:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
    if isinstance(atp, ATPConfig):
        apply_atp(model, atp)
    elif atp is not None:
        load_atp(model, atp)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval()


def model_from_args(args: argparse.Namespace) -> nn.Module:
    """``load_model`` of the options ``add_model_args`` defines."""
    return load_model(args.model, tiny=args.tiny, tiny_layers=args.tiny_layers, tiny_decoder=args.tiny_decoder,
                      seed=args.seed, dtype=args.dtype, atp=model_atp(**_atp_options(args)), device=args.device)


def synthetic_prompts(model: nn.Module, batch: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``batch`` random prompts with one image each (data.SyntheticDataset without the answers),
    left padded as for generate(), on the model's device and dtype."""
    from .data import SyntheticDataset, collate

    cfg = model.config
    n_grid = model.atp.n_grid
    data = SyntheticDataset(batch, cfg.image_token_id, n_grid, cfg.vision_config.image_size,
                            cfg.text_config.vocab_size, seed=seed)
    prompts = []
    for i in range(batch):
        ex = data[i]
        n = sum(1 for t in ex["labels"] if t == -100)
        prompts.append({"pixel_values": ex["pixel_values"], "input_ids": ex["input_ids"][:n],
                        "labels": ex["labels"][:n]})
    inputs = collate(prompts, pad_token_id=cfg.text_config.pad_token_id or 0, padding_side="left")
    inputs.pop("labels")
    param = next(model.parameters())
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype=param.dtype)
    return {k: v.to(param.device) for k, v in inputs.items()}
