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
    every op in `ops` are present (today only soft_mask has CUDA kernels)."""
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
# input builders


def make_heads(shape, dtype, layout, device, gen):
    """A (B, H, L, D) tensor of N(0, 1) values in `layout`:
    contiguous; blhd = HF's transposed (B, L, H, D) view; last_dim_strided = every other element
    of a (B, H, L, 2D) tensor (last dim not contiguous, the kernel must copy)."""
    b, h, l, d = shape
    if layout == "blhd":
        base = torch.randn(b, l, h, d, generator=gen, dtype=torch.float64)
        t = base.to(dtype).transpose(1, 2)
    elif layout == "last_dim_strided":
        base = torch.randn(b, h, l, 2 * d, generator=gen, dtype=torch.float64)
        t = base.to(dtype)[..., ::2]
    else:
        t = torch.randn(b, h, l, d, generator=gen, dtype=torch.float64).to(dtype)
    return t.to(device)


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
