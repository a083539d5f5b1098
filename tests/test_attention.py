"""atp_attention against reference.attention_ref (DESIGN §3.1): forward, lse and every gradient.

Every test runs on "cpu" and "cuda" (skipped without a GPU). What the CPU runs is fixed; on CUDA,
which supports only float16/bfloat16 with head dims 64, 96 and 128 (conftest.DTYPES_FOR /
HEAD_DIMS_FOR), a test either picks supported values (conftest.pick: float32 -> float16,
float64 -> bfloat16, small head dims -> 64, with dtype-aware tolerances) or, where the CPU case
has no CUDA counterpart (float64 gradcheck), skips with the reason.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import atp_ops
from atp_ops import atp_attention, reference
from conftest import (ATTENTION_DEVICES, LOW_PRECISION, assert_close_fa, bias_dtype, dtypes_for, head_dims_for,
                      leaf, make_bias, make_qkv, pick, skip_unless_supported, upstream)

NEG_INF = float("-inf")
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HEADS = ((4, 1), (4, 2), (2, 2), (1, 1))
LAYOUTS = ("contiguous", "blhd", "last_dim_strided", "mixed")
BIAS_KINDS = ("none", "finite", "neg_inf", "dead_sample")
HEAD_DIMS = (8, 16, 64, 128)
OP = "attention"  # conftest's name for atp_attention's kernels (forward and backward)


def same_tol(dtype):
    """Tolerance for two results of the kernel that must agree (the same math, other tiles or
    summation order): tight for float64/float32; a couple of ulps for float16/bfloat16 (CUDA),
    whose outputs are rounded to that dtype after float32 accumulation."""
    if dtype == torch.float64:
        return dict(rtol=1e-12, atol=1e-12)
    if dtype == torch.float16:
        return dict(rtol=4e-3, atol=1e-3)
    if dtype == torch.bfloat16:
        return dict(rtol=3e-2, atol=1e-2)
    return dict(rtol=2e-6, atol=2e-6)


def forward_backward(fn, q, k, v, key_bias, do, dlse, use_lse, key_mask=None, **kw):
    """out, lse and grads (q, k, v, key_bias[, key_mask]) of sum(out * do) [+ sum(finite lse * dlse)]."""
    q, k, v, key_bias, key_mask = leaf(q), leaf(k), leaf(v), leaf(key_bias), leaf(key_mask)
    if key_mask is not None:
        kw["key_mask"] = key_mask
    out, lse = fn(q, k, v, key_bias, return_lse=True, **kw)
    loss = (out * do.to(out.dtype)).sum()
    if use_lse:
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = loss + (finite_lse * dlse.to(lse.dtype)).sum()
    wrt = (q, k, v, key_bias) if key_mask is None else (q, k, v, key_bias, key_mask)
    grads = iter(torch.autograd.grad(loss, [t for t in wrt if t is not None]))
    return out, lse, [None if t is None else next(grads) for t in wrt]


def check_against_reference(q, k, v, key_bias, causal, scale, use_lse, gen, key_mask=None):
    """Kernel vs reference under FlashAttention's rule (fp16/bf16) or a float64 reference."""
    dtype = q.dtype
    kw = dict(causal=causal, scale=scale)
    out0, lse0 = atp_attention(q, k, v, key_bias, key_mask=key_mask, return_lse=True, **kw)
    do, dlse = upstream(out0, lse0, gen)
    got = forward_backward(atp_attention, q, k, v, key_bias, do, dlse, use_lse, key_mask, **kw)

    ref_dtype = torch.float32 if dtype in LOW_PRECISION else torch.float64
    up = lambda t, dt=ref_dtype: None if t is None else t.detach().to(dt)  # noqa: E731
    up_bias = lambda t: up(t, torch.float64 if ref_dtype == torch.float64 else torch.float32)  # noqa: E731
    ref = forward_backward(reference.attention_ref, up(q), up(k), up(v), up_bias(key_bias),
                           up(do), up(dlse), use_lse, up_bias(key_mask), **kw)
    lowp = None
    if dtype in LOW_PRECISION:
        lowp = forward_backward(reference.attention_ref, q, k, v, key_bias, do, dlse, use_lse, key_mask,
                                upcast=False, **kw)

    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert got[1].dtype == bias_dtype(dtype) and got[1].shape == q.shape[:3]
    names = ("dq", "dk", "dv", "d_key_bias", "d_key_mask")
    inputs = (q, k, v, key_bias, key_mask)
    assert_close_fa("out", got[0], ref[0], None if lowp is None else lowp[0])
    # lse is float32 for fp16/bf16 q, computed in fp32 by the kernel: compare to the fp32 path.
    assert_close_fa("lse", got[1], ref[1])
    for name, g, r, i in zip(names, got[2], ref[2], range(5)):
        if r is None:
            assert g is None
            continue
        assert g.dtype == inputs[i].dtype and g.shape == inputs[i].shape, name
        assert_close_fa(name, g, r, None if lowp is None else lowp[2][i])
    return got


# ----------------------------------------------------------------------------------------------
# property test against the reference


@st.composite
def attention_cases(draw, device):
    """A case the kernel of `device` supports: the CPU draws from every dtype and HEAD_DIMS,
    CUDA from its float16/bfloat16 and head dims 64/96/128 (the rest of the draw is the same)."""
    b = draw(st.integers(1, 3))
    hq, hkv = draw(st.sampled_from(HEADS))
    lq = draw(st.sampled_from([1, 2, 17, 63, 64, 65, 129]))
    lk = draw(st.one_of(
        st.sampled_from([0, 1, 16, 47, 127]).map(lambda extra: lq + extra),
        st.sampled_from([255, 256, 257, 300, 513, 700]),  # crosses the 256-key CPU tile
    ))
    d = draw(st.sampled_from(head_dims_for(OP, device, HEAD_DIMS)))
    dtype = draw(st.sampled_from(dtypes_for(OP, device, DTYPES)))
    return dict(
        b=b, hq=hq, hkv=hkv, lq=lq, lk=lk, d=d, dtype=dtype,
        causal=draw(st.booleans()),
        layout=draw(st.sampled_from(LAYOUTS)),
        bias=draw(st.sampled_from(BIAS_KINDS)),
        scale=draw(st.sampled_from([None, 0.3])),
        use_lse=draw(st.booleans()),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@given(data=st.data())
def test_attention_matches_reference(device, data):
    case = data.draw(attention_cases(device), label="case")
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v = make_qkv(case["b"], case["hq"], case["hkv"], case["lq"], case["lk"], case["d"],
                       case["dtype"], case["layout"], device, gen)
    key_bias = make_bias(case["bias"], case["b"], case["lk"], case["dtype"], device, gen)
    out, lse, grads = check_against_reference(q, k, v, key_bias, case["causal"], case["scale"],
                                              case["use_lse"], gen)
    for t in (out, lse, *grads):
        if t is not None:
            assert not torch.isnan(t).any()


# Tile edges of the CPU kernel (128 query rows, 256 keys) and the awkward lengths, each hit
# explicitly rather than left to the draw.
@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("lq,lk", [(1, 1), (1, 300), (17, 17), (63, 64), (64, 256), (65, 257),
                                   (129, 129), (129, 700), (200, 513)])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_tile_edges(device, lq, lk, causal):
    gen = torch.Generator().manual_seed(lq * 1000 + lk)
    dtype, d = pick(OP, device, torch.float32, 16)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, lq, lk, d, dtype, "blhd", device, gen)
    key_bias = make_bias("neg_inf", 2, lk, dtype, device, gen)
    check_against_reference(q, k, v, key_bias, causal, None, True, gen)


# Decoding: a few query rows against a long cache whose first key tiles are empty slots of a
# ragged batch (key_bias -inf for every row). The CPU kernel takes short query tiles (<= 8 rows)
# without BLAS and skips key tiles masked for every row; 9 rows is the first BLAS tile.
@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("lq", [1, 2, 8, 9])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_decode_against_ragged_cache(device, lq, causal):
    gen = torch.Generator().manual_seed(lq)
    dtype, d = pick(OP, device, torch.float64, 32)
    lk = 700
    q, k, v = make_qkv(3, 4, 2, lq, lk, d, dtype, "blhd", device, gen)
    key_bias = make_bias("finite", 3, lk, dtype, device, gen)
    empty = torch.tensor([600, 256, 0], device=device)  # sample 0: two whole empty tiles
    key_bias = key_bias.masked_fill(torch.arange(lk, device=device)[None, :] < empty[:, None], NEG_INF)
    check_against_reference(q, k, v, key_bias, causal, None, True, gen)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="setup.py adds -fopenmp on Linux only")
def test_cpu_kernels_are_built_with_openmp():
    """at::parallel_for is inline OpenMP: an extension built without -fopenmp runs every CPU
    kernel on one thread, silently. The built library must call the OpenMP runtime."""
    assert b"GOMP_parallel" in Path(atp_ops._C.__file__).read_bytes()


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_low_precision_large_head_dim(device, dtype):
    skip_unless_supported(OP, device, dtype, 128)  # CUDA: the float16/bfloat16 cases run
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(1, 4, 2, 65, 300, 128, dtype, "contiguous", device, gen)
    key_bias = make_bias("finite", 1, 300, dtype, device, gen)
    check_against_reference(q, k, v, key_bias, True, None, True, gen)


# ----------------------------------------------------------------------------------------------
# masked rows


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_sample_gives_zero_and_no_nan(device, dtype, causal):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 17, 300, 16
    if dtype == torch.float64:
        skip_unless_supported(OP, device, dtype)  # CUDA: its bfloat16 stand-in is the bf16 case
    dtype, d = pick(OP, device, dtype, d)  # CUDA: float32 -> float16; D = 64
    gen = torch.Generator().manual_seed(3)
    q, k, v = (leaf(t) for t in make_qkv(b, hq, hkv, lq, lk, d, dtype, "contiguous", device, gen))
    key_bias = torch.zeros(b, lk, dtype=bias_dtype(dtype), device=device)
    key_bias[1] = NEG_INF  # sample 1 sees nothing
    key_bias = leaf(key_bias)
    out, lse = atp_attention(q, k, v, key_bias, causal=causal, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(lse[1], torch.full_like(lse[1], NEG_INF))
    assert torch.isfinite(out[0]).all() and torch.isfinite(lse[0]).all()
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    (out.float().square().sum() + finite_lse.sum()).backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("key_bias", key_bias)):
        assert not torch.isnan(t.grad).any(), f"NaN in d{name}"
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1])), f"d{name} of the dead sample != 0"
        assert t.grad[0].abs().sum() > 0, f"d{name} of the live sample is all zero"


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("lq,lk", [(5, 2), (17, 1), (129, 70), (300, 257)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_causal_more_queries_than_keys(device, lq, lk, dtype):
    """Bottom-right alignment: the top Lq - Lk rows see no key -> 0, lse -inf, zero grads."""
    gen = torch.Generator().manual_seed(lq + lk)
    dtype, d = pick(OP, device, dtype, 16)  # CUDA: float32 -> float16, float64 -> bfloat16; D = 64
    q, k, v = make_qkv(2, 4, 1, lq, lk, d, dtype, "blhd", device, gen)
    key_bias = make_bias("finite", 2, lk, dtype, device, gen)
    out, lse, grads = check_against_reference(q, k, v, key_bias, True, None, True, gen)
    top = lq - lk
    assert torch.equal(out[:, :, :top], torch.zeros_like(out[:, :, :top]))
    assert torch.isneginf(lse[:, :, :top]).all()
    assert torch.isfinite(lse[:, :, top:]).all()
    assert torch.equal(grads[0][:, :, :top], torch.zeros_like(grads[0][:, :, :top]))
    assert grads[0][:, :, top:].abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# the semantics of key_bias


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_neg_inf_bias_equals_removing_keys(device, causal, dtype):
    b, hq, hkv, lq, lk, d = 2, 4, 2, 40, 330, 16
    dtype, d = pick(OP, device, dtype, d)  # CUDA: float32 -> float16, float64 -> bfloat16; D = 64
    gen = torch.Generator().manual_seed(11)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, "contiguous", device, gen)
    bias = torch.randn(b, lk, generator=gen, dtype=torch.float64).to(bias_dtype(dtype)).to(device)
    # Causal: only keys every row sees (j < Lk - Lq) may go, so the kept keys keep their
    # bottom-right alignment. Non-causal: any keys, across both key tiles.
    pool = lk - lq if causal else lk
    removed = torch.randperm(pool, generator=gen)[: pool // 3].sort().values
    gone = set(removed.tolist())
    kept = torch.tensor([j for j in range(lk) if j not in gone]).to(device)
    masked = bias.clone()
    masked[:, removed.to(device)] = NEG_INF

    out, lse = atp_attention(q, k, v, masked, causal=causal, return_lse=True)
    out_r, lse_r = atp_attention(q, k.index_select(2, kept), v.index_select(2, kept),
                                 bias.index_select(1, kept), causal=causal, return_lse=True)
    tol = same_tol(dtype)
    # lse is float32 for float16/bfloat16 q and never rounded to q's dtype.
    lse_tol = dict(rtol=1e-5, atol=1e-5) if dtype in LOW_PRECISION else tol
    torch.testing.assert_close(out, out_r, **tol)
    torch.testing.assert_close(lse, lse_r, **lse_tol)

    # And the gradients of the kept keys agree; the removed keys get exactly zero.
    qa, ka, va, ba = leaf(q), leaf(k), leaf(v), leaf(masked)
    atp_attention(qa, ka, va, ba, causal=causal).square().sum().backward()
    qb, kb_, vb, bb = leaf(q), leaf(k.index_select(2, kept)), leaf(v.index_select(2, kept)), \
        leaf(bias.index_select(1, kept))
    atp_attention(qb, kb_, vb, bb, causal=causal).square().sum().backward()
    torch.testing.assert_close(qa.grad, qb.grad, **tol)
    torch.testing.assert_close(ka.grad.index_select(2, kept), kb_.grad, **tol)
    torch.testing.assert_close(va.grad.index_select(2, kept), vb.grad, **tol)
    torch.testing.assert_close(ba.grad.index_select(1, kept), bb.grad, **tol)
    gone = removed.to(device)
    assert torch.equal(ka.grad[:, :, gone], torch.zeros_like(ka.grad[:, :, gone]))
    assert torch.equal(va.grad[:, :, gone], torch.zeros_like(va.grad[:, :, gone]))
    assert torch.equal(ba.grad[:, gone], torch.zeros_like(ba.grad[:, gone]))


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_log_mask_bias_is_the_papers_masked_softmax(device, causal):
    """key_bias = log M gives A_ij = M_j exp(s_ij) / sum_k M_k exp(s_ik) (paper 3.3.2), by hand."""
    b, hq, hkv, lq, lk, d = 2, 4, 2, 33, 290, 16
    dtype, d = pick(OP, device, torch.float64, d, dtype_for_device=torch.float16)  # CUDA: fp16, D = 64
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, "contiguous", device, gen)
    m = torch.rand(b, lk, generator=gen, dtype=torch.float64).clamp_min(1e-3).to(device)  # M in (0, 1]
    m[:, ::7] = 1.0
    log_m = torch.log(m).to(bias_dtype(dtype))
    out = atp_attention(q, k, v, log_m, causal=causal)
    q, k, v = q.double(), k.double(), v.double()  # the by-hand map, in float64 (no-op on the CPU)

    g = hq // hkv
    kk, vv = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = torch.einsum("bhid,bhjd->bhij", q, kk) / math.sqrt(d)
    weight = torch.exp(s) * m[:, None, None, :]
    if causal:
        i = torch.arange(lq, device=device)[:, None]
        j = torch.arange(lk, device=device)[None, :]
        weight = weight * (j <= i + lk - lq)
    expected = (weight / weight.sum(-1, keepdim=True)) @ vv
    if dtype == torch.float64:
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    else:  # CUDA float16: FlashAttention's rule, PyTorch's own float16 computation as the budget
        lowp = reference.attention_ref(q.to(dtype), k.to(dtype), v.to(dtype), log_m, causal=causal,
                                       upcast=False)
        assert_close_fa("out", out, expected, lowp)


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
def test_key_bias_none_equals_zero_bias(device):
    gen = torch.Generator().manual_seed(2)
    dtype, d = pick(OP, device, torch.float32, 16)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, 65, 270, d, dtype, "contiguous", device, gen)
    out_none, lse_none = atp_attention(q, k, v, None, return_lse=True)
    out_zero, lse_zero = atp_attention(q, k, v, torch.zeros(2, 270, device=device), return_lse=True)
    torch.testing.assert_close(out_none, out_zero, rtol=0, atol=0)
    torch.testing.assert_close(lse_none, lse_zero, rtol=0, atol=0)
    # A constant bias shifts lse and leaves the output alone.
    out_c, lse_c = atp_attention(q, k, v, torch.full((2, 270), -3.0, device=device), return_lse=True)
    out_tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else same_tol(dtype)
    torch.testing.assert_close(out_c, out_none, **out_tol)
    torch.testing.assert_close(lse_c, lse_none - 3.0, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# key_mask: the multiplicative mask M, with its gradient defined at M = 0 (straight-through masks)


def make_mask(b, lk, device, gen, *, dtype=torch.float32, zero_keys=None):
    """key_mask (B, Lk) in [0, 1]: uniform values with ~1/4 exact zeros and ~1/8 exact ones; key 0
    of every sample at 1, so every causal row with a key in view keeps one. zero_keys: a slice of
    sample 0's keys set to 0 (a whole key tile of the kernels)."""
    m = torch.rand(b, lk, generator=gen, dtype=torch.float64)
    u = torch.rand(b, lk, generator=gen, dtype=torch.float64)
    m[u < 0.25] = 0.0
    m[u > 0.875] = 1.0
    m[:, 0] = 1.0
    if zero_keys is not None:
        m[0, zero_keys] = 0.0
    if b > 1:  # a column-major (non-contiguous) view, as make_bias does
        m = m.t().contiguous().t()
    return m.to(dtype).to(device)


# (B, Hq, Hkv, Lq, Lk): GQA, MHA, Lq < Lk (decode-like), Lq > Lk (causal rows that see nothing),
# Lk across two CPU key tiles with sample 0's second tile (keys 256..511) all at M = 0.
MASK_SHAPES = [(2, 4, 1, 17, 300), (2, 2, 2, 65, 65), (2, 4, 2, 129, 70), (2, 4, 2, 40, 600), (1, 1, 1, 1, 1)]


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", ["none", "finite", "neg_inf"])
def test_key_mask_equals_log_mask_bias(device, shape, causal, bias):
    """The forward with key_mask is the forward with key_bias + log(key_mask), bit for bit; the
    backward gives the same dq, dk, dv, and d key_bias = key_mask * d key_mask equals the
    gradient of the log-mask bias."""
    b, hq, hkv, lq, lk = shape
    dtype, d = pick(OP, device, torch.float32, 16)  # CUDA: float16, D = 64
    gen = torch.Generator().manual_seed(lq * 7 + lk)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, "blhd", device, gen)
    key_bias = make_bias(bias, b, lk, dtype, device, gen)
    key_mask = make_mask(b, lk, device, gen, zero_keys=slice(256, 512))
    log_bias = torch.log(key_mask) if key_bias is None else key_bias + torch.log(key_mask)

    out, lse = atp_attention(q, k, v, key_bias, key_mask=key_mask, causal=causal, return_lse=True)
    out_b, lse_b = atp_attention(q, k, v, log_bias, causal=causal, return_lse=True)
    assert torch.equal(out, out_b) and torch.equal(lse, lse_b)

    do, dlse = upstream(out, lse, gen)
    _, _, g = forward_backward(atp_attention, q, k, v, key_bias, do, dlse, True, key_mask, causal=causal)
    _, _, g_b = forward_backward(atp_attention, q, k, v, log_bias, do, dlse, True, causal=causal)
    for name, a, r in zip(("dq", "dk", "dv"), g[:3], g_b[:3]):
        assert torch.equal(a, r), name
    tol = dict(rtol=1e-5, atol=1e-5)  # float32 sums of terms that cancel, in another order
    torch.testing.assert_close(key_mask * g[4], g_b[3], **tol)
    if key_bias is not None:
        torch.testing.assert_close(g[3], g_b[3], **tol)
    else:
        assert g[3] is None


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=lambda t: "x".join(map(str, t)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("bias", ["none", "finite", "neg_inf"])
def test_key_mask_gradients_match_reference(device, shape, causal, bias):
    """Every output and gradient, d key_mask at M = 0 included, against the reference, whose
    autograd through the paper's product M_j exp(s_ij) is exact at M = 0 (reference._softmax_lse)."""
    b, hq, hkv, lq, lk = shape
    dtype, d = pick(OP, device, torch.float64, 16)  # CUDA: bfloat16, D = 64
    gen = torch.Generator().manual_seed(lq * 11 + lk)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, "mixed", device, gen)
    key_bias = make_bias(bias, b, lk, dtype, device, gen)
    key_mask = make_mask(b, lk, device, gen, dtype=bias_dtype(dtype), zero_keys=slice(256, 512))
    got = check_against_reference(q, k, v, key_bias, causal, None, True, gen, key_mask=key_mask)
    d_mask = got[2][4]
    assert not torch.isnan(d_mask).any()
    zero = (key_mask == 0) & (torch.isfinite(key_bias) if key_bias is not None else True)
    if lq > 1:  # the keys at M = 0 still get a gradient (the point of key_mask)
        assert d_mask[zero].abs().sum() > 0
    if key_bias is not None:  # keys removed by key_bias get none
        gone = torch.isneginf(key_bias)
        assert torch.equal(d_mask[gone], torch.zeros_like(d_mask[gone]))


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@given(data=st.data())
@settings(max_examples=15)
def test_key_mask_matches_reference(device, data):
    case = data.draw(attention_cases(device), label="case")
    gen = torch.Generator().manual_seed(case["seed"])
    q, k, v = make_qkv(case["b"], case["hq"], case["hkv"], case["lq"], case["lk"], case["d"],
                       case["dtype"], case["layout"], device, gen)
    key_bias = make_bias(case["bias"], case["b"], case["lk"], case["dtype"], device, gen)
    key_mask = make_mask(case["b"], case["lk"], device, gen, dtype=bias_dtype(case["dtype"]))
    check_against_reference(q, k, v, key_bias, case["causal"], case["scale"], case["use_lse"], gen,
                            key_mask=key_mask)


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_gradient_where_positive_is_autograd_of_log(device, causal):
    """Where M > 0, d key_mask is autograd's gradient of attention_ref(key_bias + torch.log(M))."""
    dtype, d = pick(OP, device, torch.float64, 16)  # CUDA: bfloat16, D = 64
    gen = torch.Generator().manual_seed(41)
    b, lq, lk = 2, 33, 290
    q, k, v = make_qkv(b, 4, 2, lq, lk, d, dtype, "contiguous", device, gen)
    key_bias = make_bias("neg_inf", b, lk, dtype, device, gen)
    m = torch.rand(b, lk, generator=gen, dtype=torch.float64).clamp_min(0.05)
    key_mask = m.to(bias_dtype(dtype)).to(device)
    out, lse = atp_attention(q, k, v, key_bias, key_mask=key_mask, causal=causal, return_lse=True)
    do, dlse = upstream(out, lse, gen)
    got = forward_backward(atp_attention, q, k, v, key_bias, do, dlse, True, key_mask, causal=causal)[2][4]

    up = lambda t: t.detach().double()  # noqa: E731
    m_ref = leaf(up(key_mask))
    o, l = reference.attention_ref(up(q), up(k), up(v), up(key_bias) + torch.log(m_ref), causal=causal,
                                   return_lse=True)
    loss = (o * up(do)).sum() + (torch.where(torch.isfinite(l), l, 0.0) * up(dlse)).sum()
    (ref,) = torch.autograd.grad(loss, [m_ref])
    if dtype == torch.float64:
        assert_close_fa("d_key_mask", got, ref)
    else:  # CUDA bfloat16: against the float32 reference with the low-precision budget
        lowp = forward_backward(reference.attention_ref, q, k, v, key_bias, do, dlse, True, key_mask,
                                causal=causal, upcast=False)[2][4]
        assert_close_fa("d_key_mask", got, ref, lowp)


def _mask_loss_inputs(lk=600):
    """float64 CPU inputs with exact zeros in key_mask (sample 0: keys 256..511, a whole CPU key
    tile), key_bias finite except a few -inf keys (key 3 of sample 0 at M = 0 as well), and every
    row seeing a key with M > 0."""
    gen = torch.Generator().manual_seed(43)
    q, k, v = make_qkv(2, 4, 2, 9, lk, 8, torch.float64, "blhd", "cpu", gen)
    key_bias = torch.randn(2, lk, generator=gen, dtype=torch.float64)
    key_bias[0, 3] = key_bias[1, 300] = NEG_INF
    key_mask = make_mask(2, lk, "cpu", gen, dtype=torch.float64, zero_keys=slice(256, 512))
    key_mask[0, 3] = 0.0
    do = torch.randn(2, 4, 9, 8, generator=gen, dtype=torch.float64)
    dlse = torch.randn(2, 4, 9, generator=gen, dtype=torch.float64)
    return q, k, v, key_bias, key_mask, do, dlse


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_key_mask_gradient_at_zero_by_finite_differences(device, causal):
    """d loss / d M_j at M_j = 0, by one-sided second-order finite differences of the op itself
    in float64 (M cannot go below 0): single keys (in and out of the all-zero tile, one removed
    by key_bias) and a random direction over every zero."""
    skip_gradcheck_unless_float64(device)
    q, k, v, key_bias, key_mask, do, dlse = _mask_loss_inputs()

    def loss(m):
        out, lse = atp_attention(q, k, v, key_bias, key_mask=m, causal=causal, return_lse=True)
        return (out * do).sum() + (lse * dlse).sum()

    m = leaf(key_mask)
    loss(m).backward()
    g = m.grad

    def one_sided(direction, eps=1e-6):
        f0, f1, f2 = (loss(key_mask + t * direction).item() for t in (0.0, eps, 2 * eps))
        return (-3 * f0 + 4 * f1 - f2) / (2 * eps)

    zeros = key_mask == 0
    picks = [(0, 1 + int(torch.nonzero(zeros[0, 1:256])[0])), (0, 256), (0, 400), (0, 511),
             (1, int(torch.nonzero(zeros[1])[-1])), (0, 3)]
    for b, j in picks:
        assert key_mask[b, j] == 0
        e = torch.zeros_like(key_mask)
        e[b, j] = 1.0
        fd = one_sided(e)
        assert abs(g[b, j].item() - fd) <= 1e-5 * max(1.0, abs(fd)), (b, j, g[b, j].item(), fd)
    assert g[0, 3] == 0  # removed by key_bias: exactly no gradient
    u = torch.rand(key_mask.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * zeros
    fd = one_sided(u)
    assert abs((g * u).sum().item() - fd) <= 1e-5 * max(1.0, abs(fd))


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_key_mask(device, causal):
    """float64 gradcheck: every input with M inside (0, 1) (central differences), and key_bias
    with a mask holding exact zeros."""
    skip_gradcheck_unless_float64(device)
    q, k, v, bias = _gradcheck_inputs(device)
    gen = torch.Generator().manual_seed(47)
    m = torch.rand(bias.shape, generator=gen, dtype=torch.float64) * 0.8 + 0.1

    def fn(q, k, v, bias, m):
        return atp_attention(q, k, v, bias, key_mask=m, causal=causal, return_lse=True)

    assert torch.autograd.gradcheck(fn, (leaf(q), leaf(k), leaf(v), leaf(bias), leaf(m)), eps=1e-6,
                                    atol=1e-7, rtol=1e-5)
    m_zero = m.clone()
    m_zero[0, 2] = m_zero[1, 5] = m_zero[1, 8] = 0.0  # key 0 keeps M > 0: every causal row sees a key

    def fn_bias(bias):
        return atp_attention(q, k, v, bias, key_mask=m_zero, causal=causal, return_lse=True)

    assert torch.autograd.gradcheck(fn_bias, (leaf(bias),), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_all_zero_key_mask_sample_gives_zero_and_no_nan(device, with_bias):
    """A sample whose mask is all 0 sees nothing: 0, lse = -inf, and zero gradients (no row has a
    normaliser to differentiate), like a key_bias of -inf; the other sample is untouched."""
    dtype, d = pick(OP, device, torch.float32, 16)  # CUDA: float16, D = 64
    gen = torch.Generator().manual_seed(53)
    q, k, v = (leaf(t) for t in make_qkv(2, 4, 2, 17, 300, d, dtype, "contiguous", device, gen))
    key_bias = leaf(make_bias("finite", 2, 300, dtype, device, gen)) if with_bias else None
    key_mask = make_mask(2, 300, device, gen)
    key_mask[1] = 0.0
    key_mask = leaf(key_mask)
    out, lse = atp_attention(q, k, v, key_bias, key_mask=key_mask, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    (out.float().square().sum() + finite_lse.sum()).backward()
    for name, t in (("q", q), ("k", k), ("v", v), ("key_bias", key_bias), ("key_mask", key_mask)):
        if t is None:
            continue
        assert not torch.isnan(t.grad).any(), f"NaN in d{name}"
        assert torch.equal(t.grad[1], torch.zeros_like(t.grad[1])), f"d{name} of the dead sample != 0"
        assert t.grad[0].abs().sum() > 0, f"d{name} of the live sample is all zero"


# ----------------------------------------------------------------------------------------------
# gradcheck (float64)


def skip_gradcheck_unless_float64(device):
    """gradcheck needs float64, which CUDA attention does not support; the float64 gradients are
    checked on the CPU, CUDA's against the reference in the fp16/bf16 tests above."""
    skip_unless_supported(OP, device, torch.float64)


def _gradcheck_inputs(device, causal_lq_lk=(5, 9)):
    skip_gradcheck_unless_float64(device)
    lq, lk = causal_lq_lk
    gen = torch.Generator().manual_seed(13)
    q, k, v = make_qkv(2, 4, 2, lq, lk, 8, torch.float64, "blhd", device, gen)
    bias = torch.randn(2, lk, generator=gen, dtype=torch.float64).to(device)
    return q, k, v, bias


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_qkv_with_neg_inf_keys(device, causal):
    q, k, v, bias = _gradcheck_inputs(device)
    bias[0, 1] = bias[1, 6] = bias[1, 2] = NEG_INF  # every causal row still sees a finite key

    def fn(q, k, v):
        out, lse = atp_attention(q, k, v, bias, causal=causal, return_lse=True)
        return out, lse

    assert torch.autograd.gradcheck(fn, (leaf(q), leaf(k), leaf(v)), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_all_inputs_finite_bias(device, causal):
    # -inf entries cannot be perturbed numerically, so key_bias is checked with finite values;
    # the -inf case is covered by test_neg_inf_bias_equals_removing_keys and the reference tests.
    q, k, v, bias = _gradcheck_inputs(device)

    def fn(q, k, v, bias):
        return atp_attention(q, k, v, bias, causal=causal, return_lse=True)

    assert torch.autograd.gradcheck(fn, (leaf(q), leaf(k), leaf(v), leaf(bias)), eps=1e-6, atol=1e-7,
                                    rtol=1e-5)


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
def test_gradcheck_across_key_tiles(device):
    """One gradcheck with Lk over the 256-key tile (q and key_bias only, to stay fast)."""
    skip_gradcheck_unless_float64(device)
    gen = torch.Generator().manual_seed(17)
    q, k, v = make_qkv(1, 2, 1, 3, 260, 8, torch.float64, "contiguous", device, gen)
    bias = torch.randn(1, 260, generator=gen, dtype=torch.float64).to(device)

    def fn(q, bias):
        return atp_attention(q, k, v, bias, causal=True, return_lse=True)

    assert torch.autograd.gradcheck(fn, (leaf(q), leaf(bias)), eps=1e-6, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# determinism, opcheck, torch.compile


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("with_key_mask", [False, True])
def test_backward_is_bitwise_deterministic(device, deterministic, with_key_mask):
    # Both settings on both devices: atp_attention's docstring promises a deterministic backward
    # whatever use_deterministic_algorithms says (no kernel uses atomics).
    gen = torch.Generator().manual_seed(19)
    dtype, d = pick(OP, device, torch.float32, 32)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 1, 100, 400, d, dtype, "blhd", device, gen)  # 2 x 2 tiles
    bias = make_bias("neg_inf", 2, 400, dtype, device, gen)
    mask = make_mask(2, 400, device, gen) if with_key_mask else None
    do = torch.randn(q.shape, generator=gen).to(device, dtype)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = []
        for _ in range(2):
            ins = [leaf(t) for t in (q, k, v, bias, mask) if t is not None]
            out, lse = atp_attention(*ins[:4], key_mask=ins[4] if with_key_mask else None, return_lse=True)
            torch.autograd.backward([out, lse], [do, torch.ones_like(lse)])
            runs.append([out.detach()] + [t.grad for t in ins])
    finally:
        torch.use_deterministic_algorithms(prev)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_attention_fwd(device, with_bias, causal):
    gen = torch.Generator().manual_seed(23)
    dtype, d = pick(OP, device, torch.float32, 8)  # CUDA: float16, D = 64
    q, k, v = (leaf(t) for t in make_qkv(2, 4, 2, 7, 11, d, dtype, "blhd", device, gen))
    bias = leaf(make_bias("neg_inf", 2, 11, dtype, device, gen)) if with_bias else None
    opcheck(torch.ops.atp_ops.attention_fwd, (q, k, v, bias, causal, 0.35))


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("with_grad_lse", [False, True])
@pytest.mark.parametrize("with_grad_bias", [False, True])
def test_opcheck_attention_bwd(device, with_bias, with_grad_lse, with_grad_bias):
    gen = torch.Generator().manual_seed(29)
    dtype, d = pick(OP, device, torch.float32, 8)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, 7, 11, d, dtype, "contiguous", device, gen)
    bias = make_bias("neg_inf", 2, 11, dtype, device, gen) if with_bias else None
    grad_bias = None
    if with_grad_bias:  # the key_mask path: bias = grad_bias + log M
        grad_bias = make_bias("finite", 2, 11, dtype, device, gen)
        mask = make_mask(2, 11, device, gen)
        bias = torch.log(mask) + (grad_bias if bias is None else bias)
    out, lse = atp_attention(q, k, v, bias, causal=True, return_lse=True)
    do, dlse = upstream(out, lse, gen)
    args = (do, dlse if with_grad_lse else None, q, k, v, bias, out, lse, True, 0.35, False)
    opcheck(torch.ops.atp_ops.attention_bwd, args + ((grad_bias,) if with_grad_bias else ()))


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck_key_mask_bias(device, with_bias):
    gen = torch.Generator().manual_seed(30)
    dtype, d = pick(OP, device, torch.float32, 8)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, 7, 11, d, dtype, "blhd", device, gen)
    bias = make_bias("neg_inf", 2, 11, dtype, device, gen) if with_bias else None
    mask = make_mask(2, 11, device, gen)
    opcheck(torch.ops.atp_ops.key_mask_bias, (q, k, v, bias, mask))
    expected = torch.log(mask) if bias is None else bias + torch.log(mask)
    assert torch.equal(torch.ops.atp_ops.key_mask_bias(q, k, v, bias, mask), expected)


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("inputs", ["key_bias", "key_bias+key_mask", "key_mask"])
def test_torch_compile_fullgraph(device, backend, inputs):
    gen = torch.Generator().manual_seed(31)
    dtype, d = pick(OP, device, torch.float32, 16)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, 9, 20, d, dtype, "blhd", device, gen)
    bias = make_bias("neg_inf", 2, 20, dtype, device, gen) if "key_bias" in inputs else None
    mask = make_mask(2, 20, device, gen) if "key_mask" in inputs else None

    def step(q, k, v, bias, mask):
        out, lse = atp_attention(q, k, v, bias, key_mask=mask, causal=True, return_lse=True)
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        return (out * out).sum() + finite_lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    ins_c = [leaf(t) for t in (q, k, v, bias, mask)]
    ins_e = [leaf(t) for t in (q, k, v, bias, mask)]
    loss_c = compiled(*ins_c)
    loss_c.backward()
    loss_e = step(*ins_e)
    loss_e.backward()
    # float16 out: the compiled and eager sums of out * out may round differently.
    torch.testing.assert_close(loss_c, loss_e, **({} if dtype == torch.float32 else same_tol(dtype)))
    for a, b in zip(ins_c, ins_e):
        if a is not None:
            torch.testing.assert_close(a.grad, b.grad)


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = torch.Generator().manual_seed(37)
    q, k, v = make_qkv(1, 2, 2, 5, 8, 16, torch.float64, "contiguous", "cpu", gen)
    torch.testing.assert_close(atp_attention(q, k, v), atp_attention(q, k, v, scale=0.25), rtol=0, atol=0)
    assert not torch.allclose(atp_attention(q, k, v), atp_attention(q, k, v, scale=0.5))

