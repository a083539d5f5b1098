"""ATP-LLaVA training entry point.

    python -m atp_llava.train --tiny --synthetic 64 --layers 1,2,3 --target-tokens 300 \\
        --max-steps 30 --log-json run.jsonl --log-csv run.csv --save-atp atp.safetensors
    python -m atp_llava.train --model llava-hf/llava-1.5-7b-hf --data records.json \\
        --layers 4,14,24 --target-tokens 144 --train-lm --lr-atp 1e-4 --lr-lm 2e-5

Logs one row per optimizer step (losses, N_bar, tokens and thresholds per ATP layer) as JSON
lines and/or CSV. ``--nproc N`` runs N processes with DDP on this machine (gloo on CPU, nccl on
CUDA); under ``torchrun`` the environment's rank and world size are used instead.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import time
from typing import Any, Dict, List, Optional, Sequence

import torch

from .config import MODES, ATPConfig
from .data import RecordsDataset, SyntheticDataset, collate
from .io import save_atp
from .patch import apply_atp

__all__ = ["build_parser", "main", "train", "step_record"]


def _ints(s: Optional[str]) -> Optional[tuple]:
    return None if s is None or s == "" else tuple(int(x) for x in s.split(","))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atp_llava.train", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face LLaVA checkpoint (path or hub id)")
    src.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (24x24 image grid), no download")
    p.add_argument("--tiny-layers", type=int, default=4, help="decoder layers of --tiny")
    p.add_argument("--tiny-decoder", default="llama", choices=("llama", "qwen2"))
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--data", help="records .json/.jsonl: {image, prompt, answer}")
    data.add_argument("--synthetic", type=int, metavar="N", help="N synthetic examples")
    p.add_argument("--max-images", type=int, default=1, help="--synthetic: up to this many images per prompt")
    p.add_argument("--layers", default="4,14,24", help="ATP layer indexes, comma-separated")
    p.add_argument("--target-tokens", type=float, default=144.0)
    p.add_argument("--temperature", type=float, default=10.0)
    p.add_argument("--lambda-atp", type=float, default=0.05)
    p.add_argument("--lambda-target", type=float, default=0.2)
    p.add_argument("--lambda-sample", type=float, default=3.0)
    p.add_argument("--strides", default=None, help="spatial strides, comma-separated (default: all valid)")
    p.add_argument("--mlp-width", type=int, default=256)
    p.add_argument("--init-threshold", type=float, default=0.1)
    p.add_argument("--mode", default="adaptive", choices=MODES)
    p.add_argument("--fixed-keep", default=None, help="mode fixed: tokens kept after each ATP layer")
    p.add_argument("--train-lm", action="store_true", help="train the LM too (default: frozen, ATP only)")
    p.add_argument("--lr-atp", type=float, default=1e-4)
    p.add_argument("--lr-lm", type=float, default=2e-5)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="per process")
    p.add_argument("--padding-side", default="right", choices=("left", "right"))
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the decoder layers")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--nproc", type=int, default=1, help="DDP processes to spawn on this machine")
    p.add_argument("--log-json", default=None, help="write one JSON line per step here")
    p.add_argument("--log-csv", default=None, help="write one CSV row per step here")
    p.add_argument("--save-atp", default=None, help="save the ATP weights (safetensors) here at the end")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> ATPConfig:
    return ATPConfig(layers=_ints(args.layers), target_tokens=args.target_tokens, temperature=args.temperature,
                     lambda_atp=args.lambda_atp, lambda_target=args.lambda_target,
                     lambda_sample=args.lambda_sample, strides=_ints(args.strides), mlp_width=args.mlp_width,
                     init_threshold=args.init_threshold, mode=args.mode, fixed_keep=_ints(args.fixed_keep),
                     train_lm=args.train_lm)


def _load_model(args: argparse.Namespace, dtype: torch.dtype):
    """(model, tokenizer or None)."""
    if args.tiny:
        from .tiny import tiny_llava

        return tiny_llava(args.tiny_layers, decoder=args.tiny_decoder, seed=args.seed).to(dtype), None
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    return model, AutoTokenizer.from_pretrained(args.model)


def _dataset(args: argparse.Namespace, model, tokenizer, n_grid: int):
    vc = model.config.vision_config
    if args.synthetic is not None:
        return SyntheticDataset(args.synthetic, model.config.image_token_id, n_grid, vc.image_size,
                                model.config.text_config.vocab_size, max_images=args.max_images, seed=args.seed)
    if tokenizer is None:
        raise ValueError("--data needs a tokenizer: use --model with a checkpoint that has one")
    return RecordsDataset(args.data, tokenizer, model.config.image_token_id, n_grid, vc.image_size)


def step_record(step: int, epoch: int, out, lrs: Sequence[float], seconds: float) -> Dict[str, Any]:
    """One log row: losses, N_bar, and per-ATP-layer batch means of tokens and thresholds."""
    st = out.atp_stats
    rec: Dict[str, Any] = {"step": step, "epoch": epoch, "loss": float(out.loss.detach()),
                           "loss_ntp": float(st["loss_ntp"]), "loss_atp": float(st["loss_atp"]),
                           "loss_target": float(st["loss_target"]), "n_bar": float(st["n_bar_batch"]),
                           "flops_ratio": float(st["flops"].sum() / st["flops_full"].sum()),
                           "kv_ratio": float(st["kv_cache_bytes"].sum() / st["kv_cache_bytes_full"].sum()),
                           "seconds": seconds}
    has_image = st["images_per_sample"] > 0
    for k, layer in enumerate(st["layers"]):
        rec[f"tokens_l{layer}"] = float(st["tokens"][has_image, k].mean()) if bool(has_image.any()) else 0.0
        if "theta_r" in st:
            rec[f"theta_r_l{layer}"] = float(st["theta_r"][has_image, k].mean()) if bool(has_image.any()) else 0.0
            rec[f"theta_s_l{layer}"] = float(st["theta_s"][has_image, k].mean()) if bool(has_image.any()) else 0.0
    for i, lr in enumerate(lrs):
        rec[f"lr{i}"] = lr
    return rec


def _param_groups(model, args):
    atp = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("atp.")]
    lm = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("atp.")]
    groups = []
    if atp:
        groups.append({"params": atp, "lr": args.lr_atp})
    if lm:
        groups.append({"params": lm, "lr": args.lr_lm})
    if not groups:
        raise ValueError("nothing to train: no parameter requires a gradient")
    return groups


def train(args: argparse.Namespace, rank: int = 0, world_size: int = 1) -> List[Dict[str, Any]]:
    """Run training in this process (rank ``rank`` of ``world_size``); returns the log rows."""
    distributed = world_size > 1
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if distributed:
        import torch.distributed as dist

        if device.type == "cuda":
            device = torch.device("cuda", rank % torch.cuda.device_count())
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    model, tokenizer = _load_model(args, dtype)
    config = config_from_args(args)
    if config.mode != "adaptive" and not config.train_lm:
        raise ValueError(f"--mode {config.mode} has no ATP parameters to train; add --train-lm")
    apply_atp(model, config)
    model.to(device)
    if args.grad_ckpt:
        # Non-reentrant: the per-forward ATP state rides in the layers' keyword arguments.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_grid = model.atp.n_grid
    dataset = _dataset(args, model, tokenizer, n_grid)
    sampler = (torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=args.seed)
               if distributed else None)
    pad = model.config.text_config.pad_token_id
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, shuffle=sampler is None, sampler=sampler,
        generator=torch.Generator().manual_seed(args.seed),
        collate_fn=lambda b: collate(b, pad_token_id=0 if pad is None else pad, padding_side=args.padding_side))
    opt = torch.optim.AdamW(_param_groups(model, args), weight_decay=args.weight_decay)
    runner = model
    if distributed:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    total = args.epochs * len(loader) if args.max_steps is None else min(args.max_steps, args.epochs * len(loader))
    progress = None
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=total, desc="atp-llava", unit="step")
    json_f = open(args.log_json, "w") if (rank == 0 and args.log_json) else None
    csv_f, csv_w = (open(args.log_csv, "w", newline=""), None) if (rank == 0 and args.log_csv) else (None, None)
    rows: List[Dict[str, Any]] = []
    step = 0
    try:
        for epoch in range(args.epochs):
            if sampler is not None:
                sampler.set_epoch(epoch)
            for batch in loader:
                if step >= total:
                    break
                t0 = time.perf_counter()
                batch = {k: v.to(device) for k, v in batch.items()}
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
                out = runner(**batch, use_cache=False)
                opt.zero_grad(set_to_none=True)
                out.loss.backward()
                opt.step()
                step += 1
                rec = step_record(step, epoch, out, [g["lr"] for g in opt.param_groups], time.perf_counter() - t0)
                rows.append(rec)
                if json_f:
                    json_f.write(json.dumps(rec) + "\n")
                    json_f.flush()
                if csv_f:
                    if csv_w is None:
                        csv_w = csv.DictWriter(csv_f, fieldnames=list(rec))
                        csv_w.writeheader()
                    csv_w.writerow(rec)
                    csv_f.flush()
                if progress is not None:
                    progress.update(1)
                    progress.set_postfix(loss=f"{rec['loss']:.3f}", n_bar=f"{rec['n_bar']:.1f}")
    finally:
        for f in (json_f, csv_f):
            if f:
                f.close()
        if progress is not None:
            progress.close()
    if rank == 0 and args.save_atp:
        save_atp(model, args.save_atp)
    if distributed:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()
    return rows


def _spawn_worker(rank: int, world_size: int, argv: List[str], port: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = port
    train(build_parser().parse_args(argv), rank=rank, world_size=world_size)


def _free_port() -> str:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    args = build_parser().parse_args(argv)
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # torchrun
        return train(args, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    if args.nproc > 1:
        import sys

        import torch.multiprocessing as mp

        mp.spawn(_spawn_worker, args=(args.nproc, list(sys.argv[1:] if argv is None else argv), _free_port()),
                 nprocs=args.nproc, join=True)
        return []
    return train(args)


if __name__ == "__main__":
    main()
