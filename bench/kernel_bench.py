"""Microbenchmark of atp_attention against what a user would run without it.

On identical inputs in one process, for each shape and mode (forward; forward + backward with
gradients for q, k, v and key_bias), it times side by side:

  atp                atp_ops.atp_attention(q, k, v, key_bias, causal=True)
  eager              atp_ops.reference.attention_ref(...): materialised, computes in fp32
  sdpa_mask          F.scaled_dot_product_attention with key_bias and the causal -inf mask folded
                     into one float attn_mask (B, 1, Lq, Lk), rebuilt from key_bias every call
                     (so the gradient reaches key_bias)
  flex               CUDA only: torch.compile(flex_attention), score_mod adds key_bias[b, kv_idx],
                     causal block_mask
  sdpa_flash_nobias  CUDA only: SDPA flash backend, causal, no bias; the speed-of-light reference

An implementation that cannot run (no CUDA kernel in this build, backend missing for the dtype,
out of memory) is reported as "n/a: reason" and the others still run.

Usage:
    python bench/kernel_bench.py                       # default shapes, JSON to bench/results/
    python bench/kernel_bench.py --quick --no-json     # smoke test: one small shape, few reps
    python bench/kernel_bench.py --seqlens 675 --modes fwd --impls atp,sdpa_mask --check
    python bench/kernel_bench.py --device cpu --batch 2 --heads 32 --kv-heads 8 --dtype bf16
    python bench/kernel_bench.py --threads 1    # CPU: on a loaded machine, 1 thread avoids
                                                # OpenMP barrier stalls that distort timings

Defaults are LLaVA-1.5-7B attention: Hq = Hkv = 32, D = 128, causal, Lq = Lk = L with
L = 675 (35 system + 576 image + 64 text tokens) and L = 2880 (anyres-like), batch 8, bf16 on
CUDA. On CPU the dtype is fp32 and batch and heads scale down to 1 and 8 (printed in the
header) so that the full default run takes a few minutes on 2 cores; --batch/--heads override.

Measurement:
  * time: CUDA: triton.testing.do_bench, median (torch.utils.benchmark if triton is missing);
    CPU: torch.utils.benchmark.Timer.adaptive_autorange, median. Warm-up calls come first.
  * modes: fwd; fwdbwd; decode (the last query row alone against all L keys, Lq = 1, as in
    generation against a cache); scores (atp_scores after a forward: s_self, and s_cross over
    the 64 text rows; its peer "eager" materialises the attention map in the input dtype and
    reduces its columns, as FastV-style code does; the table also gives scores / fwd of atp).
  * FLOPs as FlashAttention counts them: fwd = 4 B Hq Lq Lk D, halved for causal;
    fwd+bwd = 3.5 x fwd; decode 4 B Hq L D; scores 4 B Hq L D (text rows + 1). Reported as TFLOP/s (GFLOP/s in the CPU table; JSON is always tflops).
  * peak memory of one call beyond the inputs: CUDA: max_memory_allocated minus what was
    allocated before the call; CPU: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus
    the RSS before the call. For the CPU figure to mean anything, freed buffers must go back to
    the OS, so all memory measurements run first, with glibc told (mallopt) to mmap every
    buffer above 64 KiB and unmap it on free; the timings follow with glibc's steady state
    (freed buffers reused), as in a long-running process. Mmapping every buffer during timing
    would add page faults to each call (measured: up to ~1.5x on eager and sdpa_mask fwd+bwd at
    L = 675, less on atp) and skew the comparison.
  * speedup of atp over a peer = peer_ms / atp_ms (> 1: atp is faster).
  * --check compares atp with eager (output and, with fwdbwd, all four gradients) on the first
    two samples of each shape before timing, and aborts if they disagree.

Inputs are fresh random tensors; key_bias is 0 on the system and text tokens and a soft log-mask
log(u), u ~ U(0.05, 1), on the image tokens, with ~10% of image tokens pruned to -inf.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import atp_ops
from atp_ops.reference import attention_ref, scores_ref

RESULTS_DIR = Path(__file__).resolve().parent / "results"
SEED = 0

# LLaVA-1.5 prompt layout: system prompt, image tokens, text; only image tokens get a soft mask.
SYSTEM_TOKENS, TEXT_TOKENS = 35, 64
PRUNED_FRACTION = 0.10

FULL = {"batch": 8, "heads": 32, "seqlens": [675, 2880]}  # LLaVA-1.5-7B, the CUDA default
CPU_DEFAULT = {"batch": 1, "heads": 8, "seqlens": [675, 2880]}
QUICK = {"cpu": {"batch": 1, "heads": 4, "seqlens": [256]},
         "cuda": {"batch": 2, "heads": 8, "seqlens": [512]}}
HEAD_DIM = 128

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
MODES = ("fwd", "fwdbwd", "decode", "scores")
BWD_FLOP_FACTOR = 3.5  # fwd 1x + bwd 2.5x, as FlashAttention counts

# Timing budgets in seconds (CPU: adaptive_autorange min/max run time) or ms (CUDA: do_bench).
CPU_TIME = {"normal": (0.5, 5.0), "quick": (0.05, 0.5)}
CUDA_TIME_MS = {"normal": (25, 200), "quick": (10, 50)}

# --check: max |atp - eager| / max |eager| allowed, per input dtype.
CHECK_TOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 3e-2}


# Environment variables that change CPU/GPU timings, recorded in the header when set.
ENV_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
            "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


class Unavailable(Exception):
    """This implementation cannot run on this device / build / dtype; reported as n/a."""


# ----------------------------------------------------------------------------------------------
# Shapes and inputs


@dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    seqlen: int
    head_dim: int
    dtype: torch.dtype

    @property
    def gqa(self) -> bool:
        return self.heads != self.kv_heads

    def flops(self, mode: str) -> float:
        bhd = self.batch * self.heads * self.head_dim
        if mode == "decode":  # one query row against every key
            return 4 * bhd * self.seqlen
        if mode == "scores":  # s_cross: the text rows' logits and weighted sum; s_self: one row
            return 4 * bhd * self.seqlen * (text_rows(self.seqlen).stop - text_rows(self.seqlen).start + 1)
        fwd = 4 * bhd * self.seqlen * self.seqlen / 2  # causal
        return fwd * (BWD_FLOP_FACTOR if mode == "fwdbwd" else 1.0)

    def label(self) -> str:
        dtype = next(k for k, v in DTYPES.items() if v == self.dtype)
        return (f"B{self.batch} H{self.heads}/{self.kv_heads} L{self.seqlen} "
                f"D{self.head_dim} {dtype}")

    def as_json(self) -> dict:
        return {"batch": self.batch, "heads": self.heads, "kv_heads": self.kv_heads,
                "seqlen_q": self.seqlen, "seqlen_k": self.seqlen, "head_dim": self.head_dim,
                "dtype": str(self.dtype).replace("torch.", ""), "causal": True}


@dataclass
class Inputs:
    q: torch.Tensor         # (B, Hq, L, D)
    k: torch.Tensor         # (B, Hkv, L, D)
    v: torch.Tensor         # (B, Hkv, L, D)
    key_bias: torch.Tensor  # (B, L) float32 (float64 with fp64 inputs)
    grad_out: torch.Tensor  # (B, Hq, L, D), the upstream gradient of fwd+bwd

    def tensors(self) -> List[torch.Tensor]:
        return [self.q, self.k, self.v, self.key_bias]

    def first(self, n: int) -> "Inputs":
        return Inputs(*(t[:n] for t in (*self.tensors(), self.grad_out)))


def image_span(seqlen: int) -> slice:
    """Where the image tokens sit: after the system prompt and before the text (LLaVA layout)."""
    if seqlen > SYSTEM_TOKENS + TEXT_TOKENS:
        return slice(SYSTEM_TOKENS, seqlen - TEXT_TOKENS)
    return slice(seqlen // 4, seqlen - seqlen // 4)


def text_rows(seqlen: int) -> slice:
    """The instruction rows after the image: the rows of S_cross (Eq. 4)."""
    return slice(image_span(seqlen).stop, seqlen)


def score_weights(key_bias: torch.Tensor):
    """(w_self, w_cross) of the LLaVA layout: image rows weighted by their soft mask, text rows 1."""
    span, text = image_span(key_bias.shape[1]), text_rows(key_bias.shape[1])
    w_self = torch.zeros_like(key_bias, dtype=torch.float32)
    w_self[:, span] = key_bias[:, span].float().exp()
    w_cross = torch.zeros_like(w_self)
    w_cross[:, text] = 1.0
    return w_self, w_cross


def make_key_bias(batch: int, seqlen: int, dtype: torch.dtype, device, gen) -> torch.Tensor:
    """(B, L): 0 outside the image, log(U(0.05, 1)) on it, ~10% of image tokens at -inf."""
    span = image_span(seqlen)
    n_image = span.stop - span.start
    soft = torch.empty(batch, n_image, dtype=dtype, device=device).uniform_(0.05, 1.0, generator=gen)
    image_bias = soft.log()
    pruned = torch.rand(batch, n_image, device=device, generator=gen) < PRUNED_FRACTION
    image_bias[pruned] = float("-inf")
    key_bias = torch.zeros(batch, seqlen, dtype=dtype, device=device)
    key_bias[:, span] = image_bias
    return key_bias


def make_inputs(shape: Shape, device: torch.device) -> Inputs:
    gen = torch.Generator(device=device).manual_seed(SEED + shape.seqlen)
    b, hq, hkv, l, d = shape.batch, shape.heads, shape.kv_heads, shape.seqlen, shape.head_dim

    def randn(*size):
        return torch.randn(*size, generator=gen, device=device, dtype=shape.dtype)

    bias_dtype = torch.float64 if shape.dtype == torch.float64 else torch.float32
    return Inputs(q=randn(b, hq, l, d), k=randn(b, hkv, l, d), v=randn(b, hkv, l, d),
                  key_bias=make_key_bias(b, l, bias_dtype, device, gen), grad_out=randn(b, hq, l, d))


# ----------------------------------------------------------------------------------------------
# Implementations: name -> builder(shape, device, mode) -> attention(q, k, v, key_bias) -> out

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _require_cuda(device: torch.device) -> None:
    if device.type != "cuda":
        raise Unavailable("CUDA only")


def _attention_modes(mode: str) -> None:
    if mode == "scores":
        raise Unavailable("computes attention, not the ATP scores")


def _lse_once(q, k, v, key_bias, memo: dict) -> torch.Tensor:
    """The forward's lse for the scores step, computed on the first (warm-up) call only."""
    if memo.get("q") is not q:
        with torch.no_grad():
            memo["q"], memo["lse"] = q, atp_ops.atp_attention(q, k, v, key_bias, causal=True, return_lse=True)[1]
            memo["w"] = score_weights(key_bias)
    return memo["lse"]


def build_atp(shape: Shape, device: torch.device, mode: str) -> Attention:
    if device.type == "cuda":
        needed = {"fwd": ["attention_fwd"], "fwdbwd": ["attention_fwd", "attention_bwd"], "decode": ["attention_fwd"],
                  "scores": ["attention_fwd", "scores"]}[mode]
        if not all(atp_ops.has_cuda_kernels(op) for op in needed):
            raise Unavailable("no CUDA kernel in this build")
    if mode == "scores":
        memo: dict = {}

        def scores(q, k, v, key_bias):
            lse = _lse_once(q, k, v, key_bias, memo)
            return atp_ops.atp_scores(q, k, lse, key_bias, *memo["w"], causal=True)

        return scores
    return lambda q, k, v, key_bias: atp_ops.atp_attention(q, k, v, key_bias, causal=True)


def build_eager(shape: Shape, device: torch.device, mode: str) -> Attention:
    if mode == "scores":
        # What FastV-style code does: materialise the attention map (as output_attentions
        # returns it, in the input dtype) and reduce its columns.
        memo: dict = {}

        def scores(q, k, v, key_bias):
            if memo.get("q") is not q:
                memo["q"], memo["w"] = q, score_weights(key_bias)
            w_self, w_cross = memo["w"]
            kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            logits = (q @ kr.transpose(-1, -2)) * q.shape[-1] ** -0.5
            causal = causal_bias(q.shape[2], q.device).to(q.dtype)
            p = torch.softmax(logits + key_bias[:, None, None, :].to(q.dtype) + causal, dim=-1)
            s_self = torch.einsum("bm,bhmn->bn", w_self.to(q.dtype), logits) / (w_self.sum(1, keepdim=True) * q.shape[1])
            s_cross = torch.einsum("bm,bhmn->bn", w_cross.to(q.dtype), p) / (w_cross.sum(1, keepdim=True) * q.shape[1])
            return s_self, s_cross

        return scores
    return lambda q, k, v, key_bias: attention_ref(q, k, v, key_bias, causal=True)


def causal_bias(seqlen: int, device: torch.device) -> torch.Tensor:
    """(L, L) float32: 0 where query i may see key j (j <= i), -inf elsewhere."""
    future = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device).triu(1)
    return torch.zeros(seqlen, seqlen, device=device).masked_fill(future, float("-inf"))


def build_sdpa_mask(shape: Shape, device: torch.device, mode: str) -> Attention:
    _attention_modes(mode)
    causal = causal_bias(shape.seqlen, device)[-1:] if mode == "decode" else causal_bias(shape.seqlen, device)

    def attention(q, k, v, key_bias):
        # What a user without atp_ops writes: one float mask per call, in q's dtype as SDPA needs.
        mask = (key_bias[:, None, None, :] + causal).to(q.dtype)  # (B, 1, Lq, Lk)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=shape.gqa)

    return attention


def build_flex(shape: Shape, device: torch.device, mode: str) -> Attention:
    _require_cuda(device)
    if mode not in ("fwd", "fwdbwd"):
        raise Unavailable("benchmarked on fwd and fwdbwd only")
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    # Each (shape, grad mode) is one more compiled entry of the same code: allow many shapes.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    block_mask = create_block_mask(lambda b, h, q_idx, kv_idx: kv_idx <= q_idx, B=None, H=None,
                                   Q_LEN=shape.seqlen, KV_LEN=shape.seqlen, device=device)

    @torch.compile(dynamic=False)
    def attention(q, k, v, key_bias):
        def add_key_bias(score, b, h, q_idx, kv_idx):
            return score + key_bias[b, kv_idx]

        return flex_attention(q, k, v, score_mod=add_key_bias, block_mask=block_mask,
                              enable_gqa=shape.gqa)

    return attention


def build_sdpa_flash_nobias(shape: Shape, device: torch.device, mode: str) -> Attention:
    _require_cuda(device)
    _attention_modes(mode)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def attention(q, k, v, key_bias):  # key_bias ignored on purpose: the no-bias speed of light
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            # decode: the last query sees every key (SDPA's is_causal is top-left aligned)
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=shape.gqa)

    return attention


IMPLS: Dict[str, Callable[[Shape, torch.device, str], Attention]] = {
    "atp": build_atp,
    "eager": build_eager,
    "sdpa_mask": build_sdpa_mask,
    "flex": build_flex,
    "sdpa_flash_nobias": build_sdpa_flash_nobias,
}
CUDA_ONLY = ("flex", "sdpa_flash_nobias")


def make_step(attention: Attention, inputs: Inputs, mode: str) -> Callable[[], object]:
    """The measured call: forward (decode: the last query row alone; scores: atp_scores or its
    peer) under no_grad, or forward + backward to all four inputs."""
    if mode != "fwdbwd":
        q, k, v, key_bias = inputs.tensors()
        if mode == "decode":
            q = q[:, :, -1:].contiguous()

        def step():
            with torch.no_grad():
                return attention(q, k, v, key_bias)
        return step

    leaves = [t.detach().requires_grad_() for t in inputs.tensors()]  # shares storage

    def step():
        out = attention(*leaves)
        # autograd.grad, not .backward(): nothing accumulates into .grad between calls.
        return torch.autograd.grad(out, leaves, inputs.grad_out, allow_unused=True)

    return step


# ----------------------------------------------------------------------------------------------
# Measurement


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def warm_up(step, device: torch.device, calls: int) -> None:
    for _ in range(calls):
        step()
    synchronize(device)


def time_step(step, device: torch.device, budget: str) -> dict:
    """Median time of one call in ms, with how it was measured."""
    if device.type == "cuda":
        warmup_ms, rep_ms = CUDA_TIME_MS[budget]
        try:
            from triton.testing import do_bench
        except ImportError:
            pass
        else:
            ms = do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")
            return {"ms": float(ms), "method": "triton.testing.do_bench median"}
        from torch.utils import benchmark
        m = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(
            min_run_time=rep_ms / 1e3)
        return {"ms": m.median * 1e3, "runs": len(m.times) * m.number_per_run,
                "method": "torch.utils.benchmark blocked_autorange median"}

    from torch.utils import benchmark
    min_s, max_s = CPU_TIME[budget]
    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    m = timer.adaptive_autorange(threshold=0.1, min_run_time=min_s, max_run_time=max_s)
    return {"ms": m.median * 1e3, "iqr_ms": m.iqr * 1e3, "runs": len(m.times) * m.number_per_run,
            "method": "torch.utils.benchmark adaptive_autorange median"}


class HostAllocator:
    """glibc malloc modes for the two CPU measurement passes (see the module docstring).

    returning_to_os(): every buffer above 64 KiB is mmapped and unmapped when freed, and free heap
    pages are released on entry, so the RSS high-water mark of one call is the memory it needed.
    This only holds while the heap has not grown (glibc reuses free heap chunks before it mmaps),
    which is why all memory measurements come before any timing.
    steady(): what glibc's adaptive thresholds converge to in a long-running process (mmap
    threshold 32 MiB, trim threshold 2x that): freed buffers are reused, no page faults per call.
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h

    def __init__(self):
        try:
            libc = ctypes.CDLL("libc.so.6")
            self._mallopt, self._malloc_trim = libc.mallopt, libc.malloc_trim
        except (OSError, AttributeError):  # not glibc
            self._mallopt = self._malloc_trim = None

    @property
    def available(self) -> bool:
        return self._mallopt is not None

    def steady(self) -> None:
        if self.available:
            self._mallopt(self.M_MMAP_THRESHOLD, 32 << 20)
            self._mallopt(self.M_TRIM_THRESHOLD, 64 << 20)

    @contextlib.contextmanager
    def returning_to_os(self):
        if self.available:
            self._mallopt(self.M_MMAP_THRESHOLD, 64 << 10)
            self._mallopt(self.M_TRIM_THRESHOLD, 128 << 10)
            self._malloc_trim(0)
        try:
            yield
        finally:
            self.steady()


HOST_ALLOCATOR = HostAllocator()


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_mib(step, device: torch.device) -> Optional[float]:
    """Memory one call needs beyond what exists before it (inputs excluded), in MiB."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if not HOST_ALLOCATOR.available:
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = _proc_status_kib("VmRSS")
        step()
        return (_proc_status_kib("VmHWM") - before) / 1024
    except (OSError, KeyError, ValueError):
        return None


@dataclass
class Result:
    shape: Shape
    mode: str
    impl: str
    ms: Optional[float] = None
    tflops: Optional[float] = None
    peak_mib: Optional[float] = None
    speedup_of_atp: Optional[float] = None  # this impl's ms / atp's ms
    timing: Optional[dict] = None
    error: Optional[str] = None

    def as_json(self) -> dict:
        d = asdict(self)
        d["shape"] = self.shape.as_json()
        d["flops"] = self.shape.flops(self.mode)
        d["status"] = "ok" if self.error is None else "n/a"
        return d


def _short_error(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else ""
    return f"{type(e).__name__}: {msg[:150]}" if not isinstance(e, Unavailable) else msg


class Runner:
    """Builds each (shape, mode, impl) once and measures it; failures become n/a results."""

    def __init__(self, device: torch.device, budget: str):
        self.device, self.budget = device, budget
        self._built: Dict[tuple, Attention] = {}  # flex compiles once, not once per pass

    def _step(self, r: Result, inputs: Inputs):
        key = (r.shape, r.mode, r.impl)
        if key not in self._built:
            self._built[key] = IMPLS[r.impl](r.shape, self.device, r.mode)
        step = make_step(self._built[key], inputs, r.mode)
        warm_up(step, self.device, calls=3 if self.device.type == "cuda" else 1)
        return step

    def measure(self, r: Result, inputs: Inputs, what: str) -> None:
        """what = "memory" (peak MiB of one call) or "time" (median ms, TFLOP/s)."""
        if r.error is not None:
            return
        try:
            step = self._step(r, inputs)
            if what == "memory":
                r.peak_mib = peak_extra_mib(step, self.device)
            else:
                r.timing = time_step(step, self.device, self.budget)
                r.ms = r.timing["ms"]
                r.tflops = r.shape.flops(r.mode) / (r.ms * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001 - a failing peer is reported, never fatal
            r.error = _short_error(e)
        finally:
            step = None  # noqa: F841 - frees the step's graph before the next cell
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def run_benchmarks(shapes: Sequence[Shape], modes: Sequence[str], impls: Sequence[str],
                   device: torch.device, budget: str, check: bool) -> List[Result]:
    """Two passes over all cells: memory (and --check) first, then time (HostAllocator says why).

    Inputs are regenerated per pass from a fixed seed, so every impl sees identical inputs.
    """
    results = [Result(shape, mode, impl) for shape in shapes for mode in modes for impl in impls]
    runner = Runner(device, budget)
    memory_mode = HOST_ALLOCATOR.returning_to_os() if device.type == "cpu" else contextlib.nullcontext()
    with memory_mode:
        for shape in shapes:
            inputs = make_inputs(shape, device)
            if check:
                check_against_eager(shape, inputs, device, modes)
            for r in (r for r in results if r.shape == shape):
                runner.measure(r, inputs, "memory")
                print(f"  {progress(r)}", flush=True)
    for shape in shapes:
        inputs = make_inputs(shape, device)
        for r in (r for r in results if r.shape == shape):
            runner.measure(r, inputs, "time")
            print(f"  {progress(r)}", flush=True)
    add_speedups(results)
    return results


def progress(r: Result) -> str:
    if r.error is not None:
        return f"{r.shape.label()}  {r.mode:<7} {r.impl:<18} n/a: {r.error}"
    mib = "-" if r.peak_mib is None else f"{r.peak_mib:.1f} MiB"
    ms = "" if r.ms is None else f"{r.ms:10.3f} ms"
    return f"{r.shape.label()}  {r.mode:<7} {r.impl:<18} peak {mib:>12} {ms}"


# ----------------------------------------------------------------------------------------------
# --check


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    finite = torch.isfinite(b)
    if not torch.equal(finite, torch.isfinite(a)):
        return float("inf")
    return ((a - b)[finite].abs().max() / b[finite].abs().max().clamp_min(1e-12)).item()


def check_against_eager(shape: Shape, inputs: Inputs, device: torch.device,
                        modes: Sequence[str]) -> None:
    """Abort unless atp matches eager (output, and gradients when fwdbwd is benchmarked)."""
    try:
        build_atp(shape, device, "fwdbwd" if "fwdbwd" in modes else "fwd")
    except Unavailable as e:
        print(f"check {shape.label()}: skipped, atp n/a ({e})")
        return
    sub = inputs.first(2)
    names = ["out"] + (["dq", "dk", "dv", "dkey_bias"] if "fwdbwd" in modes else [])
    got, want = [], []
    for fn, dest in ((atp_ops.atp_attention, got), (attention_ref, want)):
        leaves = [t.detach().requires_grad_("fwdbwd" in modes) for t in sub.tensors()]
        out = fn(*leaves, causal=True)
        dest.append(out.detach())
        if "fwdbwd" in modes:
            dest.extend(torch.autograd.grad(out, leaves, sub.grad_out))
    with torch.no_grad():
        q, k, v, key_bias = sub.tensors()
        if "decode" in modes:
            names.append("decode")
            got.append(atp_ops.atp_attention(q[:, :, -1:], k, v, key_bias, causal=True))
            want.append(attention_ref(q[:, :, -1:], k, v, key_bias, causal=True))
        if "scores" in modes:
            lse = atp_ops.atp_attention(q, k, v, key_bias, causal=True, return_lse=True)[1]
            w = score_weights(key_bias)
            names += ["s_self", "s_cross"]
            got.extend(atp_ops.atp_scores(q, k, lse, key_bias, *w, causal=True))
            want.extend(scores_ref(q, k, lse, key_bias, *w, causal=True))
    tol = CHECK_TOL[shape.dtype]
    errors = {name: _rel_err(g, w) for name, g, w in zip(names, got, want)}
    report = ", ".join(f"{n} {e:.1e}" for n, e in errors.items())
    if any(not (e <= tol) for e in errors.values()):
        sys.exit(f"CHECK FAILED {shape.label()}: max|atp - eager| / max|eager| = {report} "
                 f"(tolerance {tol:.0e}); refusing to benchmark a wrong kernel")
    print(f"check {shape.label()}: ok ({report}; tolerance {tol:.0e})")


# ----------------------------------------------------------------------------------------------
# Configuration, header, report


def _csv(choices: Sequence[str]):
    def parse(text: str) -> List[str]:
        items = [s for s in text.split(",") if s]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"expected a comma list of {', '.join(choices)}; got {text!r}")
        return items
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    p.add_argument("--batch", type=int, help="default 8 (CUDA), 1 (CPU)")
    p.add_argument("--heads", type=int, help="query heads; default 32 (CUDA), 8 (CPU)")
    p.add_argument("--kv-heads", type=int, help="key/value heads (GQA); default = --heads")
    p.add_argument("--head-dim", type=int, default=HEAD_DIM)
    p.add_argument("--seqlens", type=int, nargs="+", help="Lq = Lk values; default 675 2880")
    p.add_argument("--dtype", choices=list(DTYPES), help="default bf16 (CUDA), fp32 (CPU)")
    p.add_argument("--modes", type=_csv(MODES), default=list(MODES),
                   help="fwd,fwdbwd,decode (Lq = 1 against Lk = L),scores (atp_scores after a forward)")
    p.add_argument("--impls", type=_csv(list(IMPLS)), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--threads", type=int, help="torch CPU threads; default torch.get_num_threads()")
    p.add_argument("--quick", action="store_true", help="one small shape, few reps (smoke test)")
    p.add_argument("--check", action="store_true", help="verify atp against eager before timing")
    p.add_argument("--out", type=Path,
                   help="JSON path; default bench/results/kernel_bench_<device>_<time>.json")
    p.add_argument("--no-json", action="store_true", help="do not write the JSON file")
    return p.parse_args(argv)


def resolve(args: argparse.Namespace, device: torch.device):
    """Shapes, implementations and the list of what was scaled down from the LLaVA defaults."""
    if args.quick:
        defaults, why = QUICK[device.type], "--quick"
    elif device.type == "cpu":
        defaults, why = CPU_DEFAULT, "CPU"
    else:
        defaults, why = FULL, ""
    scaled = []
    for name in ("batch", "heads", "seqlens"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
            if defaults[name] != FULL[name]:
                scaled.append(f"{name} {FULL[name]} -> {defaults[name]} ({why})")
    kv_heads = args.kv_heads or args.heads
    if args.dtype is None:
        args.dtype = "bf16" if device.type == "cuda" else "fp32"
    shapes = [Shape(args.batch, args.heads, kv_heads, seqlen, args.head_dim, DTYPES[args.dtype])
              for seqlen in args.seqlens]
    impls = args.impls or [n for n in IMPLS if device.type == "cuda" or n not in CUDA_ONLY]
    return shapes, impls, scaled


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({os.cpu_count()} logical CPUs)"


def header(device: torch.device, scaled: List[str]) -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton_version,
        "atp_ops": atp_ops.__version__,
        "atp_cuda_kernels": atp_ops.has_cuda_kernels("attention_fwd"),
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": sys.argv,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ENV_VARS if k in os.environ},
        "host_allocator": ("glibc mallopt (timing: steady state; memory: mmap > 64 KiB)"
                           if HOST_ALLOCATOR.available else "unavailable: CPU peak memory not measured"),
        "scaled_down": scaled,
    }


def print_header(h: dict) -> None:
    print(f"device:  {h['device']}")
    print(f"torch {h['torch']}, CUDA {h['cuda']}, triton {h['triton']}, atp_ops {h['atp_ops']} "
          f"(CUDA attention kernels: {h['atp_cuda_kernels']}), python {h['python']}")
    print(f"threads: {h['threads']}   load average: {h['load_average']}   date: {h['date_utc']}")
    if h["env"]:
        print("env:     " + " ".join(f"{k}={v}" for k, v in h["env"].items()))
    print(f"command: {' '.join(h['command'])}")
    print("scaled down: " + ("; ".join(h["scaled_down"]) or "nothing (full LLaVA-1.5-7B shapes)"))
    load, cpus = (h["load_average"] or [0])[0], os.cpu_count() or 1
    if h["device_type"] == "cpu" and load > cpus - 0.5:
        print(f"warning: load average {load:.1f} on {cpus} CPUs: other processes compete for the "
              "cores, CPU timings will be noisy; OpenMP threads that spin at barriers suffer most "
              "(try --threads 1 or OMP_WAIT_POLICY=passive, both recorded here)")
    print(flush=True)


def add_speedups(results: List[Result]) -> None:
    atp_ms = {(r.shape, r.mode): r.ms for r in results if r.impl == "atp" and r.ms}
    for r in results:
        base = atp_ms.get((r.shape, r.mode))
        if base and r.ms:
            r.speedup_of_atp = r.ms / base


def format_row(r: Result, flop_unit: float) -> str:
    fmt = lambda x, spec: "-" if x is None else format(x, spec)  # noqa: E731
    head = f"{r.shape.label():<28} {r.mode:<7} {r.impl:<18}"
    if r.error is not None:
        return f"{head} n/a: {r.error}"
    flops = r.tflops * 1e12 / flop_unit
    speedup = "-" if r.speedup_of_atp is None else f"{r.speedup_of_atp:.2f}x"
    return f"{head} {r.ms:>10.3f} {flops:>9.1f} {fmt(r.peak_mib, '>10.1f')} {speedup:>12}"


def print_table(results: List[Result], device: torch.device) -> None:
    unit_name, unit = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    title = (f"{'shape':<28} {'mode':<7} {'impl':<18} {'ms':>10} {unit_name:>9} "
             f"{'peak MiB':>10} {'atp speedup':>12}")
    print(title)
    print("-" * len(title))
    previous = None
    for r in results:
        if previous is not None and (r.shape, r.mode) != previous:
            print()
        previous = (r.shape, r.mode)
        print(format_row(r, unit))
    print("\natp speedup = this impl's ms / atp's ms (> 1: atp is faster); peak MiB = memory of "
          "one call beyond its inputs")
    atp = {(r.shape, r.mode): r.ms for r in results if r.impl == "atp" and r.ms}
    for shape in dict.fromkeys(r.shape for r in results):
        if (shape, "scores") in atp and (shape, "fwd") in atp:
            print(f"{shape.label()}: atp_scores takes {atp[(shape, 'scores')] / atp[(shape, 'fwd')]:.1%} "
                  "of one atp_attention forward")


def write_json(path: Path, h: dict, args: argparse.Namespace, results: List[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    with open(path, "w") as f:
        json.dump({"header": h, "config": config, "results": [r.as_json() for r in results]}, f,
                  indent=1)
    print(f"\nwrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: CUDA is not available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes, impls, scaled = resolve(args, device)
    h = header(device, scaled)
    print_header(h)
    budget = "quick" if args.quick else "normal"
    results = run_benchmarks(shapes, args.modes, impls, device, budget, args.check)
    if not args.no_json:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        out = args.out or RESULTS_DIR / f"kernel_bench_{device.type}_{stamp}.json"
        write_json(out, h, args, results)
    print()
    print_table(results, device)


if __name__ == "__main__":
    main()
