"""One Hugging Face Trainer run of a tiny ATP-LLaVA on CPU, for tests/test_llava_trainer.py:
``python tests/trainer_worker.py OUT --batch B --accum N [--plain]``, alone or under
``torchrun --nproc-per-node W`` (DDP, gloo).

One optimizer step (SGD, constant learning rate, no clipping) on the first B x N x W examples of
a fixed dataset, taken in order; rank 0 writes to OUT (torch.save) the ATP parameters' gradients
at the optimizer step, the parameters after it, Trainer's log history, every forward's N_bar and
every rank's budget weight and error after the step, so that runs with different B, N and W
can be compared.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from transformers import Trainer, TrainerCallback, TrainingArguments  # noqa: E402

from atp_llava import ATPConfig, apply_atp, save_atp  # noqa: E402
from atp_llava.io import _gathered  # noqa: E402
from atp_llava.tools.data import SyntheticDataset, collate  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, TINY_VOCAB, tiny_llava  # noqa: E402
from atp_llava.trainer import ZERO3_CONFIG, ATPCallback, ATPTrainer  # noqa: E402

N_GRID = 576
CONFIG = dict(layers=(1, 2, 3), target_tokens=200, budget_window=1)  # a budget window per step
TEXT_ONLY = (2, 3)  # without --plain: these examples have no image (a text-only micro-batch at B = 2)


class Examples(torch.utils.data.Dataset):
    """SyntheticDataset's examples; ``text_only`` ones lose their image (tokens and pixels);
    ``uniform``: every example cut to the same length (the same label tokens per sample)."""

    def __init__(self, n, text_only=(), uniform=False):
        self.data = SyntheticDataset(n, TINY_IMAGE_TOKEN, N_GRID, 48, TINY_VOCAB, seed=3)
        self.text_only, self.uniform = set(text_only), uniform

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        ex = dict(self.data[i])
        if self.uniform:  # a fixed prompt length, the answer (2 label tokens) kept
            keep = N_GRID + 12
            ex["input_ids"] = ex["input_ids"][:keep - 2] + ex["input_ids"][-2:]
            ex["labels"] = [-100] * (keep - 2) + ex["labels"][-2:]
        return without_image(ex) if i in self.text_only else ex


def without_image(ex):
    """A SyntheticDataset example with its image tokens and pixels removed (its text kept)."""
    ids = [t for t in ex["input_ids"] if t != TINY_IMAGE_TOKEN]
    return {"input_ids": ids, "labels": ex["labels"][-len(ids):], "pixel_values": ex["pixel_values"][:0]}


class Record(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads, self.n_bars = model, None, []
        model.register_forward_hook(lambda m, a, out: self.n_bars.append(float(out.atp_stats["n_bar_batch"])))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if args.deepspeed:  # DeepSpeed keeps the gradients (partitioned) and has stepped already
            return
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if n.startswith("atp.")}


def budget_state(model):
    """ATPConfig.budget_control's state: the weight and the last window's error."""
    return float(model.atp.budget_weight), float(model.atp.budget_violation)


def EVAL(n):
    """Held-out examples for the eval forward (--deepspeed)."""
    return SyntheticDataset(n, TINY_IMAGE_TOKEN, N_GRID, 48, TINY_VOCAB, seed=4)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--accum", type=int, required=True)
    p.add_argument("--plain", action="store_true", help="plain Trainer with ATPCallback, uniform examples")
    p.add_argument("--deepspeed", action="store_true",
                   help="DeepSpeed ZeRO-3 (atp_llava's config, every parameter partitioned); after the step, an "
                        "eval forward with real pruning on every rank and save_atp from the partitions")
    a = p.parse_args()
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = apply_atp(tiny_llava(4, seed=0), ATPConfig(**CONFIG)).train()
    n = a.batch * a.accum * world
    data = Examples(n, uniform=True) if a.plain else Examples(n, text_only=TEXT_ONLY)
    ds_config = None
    if a.deepspeed:
        with open(ZERO3_CONFIG) as f:
            ds_config = json.load(f)
        ds_config["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # the small ATP ones too
    args = TrainingArguments(deepspeed=ds_config, 
        output_dir=os.path.join(os.path.dirname(a.out), "trainer_out"), per_device_train_batch_size=a.batch,
        gradient_accumulation_steps=a.accum, max_steps=1, optim="sgd", learning_rate=0.5,
        lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=0.0, weight_decay=0.0,
        use_cpu=True, ddp_backend="gloo" if world > 1 else None, ddp_find_unused_parameters=False, train_sampling_strategy="sequential", remove_unused_columns=False,
        logging_steps=1, save_strategy="no", report_to=[], disable_tqdm=True, seed=0,
        dataloader_num_workers=0)
    record = Record(model)
    if a.plain:
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate,
                          callbacks=[record, ATPCallback()])
    else:
        trainer = ATPTrainer(model=model, args=args, train_dataset=data, data_collator=collate,
                             callbacks=[record], lr_atp=0.5)
    trainer.train()
    n_bars, weights = [None] * world, [None] * world
    if world > 1:
        torch.distributed.all_gather_object(n_bars, record.n_bars)
        torch.distributed.all_gather_object(weights, budget_state(model))
    else:
        n_bars, weights = [record.n_bars], [budget_state(model)]
    with _gathered(model.atp):  # whole under ZeRO-3
        params = {k: v.detach().clone() for k, v in model.named_parameters() if k.startswith("atp.")}
    result = {"grads": record.grads, "log_history": trainer.state.log_history, "n_bars": n_bars, "params": params,
              "weights": weights,
              "lrs": [g["lr"] for g in trainer.optimizer.param_groups]}
    if a.deepspeed:
        result["zero_stage"] = trainer.model_wrapped.zero_optimization_stage()
        atp = list(model.atp.parameters())  # outside a forward: released, each rank holding its partition
        result["released"] = all(p.numel() == 0 for p in atp)
        result["partition"] = (sum(p.ds_tensor.numel() for p in atp), sum(p.ds_numel for p in atp))
        model.eval()
        with torch.no_grad():
            out = model(**collate([EVAL(2)[i] for i in range(2)]))  # every rank: ZeRO-3 gathers in the forward
        result.update(eval_logits=out.logits, eval_tokens=out.atp_stats["tokens"])
        save_atp(model, os.path.join(os.path.dirname(a.out), "zero3_atp.safetensors"))
    if int(os.environ.get("RANK", "0")) == 0:
        torch.save(result, a.out)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
