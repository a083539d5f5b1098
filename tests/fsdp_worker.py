"""Two training steps, eval with real pruning, generate() and save_atp of a tiny ATP-LLaVA under
FSDP2 (atp_llava.tools.fsdp.shard_fsdp2), for tests/test_llava_fsdp.py:
``torchrun --standalone --nproc-per-node 2 tests/fsdp_worker.py OUT_DIR``.

Rank r trains on examples (2r, 2r + 1) of each step's batch (fsdp_batches): rank 1's first
batch has no image. Each rank writes OUT_DIR/rank{r}.pt (the ATP parameters after the steps,
gathered, each step's loss and budget weight and error, the eval logits and atp_stats, the generated
tokens); rank 0 writes
OUT_DIR/atp.safetensors (save_atp from the shards).
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from atp_llava import ATPConfig, apply_atp, save_atp  # noqa: E402
from atp_llava.tools.data import SyntheticDataset, collate  # noqa: E402
from atp_llava.tools.fsdp import shard_fsdp2  # noqa: E402
from atp_llava.tools.tiny import TINY_IMAGE_TOKEN, TINY_VOCAB, tiny_llava  # noqa: E402
from trainer_worker import without_image  # noqa: E402  (beside this file)

# eval prunes most tokens; the budget weight takes a step after every optimizer step
CONFIG = dict(layers=(1, 2, 3), target_tokens=200, init_threshold=0.5, budget_window=1)
LR = 1e-4  # slow: N_bar falls by less than a quarter of its error in a step, so the weight doubles
STEPS = 2


def rank_batch(step, rank, world=2):
    """Step ``step``'s batch of rank ``rank``: 2 examples; rank 1's first has no image."""
    data = SyntheticDataset(16, TINY_IMAGE_TOKEN, 576, 48, TINY_VOCAB, seed=5)
    first = (step * world + rank) * 2
    text_only = step == 0 and rank == 1
    return collate([without_image(data[i]) if text_only else data[i] for i in (first, first + 1)])


def eval_prompts(rank):
    """A left-padded batch of prompts (no answers) for eval and generate(), one per rank."""
    data = SyntheticDataset(4, TINY_IMAGE_TOKEN, 576, 48, TINY_VOCAB, seed=6)
    exs = [dict(data[i]) for i in (2 * rank, 2 * rank + 1)]
    for ex in exs:
        ex["input_ids"], ex["labels"] = ex["input_ids"][:-2], ex["labels"][:-2]
    out = collate(exs, padding_side="left")
    del out["labels"]
    return out


def atp_params(model):
    return {n: p for n, p in model.named_parameters() if n.startswith("atp.")}


def main():
    out_dir = sys.argv[1]
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = shard_fsdp2(apply_atp(tiny_llava(4, seed=0), ATPConfig(**CONFIG)).train())
    opt = torch.optim.AdamW(atp_params(model).values(), lr=LR)
    losses, ran, weights = [], [], []
    for step in range(STEPS):
        opt.zero_grad()
        out = model(**rank_batch(step, rank, world), use_cache=False)
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
        ran.append(out.atp_stats["tokens"].shape[1])
        # ATPConfig.budget_control's state, from all-reduced counts
        weights.append((float(model.atp.budget_weight), float(model.atp.budget_violation)))
    params = {n: p.full_tensor().detach().clone() for n, p in atp_params(model).items()}
    model.eval()
    prompts = eval_prompts(rank)
    with torch.no_grad():
        ev = model(**prompts)
        gen = model.generate(**prompts, max_new_tokens=3, do_sample=False)
    save_atp(model, os.path.join(out_dir, "atp.safetensors"))
    torch.save({"params": params, "losses": losses, "ran": ran, "weights": weights, "logits": ev.logits,
                "tokens": ev.atp_stats["tokens"], "pruned": ev.atp_stats["pruned"], "generated": gen},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
