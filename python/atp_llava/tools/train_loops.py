"""The training loops of ``python -m atp_llava.train`` (``atp_llava.train``), and the data they
run on: the own loop (one optimizer step per batch, DDP or FSDP2 across processes) and Hugging
Face Trainer's (``atp_llava.trainer.ATPTrainer``); the tokenizer, datasets and loaders a run's
arguments name."""
from __future__ import annotations

import argparse
import math
import time
import warnings
from typing import Dict, Optional

import torch
from torch import nn

from ..core.optim import param_groups
from .data import RecordsDataset, SyntheticDataset, collate
from .train_log import step_record


def _load_tokenizer(args: argparse.Namespace):
    """--tokenizer, else --model's tokenizer when records are read (None if it has none)."""
    if args.tokenizer is None and (args.model is None or (args.data is None and args.eval_data is None)):
        return None
    from transformers import AutoTokenizer

    if args.tokenizer is not None:
        return AutoTokenizer.from_pretrained(args.tokenizer)
    try:
        return AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as e:  # a checkpoint without one: fine for pre-tokenised records
        reason = str(e).strip().splitlines()[0][:160]
        warnings.warn(f"--model {args.model}: no tokenizer loads ({type(e).__name__}: {reason}); text records "
                      "need --tokenizer PATH", stacklevel=2)
        return None


def _dataset(args: argparse.Namespace, model: nn.Module, tokenizer, n_grid: int, split: str):
    cfg = model.config
    vc = cfg.vision_config
    vocab = cfg.text_config.vocab_size
    synthetic, records = (args.synthetic, args.data) if split == "train" else (args.eval_synthetic, args.eval_data)
    if synthetic is not None:
        offset = 0 if split == "train" else (args.synthetic or 0)
        return SyntheticDataset(synthetic, cfg.image_token_id, n_grid, vc.image_size, vocab,
                                max_images=args.max_images, seed=args.seed, offset=offset)
    if records is None:
        return None
    return RecordsDataset(records, tokenizer, cfg.image_token_id, n_grid, vc.image_size, vocab_size=vocab)


def _loader(dataset, batch_size: int, pad: Optional[int], padding_side: str, shuffle: bool = False,
            sampler=None, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
        generator=torch.Generator().manual_seed(seed),
        collate_fn=lambda b: collate(b, pad_token_id=0 if pad is None else pad, padding_side=padding_side))


def _lrs(opt: torch.optim.Optimizer) -> Dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}  # param_groups() names them


def _run_own(args, model, dataset, pad, dtype, device, rank, world_size, log, run_eval) -> None:
    """This module's loop: one optimizer step per batch, DDP (or FSDP2, already applied) across
    processes, a DistributedSampler."""
    distributed = world_size > 1
    sampler = (torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank, seed=args.seed)
               if distributed else None)
    loader = _loader(dataset, args.batch_size, pad, args.padding_side, shuffle=True, sampler=sampler, seed=args.seed)
    opt = torch.optim.AdamW(param_groups(model, lr_atp=args.lr_atp, lr_lm=args.lr_lm,
                                         weight_decay=args.weight_decay))
    runner = model
    if distributed and not args.fsdp:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    total = args.epochs * len(loader) if args.max_steps is None else args.max_steps
    if rank == 0 and not args.no_progress:
        from tqdm.auto import tqdm

        log.progress = tqdm(total=total, desc="atp-llava", unit="step")
    step = epoch = 0
    while step < total:
        if sampler is not None:
            sampler.set_epoch(epoch)
        for batch in loader:
            t0 = time.perf_counter()
            batch = {k: v.to(device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            out = runner(**batch, use_cache=False)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            opt.step()
            step += 1
            rec = step_record(step, epoch, out, _lrs(opt), time.perf_counter() - t0)
            log.step(rec)
            if log.progress is not None:
                log.progress.update(1)
                log.progress.set_postfix(loss=f"{rec['loss']:.3f}", n_bar=f"{rec['n_bar']:.1f}")
            if step >= total:
                break
            if args.eval_every and step % args.eval_every == 0:
                run_eval(step, epoch)
        epoch += 1
    run_eval(step, max(epoch - 1, 0))


def _run_trainer(args, model, dataset, pad, dtype, device, rank, world_size, log, run_eval) -> None:
    """Hugging Face Trainer (ATPTrainer): its DDP, gradient accumulation, AdamW ("adamw_torch")
    at a constant learning rate without clipping, as the own loop; one log row per optimizer
    step from Trainer's logs (its loss, the mean over the accumulated batch, and ATPCallback's
    statistics under the own loop's names)."""
    import tempfile

    from transformers import TrainerCallback, TrainingArguments

    from ..trainer import ATPTrainer

    class Rows(TrainerCallback):
        def __init__(self):
            self.t0 = time.perf_counter()

        def on_log(self, targs, state, control, logs=None, **kwargs):
            if not logs or "loss" not in logs:  # Trainer's training logs only
                return
            # the own loop's epoch index; Trainer's state.epoch is the fraction of epochs done
            epoch = max(math.ceil(state.epoch or 0) - 1, 0)
            if rank == 0:
                self.row(state, epoch, logs, kwargs["optimizer"])
            step = state.global_step
            if args.eval_every and step % args.eval_every == 0 and step < state.max_steps:
                run_eval(step, epoch)  # every rank: it may gather or wait

        def row(self, state, epoch, logs, optimizer):
            rec = {"split": "train", "step": state.global_step, "epoch": epoch, "loss": float(logs["loss"])}
            rec.update({k[len("atp/"):]: v for k, v in logs.items() if k.startswith("atp/")})
            rec.update({f"lr_{name}": lr for name, lr in _lrs(optimizer).items()})
            now = time.perf_counter()
            rec["seconds"], self.t0 = now - self.t0, now
            log.step(rec)

    out_dir = tempfile.mkdtemp(prefix="atp_llava_trainer_")
    targs = TrainingArguments(
        output_dir=out_dir, per_device_train_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs, max_steps=args.max_steps or -1, learning_rate=args.lr_lm,
        weight_decay=args.weight_decay, optim="adamw_torch", lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=args.seed,
        data_seed=args.seed, use_cpu=device.type == "cpu",
        ddp_backend=("gloo" if device.type == "cpu" else "nccl") if world_size > 1 else None,
        ddp_find_unused_parameters=False, remove_unused_columns=False, disable_tqdm=args.no_progress or rank != 0,
        dataloader_num_workers=0)

    def collator(batch):
        out = collate(batch, pad_token_id=0 if pad is None else pad, padding_side=args.padding_side)
        if "pixel_values" in out:
            out["pixel_values"] = out["pixel_values"].to(dtype)
        return out

    trainer = ATPTrainer(model=model, args=targs, train_dataset=dataset, data_collator=collator,
                         lr_atp=args.lr_atp, callbacks=[Rows()])
    trainer.train()
    run_eval(trainer.state.global_step, max(int(trainer.state.epoch or 1) - 1, 0))
