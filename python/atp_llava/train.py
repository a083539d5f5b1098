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
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import os
import time
import warnings
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .core.config import BUDGET_CONTROLS, BUDGETS, MLP_INPUTS, MODES, TARGET_LOSSES, ATPConfig
from .core.distributed import is_rank0
from .core.layout import IGNORE_INDEX
from .core.optim import DEFAULT_LR_ATP, DEFAULT_LR_LM, param_groups
from .io import save_atp
from .patch import get_atp_controller
from .tools.cli import int_list, load_model
from .tools.data import RecordsDataset, SyntheticDataset, collate
from .tools.fsdp import shard_fsdp2

__all__ = ["build_parser", "main", "train", "evaluate", "format_eval", "save_model", "step_record", "ATP_FILE"]

ATP_FILE = "atp.safetensors"  # the ATP weights inside a --save-model directory
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


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def _mean_rows(x: torch.Tensor, rows: torch.Tensor) -> float:
    return float(x[rows].float().mean()) if bool(rows.any()) else 0.0


def step_record(step: int, epoch: int, out, lrs: Union[Mapping[str, float], Sequence[float]],
                seconds: float) -> Dict[str, Any]:
    """One log row: losses, N_bar, and per-ATP-layer batch means (over samples with an image) of
    the tokens the budget losses saw (``tokens_l{layer}``), the soft and hard counts
    (``tokens_soft_l{layer}``, ``tokens_hard_l{layer}``) and the thresholds. ``lrs``: the
    learning rate of each parameter group, by name (``lr_atp``, ``lr_lm``) or by position (``lr0``),
    and in mode "adaptive" the budget weight the step's loss used (``budget_weight``)."""
    st = out.atp_stats
    rec: Dict[str, Any] = {"split": "train", "step": step, "epoch": epoch, "loss": float(out.loss.detach()),
                           "loss_ntp": float(st["loss_ntp"]), "loss_atp": float(st["loss_atp"]),
                           "loss_target": float(st["loss_target"]), "n_bar": float(st["n_bar_batch"])}
    if "n_bar_hard" in st:
        rec["n_bar_hard"] = float(st["n_bar_hard"])
    if "theta_r" in st:  # adaptive: L_target's weight this step used (ATPConfig.budget_control)
        rec["budget_weight"] = float(st["budget_weight"])
    rec["flops_ratio"] = float(st["flops"].sum() / st["flops_full"].sum())
    rec["kv_ratio"] = float(st["kv_cache_bytes"].sum() / st["kv_cache_bytes_full"].sum())
    rec["seconds"] = seconds
    has_image = st["images_per_sample"] > 0
    for k, layer in enumerate(st["layers"]):
        for key in ("tokens", "tokens_soft", "tokens_hard", "theta_r", "theta_s"):
            if st.get(key) is not None:
                rec[f"{key}_l{layer}"] = _mean_rows(st[key][:, k], has_image)
    named = ((f"lr_{n}", lr) for n, lr in lrs.items()) if isinstance(lrs, Mapping) else \
        ((f"lr{i}", lr) for i, lr in enumerate(lrs))
    rec.update(named)
    return rec


def _spread(values: torch.Tensor, prefix: str, rec: Dict[str, Any], std: bool = True) -> None:
    """rec[prefix_mean/_std/_min/_max] of a 1D tensor (population std; all 0 when empty)."""
    v = values.double()
    empty = v.numel() == 0
    rec[f"{prefix}_mean"] = 0.0 if empty else float(v.mean())
    if std:
        rec[f"{prefix}_std"] = 0.0 if empty else float(v.std(correction=0))
    rec[f"{prefix}_min"] = 0.0 if empty else float(v.min())
    rec[f"{prefix}_max"] = 0.0 if empty else float(v.max())


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> Dict[str, Any]:
    """A held-out pass of an ATP model in ``model.eval()`` (hard masks and real pruning unless its
    ATPConfig says otherwise); the model's train/eval mode is restored afterwards.

    ``loader`` yields ``collate`` batches with labels (-100 off the answer). Teacher-forced: the
    greedy argmax of the logits at each answer position is compared with the label there.

    Returns a flat dict::

        split "eval"; samples (with an answer); correct; accuracy: samples whose every answer
        token is predicted (exact match); token_accuracy; loss: L_ntp per answer token;
        images; n_bar / n_bar_std / n_bar_min / n_bar_max over samples with an image, target_tokens,
        n_bar_minus_target; for each ATP layer l: tokens_l{l}_mean/_std/_min/_max over images
        (the hard counts in eval; population std), theta_r_l{l}_mean/_min/_max and theta_s_...
        over samples with an image (adaptive mode); flops_ratio, kv_ratio against the unpruned
        model; hard, pruned (what the eval forward did).
    """
    inner = _unwrap(model)
    cfg = get_atp_controller(inner).config
    param = next(inner.parameters())
    was_training = inner.training
    inner.eval()
    samples = correct = tok_total = tok_correct = images = 0
    loss_sum = 0.0
    flops = [0.0, 0.0]
    kv = [0.0, 0.0]
    tokens: List[torch.Tensor] = []
    n_bars: List[torch.Tensor] = []
    thetas: Dict[str, List[torch.Tensor]] = {"theta_r": [], "theta_s": []}
    hard = pruned = False
    try:
        for batch in loader:
            batch = {k: v.to(param.device) for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(param.dtype)
            out = inner(**batch, use_cache=False)
            st = out.atp_stats
            labels = batch["labels"][:, 1:]
            answer = labels != IGNORE_INDEX
            hit = (out.logits[:, :-1].argmax(-1) == labels) & answer
            has_answer = answer.any(1)
            samples += int(has_answer.sum())
            correct += int(((hit | ~answer).all(1) & has_answer).sum())
            n_tok = int(answer.sum())
            tok_total += n_tok
            tok_correct += int(hit.sum())
            if n_tok:
                loss_sum += float(st["loss_ntp"]) * n_tok
            has_image = st["images_per_sample"] > 0
            images += int(st["images_per_sample"].sum())
            codes = st.get("keep_codes")
            if codes:  # hard masks: the count of every image
                tokens.append(torch.stack([(c != 0).sum(-1) for c in codes], 1).double().cpu())
            else:  # per sample (the mean over its images)
                tokens.append(st.get("tokens_hard", st["tokens"])[has_image].double().cpu())
            n_bars.append(st["n_bar"][has_image].double().cpu())
            for key in thetas:
                if st.get(key) is not None:
                    thetas[key].append(st[key][has_image].double().cpu())
            flops[0] += float(st["flops"].sum())
            flops[1] += float(st["flops_full"].sum())
            kv[0] += float(st["kv_cache_bytes"].sum())
            kv[1] += float(st["kv_cache_bytes_full"].sum())
            hard, pruned = bool(st["hard"]), bool(st["pruned"])
    finally:
        inner.train(was_training)
    if not n_bars:
        raise ValueError("evaluate: the loader yielded no batch")
    layers = tuple(cfg.layers)
    rec: Dict[str, Any] = {"split": "eval", "samples": samples, "correct": correct,
                           "accuracy": correct / samples if samples else 0.0,
                           "token_accuracy": tok_correct / tok_total if tok_total else 0.0,
                           "loss": loss_sum / tok_total if tok_total else 0.0, "images": images}
    spread: Dict[str, Any] = {}
    _spread(torch.cat(n_bars), "n_bar", spread)
    rec["n_bar"] = spread.pop("n_bar_mean")
    rec.update(spread)
    rec["target_tokens"] = float(cfg.target_tokens)
    rec["n_bar_minus_target"] = rec["n_bar"] - rec["target_tokens"]
    per_layer = torch.cat(tokens)
    for k, layer in enumerate(layers):
        _spread(per_layer[:, k], f"tokens_l{layer}", rec)
    for key, parts in thetas.items():
        if parts:
            values = torch.cat(parts)
            for k, layer in enumerate(layers):
                _spread(values[:, k], f"{key}_l{layer}", rec, std=False)
    rec["flops_ratio"] = flops[0] / flops[1] if flops[1] else 1.0
    rec["kv_ratio"] = kv[0] / kv[1] if kv[1] else 1.0
    rec["hard"], rec["pruned"] = hard, pruned
    return rec


def format_eval(rec: Dict[str, Any]) -> str:
    """A readable summary of an ``evaluate`` record."""
    head = [f"eval{'' if 'step' not in rec else ' @ step ' + str(rec['step'])}:",
            f"accuracy {rec['accuracy']:.4f} ({rec['correct']}/{rec['samples']}),",
            f"token accuracy {rec['token_accuracy']:.4f}, loss {rec['loss']:.4f},",
            f"N_bar {rec['n_bar']:.1f} (target {rec['target_tokens']:g}),",
            f"FLOPs x{rec['flops_ratio']:.3f}, KV x{rec['kv_ratio']:.3f}"]
    lines = [" ".join(head)]
    layers = sorted(int(k[len("tokens_l"):-len("_mean")]) for k in rec
                    if k.startswith("tokens_l") and k.endswith("_mean"))
    for layer in layers:
        t = f"tokens_l{layer}"
        line = (f"  layer {layer}: tokens {rec[t + '_mean']:.1f} +- {rec[t + '_std']:.1f} "
                f"[{rec[t + '_min']:.0f}, {rec[t + '_max']:.0f}]")
        for key in ("theta_r", "theta_s"):
            name = f"{key}_l{layer}"
            if name + "_mean" in rec:
                line += (f", {key} {rec[name + '_mean']:.3f} "
                         f"[{rec[name + '_min']:.3f}, {rec[name + '_max']:.3f}]")
        lines.append(line)
    return "\n".join(lines)


def save_model(model: nn.Module, directory: Union[str, os.PathLike], tokenizer=None) -> None:
    """Write an ATP model as a user reloads it: ``directory`` gets the stock LLaVA
    (``save_pretrained`` of every weight but ``atp.*``; the config holds no trace of ATP, as
    transformers does not serialise the attention implementation), ``directory/atp.safetensors``
    (``save_atp``) and ``tokenizer`` if given. Then::

        load_atp(LlavaForConditionalGeneration.from_pretrained(directory), f"{directory}/atp.safetensors")

    is the same model. ``model`` itself is not changed.
    """
    inner = _unwrap(model)
    get_atp_controller(inner)
    writer = is_rank0()
    if _is_sharded(inner):  # FSDP2: whole tensors, a collective (every rank calls save_model)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(inner, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = inner.state_dict() if writer else {}
    if writer:
        os.makedirs(directory, exist_ok=True)
        inner.save_pretrained(directory, state_dict={k: v for k, v in state.items() if not k.startswith("atp.")})
    save_atp(inner, os.path.join(directory, ATP_FILE))
    if tokenizer is not None and writer:
        tokenizer.save_pretrained(directory)


def _is_sharded(model: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _lrs(opt: torch.optim.Optimizer) -> Dict[str, float]:
    return {g.get("name", str(i)): g["lr"] for i, g in enumerate(opt.param_groups)}  # param_groups() names them


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


class _Log:
    """The log rows of a run: kept, and written as JSON lines / CSV (rank 0's files)."""

    def __init__(self, json_f, csv_f):
        self.rows: List[Dict[str, Any]] = []
        self.json_f, self.csv_f, self.csv_w = json_f, csv_f, None
        self.progress = None

    def step(self, rec: Dict[str, Any]) -> None:
        self._json(rec)
        if self.csv_f:
            if self.csv_w is None:
                self.csv_w = csv.DictWriter(self.csv_f, fieldnames=list(rec))
                self.csv_w.writeheader()
            self.csv_w.writerow(rec)
            self.csv_f.flush()

    def eval(self, rec: Dict[str, Any]) -> None:
        self._json(rec)
        (self.progress.write if self.progress is not None else print)(format_eval(rec))

    def _json(self, rec: Dict[str, Any]) -> None:
        self.rows.append(rec)
        if self.json_f:
            self.json_f.write(json.dumps(rec) + "\n")
            self.json_f.flush()

    def close(self) -> None:
        for f in (self.json_f, self.csv_f):
            if f:
                f.close()
        if self.progress is not None:
            self.progress.close()


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

    from .trainer import ATPTrainer

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
