"""End-to-end benchmark of ATP inference: unpruned vs ATP vs FastV at matched tokens.

For one model shape and batch size, in one process on the same prompts, it measures for

  unpruned   the stock model (SDPA attention), every vision token in every layer
  atp        ATP-LLaVA with real pruning at the ATP layers; its thresholds (theta_r = theta_s =
             t, theta_override) are set by bisection so that the average vision tokens per layer
             (N_bar, the paper's "Token" column) reach --target (random weights have no
             trained thresholds; the pruning machinery, scores, masks and gathers run as in a
             trained model)
  fastv      FastV pruning before decoder layer --fastv-layer by the last token's attention,
             keeping as many tokens as gives ATP's measured N_bar (ATPConfig.matched_fastv_keep)

  prefill_ms    one forward over the prompts that fills the KV cache (median of --reps)
  decode_tok_s  greedy decoding of --new-tokens tokens against that cache, tokens per second
                over the batch (median of --reps)
  peak_mib      memory of prefill + decode beyond the model and inputs (CUDA: allocator peak;
                CPU: peak RSS, as kernel_bench.py measures it)
  kv_mib        bytes the KV cache tensors really hold after the prefill (padded ragged batch),
                and kv_logical_mib the entries of real tokens (the report's KV bytes)
  ratios        atp / unpruned and atp / fastv of prefill time, and of KV bytes

The three variants are timed interleaved: every rep runs one prefill + decode of each variant,
in an order that rotates from rep to rep, after --warmup such reps that are not kept. A ratio of
times (prefill_vs_fastv, prefill_vs_unpruned, decode_vs_unpruned) is the median over the reps of
the ratio within each rep, with its interquartile range (*_iqr): a slow spell of a shared machine
slows every variant of a rep alike, so the paired ratio is comparable across runs where the
times themselves are not.

Presets:
  tiny      the tiny random LLaVA of the tests, bigger decoder (8 layers, d 256), CPU-sized
  llava7b   LLaVA-1.5-7B-shaped random weights: 32 layers, d 4096, m 11008, 32 heads, vocab
            32064, 576 image tokens per image; a one-layer CLIP vision tower with the real
            24 x 24 patch grid (the vision tower costs the same in every variant and is not
            what is measured); bf16 on CUDA
  qwen_tiny, qwen2_5_vl7b
            Qwen2.5-VL: the tiny decoder above with M-RoPE, and Qwen2.5-VL-7B's shapes (28 layers,
            d 3584, m 18944, 28 heads, 4 KV heads, vocab 152064); one 672 px image (grid
            1 x 48 x 48 patches, 576 tokens after the 2 x 2 merge); a one-layer vision tower
  onevision7b
            LLaVA-OneVision-7B's shapes (its Qwen2-7B decoder as above, SigLIP 384 px tiles of
            27 x 27 tokens, the default anyres pinpoints): one 384 x 768 image, a base tile and a
            27 x 54 canvas with a newline per row (2187 vision tokens, 27 newlines)
  --num-layers overrides the decoder depth (a CPU smoke run of the 7B shapes).
  --flash-decode decodes on flash-attn in every variant (needs flash-attn 2.6+ and a GPU): the
  unpruned model with transformers' "flash_attention_2", ATP and FastV with
  ATPConfig.flash_decode=True. By default every variant decodes without it.

Usage:
    python bench/e2e_bench.py --preset tiny                           # CPU, JSON to bench/results/
    python bench/e2e_bench.py --preset llava7b --batch 1 8            # GPU, the issue's targets
    python bench/e2e_bench.py --preset llava7b --num-layers 2 --batch 1 --reps 1 --no-json
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
from functools import partial
from typing import Any, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))

from kernel_bench import HOST_ALLOCATOR, device_name, peak_extra_mib  # noqa: E402

import atp_ops  # noqa: E402
from atp_llava import ATPConfig, VisionLayout, apply_atp  # noqa: E402
from atp_llava.core.layout import valid_mask  # noqa: E402
from atp_llava.models import adapter_for  # noqa: E402
from atp_llava.tools.tiny import family_batch  # noqa: E402

# image: the batch's one image per prompt, as atp_llava.tools.tiny.family_batch takes it
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(family="llava", hidden=256, ffn=688, layers=8, heads=8, kv_heads=8, vocab=128,
                 atp_layers=(2, 4, 6), fastv_layer=2, text=(35, 64), tile=48, patch=2, image=None, dtype="float32"),
    "llava7b": dict(family="llava", hidden=4096, ffn=11008, layers=32, heads=32, kv_heads=32, vocab=32064,
                    atp_layers=(4, 14, 24), fastv_layer=2, text=(35, 64), tile=336, patch=14, image=None,
                    dtype="bfloat16"),
    # 1 x 48 x 48 patches: a 672 px image at patch 14, 24 x 24 = 576 tokens after the 2 x 2 merge
    "qwen_tiny": dict(family="qwen2_5_vl", hidden=256, ffn=688, layers=8, heads=8, kv_heads=2, vocab=160,
                      atp_layers=(2, 4, 6), fastv_layer=2, text=(35, 64), patch=2, image=(1, 48, 48),
                      mrope=(4, 6, 6), dtype="float32"),
    "qwen2_5_vl7b": dict(family="qwen2_5_vl", hidden=3584, ffn=18944, layers=28, heads=28, kv_heads=4, vocab=152064,
                         atp_layers=(4, 12, 21), fastv_layer=2, text=(35, 64), patch=14, image=(1, 48, 48),
                         mrope=(16, 24, 24), dtype="bfloat16"),
    # a 384 x 768 image: base tile 27 x 27, canvas 27 x 54 with 27 newlines (2214 tokens)
    "onevision7b": dict(family="llava_onevision", hidden=3584, ffn=18944, layers=28, heads=28, kv_heads=4,
                        vocab=152064, atp_layers=(4, 12, 21), fastv_layer=2, text=(35, 64), tile=384, patch=14,
                        image=(384, 768), dtype="bfloat16"),
}


def _text(preset: Dict[str, Any], num_layers: int, **extra) -> Dict[str, Any]:
    return dict(hidden_size=preset["hidden"], intermediate_size=preset["ffn"], num_hidden_layers=num_layers,
                num_attention_heads=preset["heads"], num_key_value_heads=preset["kv_heads"],
                vocab_size=preset["vocab"], max_position_embeddings=8192, pad_token_id=0, bos_token_id=1,
                eos_token_id=2, tie_word_embeddings=False, **extra)


def _config(preset: Dict[str, Any], num_layers: int):
    """(model class, config) of the preset: its family, its decoder, a one-layer vision tower."""
    import transformers as tf

    family, v = preset["family"], preset["vocab"]
    tower = dict(image_size=preset.get("tile"), patch_size=preset["patch"], hidden_size=64, intermediate_size=128,
                 num_hidden_layers=1, num_attention_heads=2)
    if family == "llava":
        return tf.LlavaForConditionalGeneration, tf.LlavaConfig(
            vision_config=tf.CLIPVisionConfig(projection_dim=64, **tower), text_config=tf.LlamaConfig(**_text(preset, num_layers)),
            image_token_id=v - 1, vision_feature_layer=-1, vision_feature_select_strategy="default")
    if family == "llava_onevision":
        return tf.LlavaOnevisionForConditionalGeneration, tf.LlavaOnevisionConfig(
            vision_config=tf.SiglipVisionConfig(**tower), text_config=tf.Qwen2Config(**_text(preset, num_layers)),
            image_token_id=v - 1, video_token_id=v - 2, vision_feature_layer=-1, tie_word_embeddings=False)
    vision = dict(depth=1, embed_dim=64, hidden_size=64, out_hidden_size=preset["hidden"], intermediate_size=128,
                  num_heads=2, patch_size=preset["patch"], spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    rope = {"rope_type": "default", "mrope_section": list(preset["mrope"]), "rope_theta": 1e6}
    return tf.Qwen2_5_VLForConditionalGeneration, tf.Qwen2_5_VLConfig(
        vision_config=vision, text_config=_text(preset, num_layers, rope_parameters=rope), image_token_id=v - 1,
        video_token_id=v - 2, vision_start_token_id=v - 3, vision_end_token_id=v - 4, tie_word_embeddings=False)


def build_model(preset: Dict[str, Any], num_layers: int, device: torch.device, dtype: torch.dtype):
    """A random model of the preset's family and shape (SDPA attention): a one-layer vision tower
    (it costs the same in every variant and is not what is measured) and the full decoder."""
    cls, config = _config(preset, num_layers)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(default)
    model.set_attn_implementation("sdpa")
    return model.eval()


def prompts(model, batch: int, preset: Dict[str, Any], seed: int = 0) -> Dict[str, torch.Tensor]:
    """``batch`` prompts: text[0] system tokens, the preset's image as the model's processor lays
    it out, text[1] instruction tokens; no padding."""
    inputs = family_batch(model, [[preset["image"]]] * batch, seed=seed, text=preset["text"], answer=0)
    inputs.pop("labels")
    inputs.pop("attention_mask")
    param = next(model.parameters())
    return {k: v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device)
            for k, v in inputs.items()}


def image_tokens(model, inputs) -> float:
    """Vision tokens per image of ``inputs`` (structural ones, e.g. newlines, excluded): the
    N_bar of the unpruned model."""
    adapter = adapter_for(model, ATPConfig())
    layout = VisionLayout.from_tokens(adapter.image_tokens(inputs, valid_mask(inputs["input_ids"], None)),
                                      inputs["input_ids"])
    return float(layout.tokens_per_image.mean())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill(model, inputs):
    return model(**inputs, use_cache=True, logits_to_keep=1)


def decode(model, inputs, out, new_tokens: int):
    """Greedy decoding of ``new_tokens`` tokens against the cache of ``out``; the top 4 ids of
    the vocabulary (the presets' image and vision placeholder tokens) are never chosen."""
    cache = out.cache
    nxt = out.logits[:, -1, :-4].argmax(-1, keepdim=True)
    for _ in range(new_tokens):
        out = model(input_ids=nxt, cache=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1, :-4].argmax(-1, keepdim=True)
    return nxt


def quartiles(values: List[float]) -> Tuple[float, float, float]:
    """(first quartile, median, third quartile) of ``values`` (linear interpolation)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def paired_ratio(num: List[float], den: List[float]) -> Dict[str, Any]:
    """The ratio num[i] / den[i] of each rep i (two variants timed in the same rep): its median,
    interquartile range and every value."""
    if len(num) != len(den) or not num:
        raise ValueError(f"paired_ratio: {len(num)} and {len(den)} reps; need the same number, at least one")
    ratios = [a / b for a, b in zip(num, den)]
    q1, med, q3 = quartiles(ratios)
    return {"median": med, "iqr": [q1, q3], "all": ratios}


def interleaved(arms: Dict[str, Any], reps: int, warmup: int = 0) -> Dict[str, Dict[str, List[float]]]:
    """Run every arm once per rep, ``warmup`` reps untimed and then ``reps`` kept, the arms in an
    order that rotates by one from rep to rep (each arm runs first, second, ... equally often).
    ``arms``: name -> a callable returning a dict of timings (ms); returns
    name -> timing -> one value per kept rep, rep i of every arm from the same round."""
    names = list(arms)
    out: Dict[str, Dict[str, List[float]]] = {name: {} for name in names}
    for rep in range(warmup + reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            times = arms[name]()
            if rep >= warmup:
                for key, value in times.items():
                    out[name].setdefault(key, []).append(value)
    return out


def run_once(model, inputs, new_tokens: int, device: torch.device) -> Dict[str, float]:
    """Milliseconds of one prefill and of ``new_tokens`` greedy decoding steps against its cache."""
    with torch.no_grad():
        sync(device)
        t0 = time.perf_counter()
        out = prefill(model, inputs)
        sync(device)
        t1 = time.perf_counter()
        decode(model, inputs, out, new_tokens)
        sync(device)
        t2 = time.perf_counter()
    return {"prefill_ms": (t1 - t0) * 1e3, "decode_ms": (t2 - t1) * 1e3}


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def measure(name: str, model, inputs, args, device) -> Dict[str, Any]:
    """What is measured of one variant alone: its peak memory, KV bytes and efficiency report
    (times: ``interleaved``)."""
    with torch.no_grad():
        out = prefill(model, inputs)  # warm-up
        decode(model, inputs, out, min(2, args.new_tokens))
        del out
        gc.collect()
        with HOST_ALLOCATOR.returning_to_os():
            peak = peak_extra_mib(lambda: decode(model, inputs, prefill(model, inputs), args.new_tokens), device)
        out = prefill(model, inputs)
        kv = cache_bytes(out.cache)
        report = getattr(model, "atp_report", None)
        del out
    row = {"impl": name, "batch": inputs["input_ids"].shape[0], "peak_mib": peak, "kv_mib": kv / 2**20}
    if report is not None:
        row["n_bar"] = report.n_bar.mean().item()
        row["kv_logical_mib"] = report.kv_cache_bytes.sum().item() / 2**20
        row["flops_reduction"] = report.flops_reduction.mean().item()
    else:
        row["n_bar"] = float(args.image_tokens)
        row["kv_logical_mib"] = kv / 2**20
        row["flops_reduction"] = 0.0
    return row


def add_times(group: List[Dict[str, Any]], times: Dict[str, Dict[str, List[float]]], new_tokens: int) -> None:
    """Each row's median times and tokens per second, and its paired ratios to the unpruned
    model and to FastV (``paired_ratio``)."""
    for r in group:
        t = times[r["impl"]]
        r["prefill_ms"], r["prefill_ms_all"] = statistics.median(t["prefill_ms"]), t["prefill_ms"]
        r["decode_ms"], r["decode_ms_all"] = statistics.median(t["decode_ms"]), t["decode_ms"]
        r["decode_tok_s"] = r["batch"] * new_tokens / (r["decode_ms"] / 1e3)
    unpruned, fastv = times["unpruned"], times["fastv"]
    for r in group:
        t = times[r["impl"]]
        for key, num, den in (("prefill_vs_unpruned", t["prefill_ms"], unpruned["prefill_ms"]),
                              ("prefill_vs_fastv", t["prefill_ms"], fastv["prefill_ms"]),
                              # tokens per second: the inverse ratio of decode times
                              ("decode_vs_unpruned", unpruned["decode_ms"], t["decode_ms"])):
            ratio = paired_ratio(num, den)
            r[key], r[key + "_iqr"], r[key + "_all"] = ratio["median"], ratio["iqr"], ratio["all"]
        r["kv_vs_unpruned"] = r["kv_logical_mib"] / next(g for g in group if g["impl"] == "unpruned")["kv_logical_mib"]


def calibrate(model, inputs, target: float, iters: int) -> float:
    """theta (theta_r = theta_s) at which ATP's average N_bar over the batch is closest to target."""
    lo, hi, best = -0.5, 1.5, None
    with torch.no_grad():
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            model.atp.config.theta_override = (mid, mid)
            model(**inputs, logits_to_keep=1)
            n_bar = model.atp_report.n_bar.mean().item()
            if best is None or abs(n_bar - target) < abs(best[1] - target):
                best = (mid, n_bar)
            lo, hi = (mid, hi) if n_bar > target else (lo, mid)
    model.atp.config.theta_override = (best[0], best[0])
    return best[0]


def main(argv: Optional[List[str]] = None) -> List[Dict[str, Any]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--num-layers", type=int, default=None, help="decoder layers (default: the preset's)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--target", type=float, default=144.0, help="ATP's average vision tokens per layer (N_bar)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=5, help="timed reps (each runs every variant once, interleaved)")
    p.add_argument("--warmup", type=int, default=2, help="untimed interleaved reps before the timed ones")
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--flash-decode", action="store_true", help="decode on flash-attn in every variant")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/e2e_<preset>_<device>_<date>.json)")
    p.add_argument("--no-json", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, preset["dtype"]) if device.type == "cuda" else torch.float32
    num_layers = args.num_layers or preset["layers"]
    atp_layers = tuple(l for l in preset["atp_layers"] if l < num_layers) or (1,)
    fastv_layer = min(preset["fastv_layer"], num_layers - 1)
    HOST_ALLOCATOR.steady()

    stock = build_model(preset, num_layers, device, dtype)
    if args.flash_decode:
        stock.set_attn_implementation("flash_attention_2")
    head = {"device": device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "atp_ops": atp_ops.__version__, "atp_cuda_kernels": atp_ops.has_cuda_kernels("attention_fwd"),
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": sys.argv, "preset": args.preset, "num_layers": num_layers, "dtype": str(dtype),
            "atp_layers": atp_layers, "fastv_layer": fastv_layer, "target": args.target,
            "new_tokens": args.new_tokens, "reps": args.reps,
            "warmup": args.warmup, "timing": "interleaved", "flash_decode": args.flash_decode}
    print(f"device {head['device']}; torch {head['torch']}, CUDA {head['cuda']}, atp_ops {head['atp_ops']} "
          f"(CUDA kernels: {head['atp_cuda_kernels']}); {head['date_utc']}")
    print(f"command: {' '.join(sys.argv)}")
    print(f"preset {args.preset}: {num_layers} layers, d {preset['hidden']}, m {preset['ffn']}, {dtype}; "
          f"ATP layers {atp_layers}, FastV before layer {fastv_layer}, target N_bar {args.target}")
    rows: List[Dict[str, Any]] = []
    for batch in args.batch:
        inputs = prompts(stock, batch, preset)
        args.image_tokens = image_tokens(stock, inputs)
        atp = apply_atp(copy.deepcopy(stock), ATPConfig(layers=atp_layers, theta_override=(0.5, 0.5),
                                                        flash_decode=args.flash_decode)).eval()
        theta = calibrate(atp, inputs, args.target, iters=12)
        found = measure("atp", atp, inputs, args, device)
        keep = ATPConfig.matched_fastv_keep(found["n_bar"], fastv_layer, num_layers, round(args.image_tokens))
        fastv = apply_atp(copy.deepcopy(stock), ATPConfig(layers=(fastv_layer,), mode="fastv", fixed_keep=(keep,),
                                                          flash_decode=args.flash_decode)).eval()
        group = [measure("unpruned", stock, inputs, args, device), found, measure("fastv", fastv, inputs, args, device)]
        found["theta"] = theta
        group[2]["fastv_keep"] = keep
        models = {"unpruned": stock, "atp": atp, "fastv": fastv}
        times = interleaved({name: partial(run_once, m, inputs, args.new_tokens, device) for name, m in models.items()},
                            args.reps, args.warmup)
        add_times(group, times, args.new_tokens)
        atp_row = group[1]
        lo, hi = atp_row["prefill_vs_fastv_iqr"]
        print(f"B={batch}: ATP / FastV prefill {atp_row['prefill_vs_fastv']:.3f} (IQR {lo:.3f}-{hi:.3f}), "
              f"ATP / unpruned {atp_row['prefill_vs_unpruned']:.3f}; median of {args.reps} interleaved reps")
        rows += group
        del atp, fastv
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"{'impl':>9} {'B':>3} {'N_bar':>7} {'prefill ms':>11} {'x unpr':>7} {'x fastv':>8} {'decode tok/s':>13} "
          f"{'x unpr':>7} {'KV MiB':>9} {'KV real':>9} {'x unpr':>7} {'peak MiB':>9}")
    for r in rows:
        peak = "n/a" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        print(f"{r['impl']:>9} {r['batch']:>3} {r['n_bar']:>7.1f} {r['prefill_ms']:>11.2f} "
              f"{r['prefill_vs_unpruned']:>7.3f} {r['prefill_vs_fastv']:>8.3f} {r['decode_tok_s']:>13.1f} "
              f"{r['decode_vs_unpruned']:>7.3f} {r['kv_mib']:>9.2f} {r['kv_logical_mib']:>9.2f} "
              f"{r['kv_vs_unpruned']:>7.3f} {peak:>9}")
    if not args.no_json:
        out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                       f"e2e_{args.preset}_{device.type}_{head['date_utc'].replace(':', '')[:17]}Z.json")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(out, "w") as f:
            json.dump({"header": head, "results": rows}, f, indent=1)
        print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
