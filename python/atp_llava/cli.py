"""What the atp_llava command-line tools share: which model to run and a synthetic prompt batch.

    --tiny                      a tiny random LLaVA (tiny.py), no download
    --model DIR                 a saved Hugging Face LlavaForConditionalGeneration
    --atp FILE                  ATP weights and config saved by atp_llava.save_atp, or else
    --layers 1,2,3 --theta R S  ATP layers with fixed thresholds (theta_override), or
    --mode fastv --layers K --keep N   the FastV baseline (fixed-ratio: --mode fixed --keep a,b,c;
                                       random selection at those counts: --mode random --keep a,b,c)

``int_list`` parses every list of integers the tools take (these options, train.py's,
lmms_eval_model.py's model_args).
"""
from __future__ import annotations

import argparse
import re
from typing import Dict, Optional, Tuple

import torch
from torch import nn

from .config import MODES, ATPConfig

__all__ = ["int_list", "add_model_args", "check_model_args", "load_model", "synthetic_prompts"]


def int_list(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """"1,2,3" -> (1, 2, 3). Integers are separated by commas (also colons, semicolons or white
    space, and the list may stand in brackets: "[1,2,3]", "1:2:3", the forms lmms-eval's
    model_args allow); empty items are skipped ("1,2," is (1, 2)). None, "" and a text with no
    integer at all give None: the option is not given and its default applies, as when it is left
    out (a script's ``--layers "$LAYERS"`` with LAYERS empty). Anything else raises ValueError."""
    if text is None:
        return None
    parts = [p for p in re.split(r"[\s,:;]+", text.strip().strip("[]()")) if p]
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


def check_model_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """parser.error for combinations of the model arguments that cannot mean anything."""
    if args.atp and (args.layers or args.theta or args.init_threshold is not None or args.keep):
        parser.error("--layers, --theta, --init-threshold and --keep set up untrained ATP modules; --atp loads "
                     "trained ones with their own config")
    if args.model and not args.atp and args.theta is None and args.mode == "adaptive":
        parser.error("--model needs --atp FILE (trained ATP weights) or --theta R S: untrained threshold MLPs "
                     "would decide at random")


def load_model(args: argparse.Namespace) -> nn.Module:
    """The ATP model of the arguments: --tiny or --model, then --atp or an ATPConfig from
    --layers/--theta/--mode/--keep; on its device, in eval mode."""
    from .io import load_atp
    from .patch import apply_atp

    dtype = getattr(torch, args.dtype)
    if args.tiny:
        from .tiny import tiny_llava

        model = tiny_llava(args.tiny_layers, decoder=args.tiny_decoder, seed=args.seed).to(dtype)
    else:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    if args.atp:
        load_atp(model, args.atp)
    else:
        layers = args.layers or ((1, 2, 3) if args.tiny else (4, 14, 24))
        apply_atp(model, ATPConfig(layers=layers, theta_override=args.theta, mode=args.mode, fixed_keep=args.keep,
                                   init_threshold=0.5 if args.init_threshold is None else args.init_threshold,
                                   random_seed=args.seed))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model.to(device).eval()


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
