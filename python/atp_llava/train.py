"""ATP-LLaVA training entry point.

    python -m atp_llava.train --tiny --synthetic 64 --target-tokens 300 --max-steps 30 \\
        --eval-synthetic 32 --log-json run.jsonl --log-csv run.csv --save-model run/
    python -m atp_llava.train --model llava-hf/llava-1.5-7b-hf --data train.jsonl --eval-data val.jsonl \\
        --target-tokens 144 --train-lm --epochs 1 --eval-every 500 --save-model atp-llava-7b/

Logs one row per optimizer step (losses, N_bar, the tokens the budget losses saw, the soft and
hard token counts and the thresholds per ATP layer) as JSON lines and/or CSV. With an eval set
(--eval-data / --eval-synthetic) a held-out pass in model.eval() (hard masks, real pruning) runs
at the end and every --eval-every steps: answer accuracy and token statistics, one JSON line
with "split": "eval" and a printed summary (``evaluate`` is the same pass as a function).
--save-model DIR writes the stock LLaVA (save_pretrained) and DIR/atp.safetensors:
``load_atp(LlavaForConditionalGeneration.from_pretrained(DIR), DIR + "/atp.safetensors")`` is the
trained model. ``--nproc N`` runs N processes with DDP on this machine (gloo on CPU, nccl on
CUDA); under ``torchrun`` the environment's rank and world size are used instead. ``--fsdp``
shards with FSDP2 instead of DDP (``shard_fsdp2``; every rank then runs the evaluations).
``--engine trainer`` trains with Hugging Face Trainer (``atp_llava.trainer.ATPTrainer``: its DDP,
``--grad-accum``, the same optimizer settings) and logs one row per optimizer step from its logs.

    torchrun --nproc-per-node 2 -m atp_llava.train --tiny --synthetic 64 --fsdp --max-steps 30
    torchrun --nproc-per-node 2 -m atp_llava.train --tiny --synthetic 64 --engine trainer --grad-accum 2

This module is the command line and the run; the loops are in ``atp_llava.tools.train_loops``,
the rows a run logs and the eval pass in ``atp_llava.tools.train_log``, the writer of
--save-model in ``atp_llava.tools.checkpoint``.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from .core.config import BUDGET_CONTROLS, BUDGETS, MLP_INPUTS, MODES, TARGET_LOSSES, ATPConfig
from .core.optim import DEFAULT_LR_ATP, DEFAULT_LR_LM
from .io import save_atp
from .tools.checkpoint import ATP_FILE, save_model
from .tools.cli import int_list, load_model
from .tools.fsdp import shard_fsdp2
from .tools.train_log import _Log, evaluate, format_eval, step_record
from .tools.train_loops import _dataset, _load_tokenizer, _loader, _run_own, _run_trainer

__all__ = ["build_parser", "main", "train", "evaluate", "format_eval", "save_model", "step_record", "ATP_FILE"]

ENGINES = ("own", "trainer")
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(ATPConfig)}


def _bound(s: str) -> Optional[float]:
    return None if s.lower() == "none" else float(s)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m atp_llava.train", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="Hugging Face LLaVA checkpoint (path or hub id)")
    src.add_argument("--tiny", action="store_true", help="a tiny random LLaVA (24x24 image grid), no download")
    p.add_argument("--tiny-layers", type=int, default=4, help="decoder layers of --tiny")
    p.add_argument("--tiny-decoder", default="llama", choices=("llama", "qwen2"))
    p.add_argument("--tiny-image-size", type=int, default=None,
                   help="image side of --tiny (patch 2; default: tiny_llava's, 48 = a 24 x 24 grid)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="Hugging Face tokenizer (directory or hub id) for text records (default: --model's); "
                        "pre-tokenised records (prompt_ids / answer_ids) need none")

    data = p.add_argument_group("data")
    train_src = data.add_mutually_exclusive_group(required=True)
    train_src.add_argument("--data", metavar="FILE",
                           help="training records .json/.jsonl: {image, prompt, answer} (text, needs a tokenizer) or "
                                "{image, prompt_ids, answer_ids} (token ids; the model's image token id once per "
                                "image in prompt_ids)")
    train_src.add_argument("--synthetic", type=int, metavar="N", help="N synthetic training examples")
    data.add_argument("--max-images", type=int, default=1, help="--synthetic: up to this many images per prompt")
    eval_src = data.add_mutually_exclusive_group()
    eval_src.add_argument("--eval-data", metavar="FILE", help="held-out records (the --data format) to evaluate on")
    eval_src.add_argument("--eval-synthetic", type=int, metavar="N",
                          help="N held-out synthetic examples (the ones after --synthetic's, same classes)")
    data.add_argument("--eval-every", type=int, default=None, metavar="K",
                      help="also evaluate every K optimizer steps (the end of training always is)")
    data.add_argument("--eval-batch-size", type=int, default=None, help="default: --batch-size")

    atp = p.add_argument_group("ATP (ATPConfig)")
    atp.add_argument("--layers", default=None,
                     help="ATP layer indexes, comma-separated (default: ATPConfig.default_layers(num_hidden_layers), "
                          "1/8, 7/16, 3/4 of the depth: 4,14,24 for 32 layers, 1,2,3 for --tiny's 4)")
    atp.add_argument("--target-tokens", type=float, default=_DEFAULTS["target_tokens"],
                     help="N_target, vision tokens per image averaged over decoder layers (Eq. 13)")
    atp.add_argument("--temperature", type=float, default=_DEFAULTS["temperature"], help="T of Eq. 9-10")
    atp.add_argument("--lambda-atp", type=float, default=_DEFAULTS["lambda_atp"], help="weight of L_ATP (Eq. 14)")
    atp.add_argument("--lambda-target", type=float, default=_DEFAULTS["lambda_target"],
                     help="weight of L_target (Eq. 14); with --budget-control constraint, its starting value and floor")
    atp.add_argument("--lambda-sample", type=float, default=_DEFAULTS["lambda_sample"], help="Eq. 5")
    atp.add_argument("--strides", default=None, help="spatial strides, comma-separated (default: all valid)")
    atp.add_argument("--mlp-width", type=int, default=_DEFAULTS["mlp_width"])
    atp.add_argument("--init-threshold", type=float, default=_DEFAULTS["init_threshold"])
    atp.add_argument("--init-spatial-threshold", type=float, default=_DEFAULTS["init_spatial_threshold"],
                     help="initial theta_s (default: --init-threshold)")
    atp.add_argument("--mode", default=_DEFAULTS["mode"], choices=MODES)
    atp.add_argument("--fixed-keep", default=None,
                     help="mode fixed/fastv/random: tokens kept after each ATP layer, comma-separated")
    atp.add_argument("--random-seed", type=int, default=_DEFAULTS["random_seed"],
                     help="mode random: the seed of the draws")
    atp.add_argument("--mlp-inputs", default=_DEFAULTS["mlp_inputs"], choices=MLP_INPUTS,
                     help="threshold MLP inputs: min-max normalised scores, or raw (the paper)")
    atp.add_argument("--budget", default=_DEFAULTS["budget"], choices=BUDGETS,
                     help="token counts of the budget losses: straight-through hard masks, or soft (the paper)")
    atp.add_argument("--min-keep", type=int, default=_DEFAULTS["min_keep"],
                     help="tokens every image keeps at least at each ATP layer (hard masks; 0 = no floor)")
    atp.add_argument("--target-loss", default=_DEFAULTS["target_loss"], choices=TARGET_LOSSES,
                     help="L_target: Huber (see --target-delta) or L1 (the paper)")
    atp.add_argument("--target-delta", type=float, default=_DEFAULTS["target_delta"],
                     help="--target-loss huber: quadratic zone, in tokens")
    atp.add_argument("--budget-control", default=_DEFAULTS["budget_control"], choices=BUDGET_CONTROLS,
                     help="constraint: L_target's weight grows while N_bar is off the target; penalty: the fixed "
                          "--lambda-target of Eq. 14 (the paper)")
    atp.add_argument("--weight-growth", type=float, default=_DEFAULTS["weight_growth"],
                     help="--budget-control constraint: the factor of one change of L_target's weight")
    atp.add_argument("--budget-window", type=int, default=_DEFAULTS["budget_window"],
                     help="--budget-control constraint: optimizer steps per change of L_target's weight")
    atp.add_argument("--budget-tolerance", type=float, default=_DEFAULTS["budget_tolerance"],
                     help="--budget-control constraint: the relative error of N_bar within which the weight "
                          "relaxes")
    atp.add_argument("--logit-bound", type=_bound, default=_DEFAULTS["logit_bound"],
                     help="thresholds' pre-sigmoid logits held in [-B, B], gradients passed back inside; 'none': the "
                          "plain sigmoid (the paper)")
    atp.add_argument("--score-grad", action=argparse.BooleanOptionalAction, default=_DEFAULTS["score_grad"],
                     help="with --train-lm: the masks' gradient reaches the score layers' queries and keys "
                          "through the scores (--no-score-grad: the scores are constants)")
    atp.add_argument("--train-lm", action="store_true", help="train the LM too (default: frozen, ATP only)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--lr-atp", type=float, default=DEFAULT_LR_ATP, help="learning rate of the ATP modules")
    opt.add_argument("--lr-lm", type=float, default=DEFAULT_LR_LM,
                     help="--train-lm: learning rate of the LLaVA weights")
    opt.add_argument("--weight-decay", type=float, default=0.0)
    opt.add_argument("--epochs", type=int, default=1,
                     help="passes over the training data; ignored when --max-steps is given")
    opt.add_argument("--max-steps", type=int, default=None,
                     help="exactly this many optimizer steps, over as many epochs as that takes (overrides --epochs)")
    opt.add_argument("--batch-size", type=int, default=4, help="per process")
    opt.add_argument("--padding-side", default="right", choices=("left", "right"))
    opt.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing of the decoder layers")

    run = p.add_argument_group("run")
    run.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    run.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--nproc", type=int, default=1,
                     help="processes to spawn on this machine (DDP, or FSDP2 with --fsdp); under torchrun, its own")
    run.add_argument("--engine", default="own", choices=ENGINES,
                     help="own: this module's loop; trainer: Hugging Face Trainer (atp_llava.trainer.ATPTrainer)")
    run.add_argument("--fsdp", action="store_true",
                     help="FSDP2 (fully_shard every decoder layer, the ATP modules and the root) instead of DDP")
    run.add_argument("--grad-accum", type=int, default=1, metavar="N",
                     help="gradient accumulation steps (--engine trainer)")
    run.add_argument("--log-json", default=None,
                     help="write one JSON line per step here (and one per evaluation, \"split\": \"eval\")")
    run.add_argument("--log-csv", default=None, help="write one CSV row per training step here")
    run.add_argument("--save-atp", default=None, help="save the ATP weights (safetensors) here at the end")
    run.add_argument("--save-model", default=None, metavar="DIR",
                     help="save the trained model here at the end: the stock LLaVA (save_pretrained, with the "
                          f"trained LM under --train-lm) plus DIR/{ATP_FILE}, and the tokenizer if one was used")
    run.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def config_from_args(args: argparse.Namespace) -> ATPConfig:
    return ATPConfig(layers=int_list(args.layers), target_tokens=args.target_tokens, temperature=args.temperature,
                     lambda_atp=args.lambda_atp, lambda_target=args.lambda_target,
                     lambda_sample=args.lambda_sample, strides=int_list(args.strides), mlp_width=args.mlp_width,
                     init_threshold=args.init_threshold, init_spatial_threshold=args.init_spatial_threshold,
                     mode=args.mode, fixed_keep=int_list(args.fixed_keep),
                     train_lm=args.train_lm, mlp_inputs=args.mlp_inputs, budget=args.budget,
                     min_keep=args.min_keep, target_loss=args.target_loss, target_delta=args.target_delta,
                     budget_control=args.budget_control, weight_growth=args.weight_growth,
                     budget_window=args.budget_window,
                     budget_tolerance=args.budget_tolerance, logit_bound=args.logit_bound,
                     random_seed=args.random_seed, score_grad=args.score_grad)


def check_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """parser.error for arguments that cannot mean anything (before any process starts)."""
    for name in ("max_steps", "epochs", "batch_size", "eval_every", "eval_batch_size", "synthetic", "eval_synthetic"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.eval_every is not None and args.eval_data is None and args.eval_synthetic is None:
        parser.error("--eval-every needs an eval set: --eval-data FILE or --eval-synthetic N")
    if args.mode != "adaptive" and args.layers is None:
        parser.error(f"--mode {args.mode} needs --layers (one entry per --fixed-keep entry)")
    try:
        config = config_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    if config.mode != "adaptive" and not config.train_lm:
        parser.error(f"--mode {config.mode} has no ATP parameters to train; add --train-lm")
    if args.grad_accum < 1:
        parser.error(f"--grad-accum must be >= 1, got {args.grad_accum}")
    if args.grad_accum > 1 and args.engine != "trainer":
        parser.error("--grad-accum needs --engine trainer (whose loss normalisation over the accumulated batch "
                     "atp_llava.trainer implements); the own loop steps on every batch")
    if args.fsdp and args.engine == "trainer":
        parser.error("--fsdp runs with --engine own: Trainer shards through accelerate's FSDP plugin "
                     "(TrainingArguments.fsdp), which this entry point does not configure")
    if args.fsdp and args.nproc < 2 and int(os.environ.get("WORLD_SIZE", "1")) < 2:
        parser.error("--fsdp shards over several processes: run under torchrun --nproc-per-node N or with --nproc N, "
                     "N >= 2")


def train(args: argparse.Namespace, rank: int = 0, world_size: int = 1,
          return_model: bool = False) -> Union[List[Dict[str, Any]], Tuple[List[Dict[str, Any]], nn.Module]]:
    """Run training in this process (rank ``rank`` of ``world_size``) with ``args.engine``;
    returns the log rows (training steps and evaluations), and the trained model with
    ``return_model``."""
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
    config = config_from_args(args)
    if config.mode != "adaptive" and not config.train_lm:
        raise ValueError(f"--mode {config.mode} has no ATP parameters to train; add --train-lm")
    # No --layers: apply_atp fills in ATPConfig.default_layers of this model's depth.
    model = load_model(args.model, tiny=args.tiny, tiny_layers=args.tiny_layers, tiny_decoder=args.tiny_decoder,
                       tiny_image_size=args.tiny_image_size, seed=args.seed, dtype=dtype, atp=config, device=device)
    tokenizer = _load_tokenizer(args)
    if args.grad_ckpt:
        # Non-reentrant: the per-forward ATP state rides in the layers' keyword arguments.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    n_grid = model.atp.n_grid
    pad = model.config.text_config.pad_token_id
    dataset = _dataset(args, model, tokenizer, n_grid, "train")
    if len(dataset) == 0:
        raise ValueError("the training set is empty")
    if args.fsdp:
        if not distributed:
            raise ValueError("--fsdp needs several processes (torchrun --nproc-per-node N, or --nproc N)")
        shard_fsdp2(model)  # before the optimizer: the parameters become DTensor shards
    has_eval = args.eval_data is not None or args.eval_synthetic is not None
    # Sharded, every rank runs the eval forwards (they gather parameters); otherwise rank 0 alone.
    eval_ranks = args.fsdp or rank == 0
    eval_set = _dataset(args, model, tokenizer, n_grid, "eval") if (has_eval and eval_ranks) else None
    eval_loader = (None if eval_set is None else
                   _loader(eval_set, args.eval_batch_size or args.batch_size, pad, args.padding_side))
    json_f = open(args.log_json, "w") if (rank == 0 and args.log_json) else None
    csv_f = open(args.log_csv, "w", newline="") if (rank == 0 and args.log_csv) else None
    log = _Log(json_f, csv_f)

    def run_eval(step: int, epoch: int) -> None:
        """An eval pass on the unwrapped model (rank 0, or every rank when sharded); rank 0 logs."""
        if has_eval and eval_loader is not None:
            rec = {"split": "eval", "step": step, "epoch": epoch, **evaluate(model, eval_loader)}
            if rank == 0:
                log.eval(rec)
        if distributed:
            dist.barrier()

    run = _run_trainer if args.engine == "trainer" else _run_own
    try:
        run(args, model, dataset, pad, dtype, device, rank, world_size, log, run_eval)
    finally:
        log.close()
    if args.save_atp:
        save_atp(model, args.save_atp)  # rank 0 writes; sharded, every rank gathers
    if args.save_model:
        save_model(model, args.save_model, tokenizer)
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    return (log.rows, model) if return_model else log.rows


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
    parser = build_parser()
    args = parser.parse_args(argv)
    check_args(args, parser)
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
