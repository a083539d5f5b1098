"""Shared test configuration: devices per op, the hypothesis profile, tolerance helpers.

CUDA parameters are always generated and skip (with a reason) where there is no GPU or the
build has no CUDA kernel for the op yet, so the same suite runs unchanged on a GPU machine.
"""
from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

import atp_ops

# ----------------------------------------------------------------------------------------------
# hypothesis: fixed, repeatable profile (CI must not flake on a fresh random draw).

settings.register_profile(
    "atp",
    deadline=None,
    max_examples=40,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# A longer, still derandomised run for local soak testing: HYPOTHESIS_PROFILE=atp-long.
settings.register_profile("atp-long", parent=settings.get_profile("atp"), max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "atp"))

# ----------------------------------------------------------------------------------------------
# devices

ALL_OPS = ("attention_fwd", "attention_bwd", "scores", "soft_mask_fwd", "soft_mask_bwd")


def cuda_usable(*ops: str) -> bool:
    """A GPU is present and this build registered CUDA kernels for every op named."""
    return torch.cuda.is_available() and all(atp_ops.has_cuda_kernels(op) for op in ops)


def devices_for(*ops: str):
    """pytest params "cpu" and "cuda"; "cuda" skips cleanly unless a GPU and a CUDA kernel for
    every op in `ops` are present. Which dtypes and head dims a device supports: supported()."""
    if not torch.cuda.is_available():
        reason = "no CUDA device"
    elif not all(atp_ops.has_cuda_kernels(op) for op in ops):
        reason = f"no CUDA kernel for {', '.join(op for op in ops if not atp_ops.has_cuda_kernels(op))} in this build"
    else:
        reason = None
    cuda = pytest.param("cuda", marks=pytest.mark.skipif(reason is not None, reason=reason or ""))
    return ["cpu", cuda]


# Devices on which every op has a kernel (plain strings, for code that loops itself).
devices = ["cpu"] + (["cuda"] if cuda_usable(*ALL_OPS) else [])

ATTENTION_DEVICES = devices_for("attention_fwd", "attention_bwd")
SCORES_DEVICES = devices_for("attention_fwd", "scores")
SOFT_MASK_DEVICES = devices_for("soft_mask_fwd", "soft_mask_bwd")

# ----------------------------------------------------------------------------------------------
# what each device's kernels accept: the one statement of it the tests use
#
# From csrc/cuda/ops_cuda.cpp (the CUDA host glue raises a TORCH_CHECK error otherwise):
#   attention (attention_fwd, attention_bwd): q, k, v float16 or bfloat16 (float32/float64 are
#       refused: "use the CPU implementation"); head dim D = 64, 96 or 128; key_bias float32;
#       lse float32; B <= 65535, Hq <= 65535.
#   scores: q, k float16, bfloat16 or float32 (float64 refused); D <= 256
#       (cuda::kCrossScoresMaxHeadDim); lse float32 (compute_dtype of q: checks.cpp check_lse);
#       key_bias float32; w_self, w_cross float32 or float64; B <= 65535. lse need not come from
#       the CUDA attention kernel: any float32 (B, Hq, Lq) tensor on the device will do.
#   soft_mask: float32 or float64 (as on the CPU); B <= 65535.
# The CPU kernels take every float dtype and every head dim D > 0.

ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

DTYPES_FOR = {
    "attention": {"cpu": ALL_DTYPES, "cuda": (torch.float16, torch.bfloat16)},
    "scores": {"cpu": ALL_DTYPES, "cuda": (torch.float32, torch.float16, torch.bfloat16)},
    "soft_mask": {"cpu": (torch.float32, torch.float64), "cuda": (torch.float32, torch.float64)},
}
# None: any head dim D > 0.
HEAD_DIMS_FOR = {
    "attention": {"cpu": None, "cuda": (64, 96, 128)},
    "scores": {"cpu": None, "cuda": range(1, 257)},
    "soft_mask": {"cpu": None, "cuda": None},
}


def _device_type(device) -> str:
    return torch.device(device).type


def _ops(op):
    return (op,) if isinstance(op, str) else tuple(op)


def unsupported_reason(op, device, dtype: torch.dtype, head_dim: int | None = None) -> str | None:
    """None if every op in `op` (a name or a tuple of names from DTYPES_FOR) has a kernel on
    `device` for q of `dtype` with head dim `head_dim` (None: not checked); else why not."""
    dev = _device_type(device)
    for name in _ops(op):
        if dtype not in DTYPES_FOR[name][dev]:
            return f"{name} on {dev} does not support {dtype} (supports {DTYPES_FOR[name][dev]})"
        dims = HEAD_DIMS_FOR[name][dev]
        if head_dim is not None and dims is not None and head_dim not in dims:
            shown = f"D <= {dims[-1]}" if isinstance(dims, range) else f"D in {dims}"
            return f"{name} on {dev} supports {shown}, not D = {head_dim}"
    return None


def supported(op, device, dtype: torch.dtype, head_dim: int | None = None) -> bool:
    """Whether `device` has a kernel for every op in `op` at (dtype, head_dim)."""
    return unsupported_reason(op, device, dtype, head_dim) is None


def skip_unless_supported(op, device, dtype: torch.dtype, head_dim: int | None = None) -> None:
    """pytest.skip (with the reason) a case that `device` cannot run."""
    reason = unsupported_reason(op, device, dtype, head_dim)
    if reason is not None:
        pytest.skip(reason)


# An unsupported dtype's stand-in when a test picks values for a device: full precision becomes
# the low precision of the same role (float32 -> float16, float64 -> bfloat16).
_DTYPE_STAND_IN = {torch.float32: torch.float16, torch.float64: torch.bfloat16}


def pick(op, device, dtype: torch.dtype, head_dim: int, *, dtype_for_device: torch.dtype | None = None):
    """(dtype, head_dim) a test runs with on `device` so that it exercises that device's kernel.

    On a device that supports (dtype, head_dim) for every op in `op` (always the CPU) both are
    returned unchanged. Otherwise an unsupported dtype becomes `dtype_for_device` if given, else
    its stand-in (float32 -> float16, float64 -> bfloat16), and an unsupported head dim becomes
    the smallest supported one >= head_dim (else the largest). The result must be supported."""
    if supported(op, device, dtype, head_dim):
        return dtype, head_dim
    dev = _device_type(device)
    if not supported(op, device, dtype):
        dtype = dtype_for_device if dtype_for_device is not None else _DTYPE_STAND_IN.get(dtype, dtype)
    if not supported(op, device, dtype, head_dim):
        dims = sorted(set.intersection(*(set(HEAD_DIMS_FOR[n][dev] or (head_dim,)) for n in _ops(op))))
        assert dims, f"no head dim supported by all of {_ops(op)} on {dev}"
        head_dim = next((d for d in dims if d >= head_dim), dims[-1])
    reason = unsupported_reason(op, device, dtype, head_dim)
    assert reason is None, f"pick({op!r}, {device!r}): {reason}"
    return dtype, head_dim


def dtypes_for(op, device, candidates=ALL_DTYPES):
    """The `candidates` that `device` supports for every op in `op`, in their order."""
    return [t for t in candidates if supported(op, device, t)]


def head_dims_for(op, device, candidates):
    """The `candidates` head dims that `device` supports for every op in `op`, in their order."""
    dev = _device_type(device)
    return [d for d in candidates
            if all(HEAD_DIMS_FOR[n][dev] is None or d in HEAD_DIMS_FOR[n][dev] for n in _ops(op))]


# ----------------------------------------------------------------------------------------------
# input builders


def make_heads(shape, dtype, layout, device, gen):
    """A (B, H, L, D) tensor of N(0, 1) values in `layout`:
    contiguous; blhd = HF's transposed (B, L, H, D) view; last_dim_strided = every other element
    of a (B, H, L, 2D) tensor (last dim not contiguous, the kernel must copy).
    The values are drawn on the CPU (same numbers on every device); the view is taken on
    `device`, because .to(device) of a non-dense view (last_dim_strided) would make it contiguous."""
    b, h, l, d = shape
    if layout == "blhd":
        base = torch.randn(b, l, h, d, generator=gen, dtype=torch.float64)
        t = base.to(dtype).to(device).transpose(1, 2)
    elif layout == "last_dim_strided":
        base = torch.randn(b, h, l, 2 * d, generator=gen, dtype=torch.float64)
        t = base.to(dtype).to(device)[..., ::2]
    else:
        t = torch.randn(b, h, l, d, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return t


def make_qkv(b, hq, hkv, lq, lk, d, dtype, layout, device, gen):
    layouts = ("blhd", "contiguous", "last_dim_strided") if layout == "mixed" else (layout,) * 3
    q = make_heads((b, hq, lq, d), dtype, layouts[0], device, gen)
    k = make_heads((b, hkv, lk, d), dtype, layouts[1], device, gen)
    v = make_heads((b, hkv, lk, d), dtype, layouts[2], device, gen)
    return q, k, v


def make_bias(kind, b, lk, dtype, device, gen):
    """key_bias (B, Lk): None; finite log-masks; finite with -inf entries (every row keeps at
    least its first and last key); or one sample with every key at -inf."""
    if kind == "none":
        return None
    bias = torch.randn(b, lk, generator=gen, dtype=torch.float64)
    if kind in ("neg_inf", "dead_sample"):
        drop = torch.rand(b, lk, generator=gen, dtype=torch.float64) < 0.3
        drop[:, 0] = drop[:, -1] = False
        bias[drop] = float("-inf")
    if kind == "dead_sample":
        bias[b - 1] = float("-inf")
    if b > 1:  # a column-major (non-contiguous) view, as a strided key_bias
        bias = bias.t().contiguous().t()
    return bias.to(bias_dtype(dtype)).to(device)


def leaf(t):
    """A leaf that keeps t's strides (detach() is a view)."""
    return t.detach().requires_grad_(True) if t is not None else None


def upstream(out, lse, gen):
    do = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype).to(out.device)
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(lse.dtype).to(lse.device)
    return do, dlse


# ----------------------------------------------------------------------------------------------
# tolerances

LOW_PRECISION = (torch.float16, torch.bfloat16)


def bias_dtype(dtype: torch.dtype) -> torch.dtype:
    """The key_bias dtype the ops accept with q of `dtype`."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _maxabs(t: torch.Tensor) -> float:
    t = t.double()
    t = torch.where(torch.isfinite(t), t, torch.zeros_like(t))
    return t.abs().max().item() if t.numel() else 0.0


def assert_close_fa(name: str, actual: torch.Tensor, ref: torch.Tensor, ref_lowp: torch.Tensor | None = None,
                    *, atol: float | None = None) -> None:
    """FlashAttention's test rule.

    fp16/bf16 (ref_lowp given): max|actual - ref| <= 2 * max|ref_lowp - ref| + atol, where `ref`
    is the fp32 reference (not rounded to the low dtype) and `ref_lowp` the same computation done
    by PyTorch at the low dtype (reference.attention_ref(..., upcast=False)).
    fp32 / fp64 (ref_lowp None): `ref` must be a float64 reference; tight relative tolerance.
    Non-finite entries (lse = -inf) must match exactly in position and value.
    """
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a, r = actual.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(a).any(), f"{name}: NaN in the result"
    fin_a, fin_r = torch.isfinite(a), torch.isfinite(r)
    assert torch.equal(fin_a, fin_r), f"{name}: non-finite entries differ from the reference"
    assert torch.equal(a[~fin_a], r[~fin_r]), f"{name}: infinite entries differ from the reference"
    err = _maxabs(torch.where(fin_a, a - r, torch.zeros_like(a)))
    scale = max(1.0, _maxabs(r))
    if ref_lowp is not None:
        lp = ref_lowp.detach().double().cpu()
        lp_err = _maxabs(torch.where(fin_r & torch.isfinite(lp), lp - r, torch.zeros_like(r)))
        tol = 2 * lp_err + (1e-5 * scale if atol is None else atol)
        assert err <= tol, f"{name}: max error {err:.3e} > 2 * PyTorch low-precision error {lp_err:.3e} + atol"
    else:
        if actual.dtype == torch.float64:
            tol = (1e-10 if atol is None else atol) * scale
        else:
            tol = (2e-5 if atol is None else atol) * scale
        assert err <= tol, f"{name}: max error {err:.3e} > {tol:.3e} ({actual.dtype})"
