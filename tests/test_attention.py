"""atp_attention against reference.attention_ref (DESIGN §3.1): forward, lse and every gradient.

Every test runs on "cpu" and "cuda" (skipped without a GPU). What the CPU runs is fixed; on CUDA,
which supports only float16/bfloat16 with head dims 64 and 128 (conftest.DTYPES_FOR /
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
from hypothesis import given
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


def forward_backward(fn, q, k, v, key_bias, do, dlse, use_lse, **kw):
    """out, lse and grads (q, k, v, key_bias) of sum(out * do) [+ sum(finite lse * dlse)]."""
    q, k, v, key_bias = leaf(q), leaf(k), leaf(v), leaf(key_bias)
    out, lse = fn(q, k, v, key_bias, return_lse=True, **kw)
    loss = (out * do.to(out.dtype)).sum()
    if use_lse:
        finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        loss = loss + (finite_lse * dlse.to(lse.dtype)).sum()
    inputs = [t for t in (q, k, v, key_bias) if t is not None]
    grads = torch.autograd.grad(loss, inputs)
    grads = list(grads) + ([None] if key_bias is None else [])
    return out, lse, grads


def check_against_reference(q, k, v, key_bias, causal, scale, use_lse, gen):
    """Kernel vs reference under FlashAttention's rule (fp16/bf16) or a float64 reference."""
    dtype = q.dtype
    out0, lse0 = atp_attention(q, k, v, key_bias, causal=causal, scale=scale, return_lse=True)
    do, dlse = upstream(out0, lse0, gen)
    got = forward_backward(atp_attention, q, k, v, key_bias, do, dlse, use_lse, causal=causal, scale=scale)

    ref_dtype = torch.float32 if dtype in LOW_PRECISION else torch.float64
    up = lambda t, dt=ref_dtype: None if t is None else t.detach().to(dt)  # noqa: E731
    ref = forward_backward(reference.attention_ref, up(q), up(k), up(v),
                           up(key_bias, torch.float64 if ref_dtype == torch.float64 else torch.float32),
                           up(do), up(dlse), use_lse, causal=causal, scale=scale)
    lowp = None
    if dtype in LOW_PRECISION:
        lowp = forward_backward(reference.attention_ref, q, k, v, key_bias, do, dlse, use_lse,
                                causal=causal, scale=scale, upcast=False)

    assert got[0].dtype == dtype and got[0].shape == q.shape
    assert got[1].dtype == bias_dtype(dtype) and got[1].shape == q.shape[:3]
    names = ("dq", "dk", "dv", "d_key_bias")
    assert_close_fa("out", got[0], ref[0], None if lowp is None else lowp[0])
    # lse is float32 for fp16/bf16 q, computed in fp32 by the kernel: compare to the fp32 path.
    assert_close_fa("lse", got[1], ref[1])
    for name, g, r, i in zip(names, got[2], ref[2], range(4)):
        if r is None:
            assert g is None
            continue
        assert g.dtype == (key_bias.dtype if name == "d_key_bias" else dtype)
        assert g.shape == (key_bias.shape if name == "d_key_bias" else (q, k, v)[i].shape)
        assert_close_fa(name, g, r, None if lowp is None else lowp[2][i])
    return got


# ----------------------------------------------------------------------------------------------
# property test against the reference


@st.composite
def attention_cases(draw, device):
    """A case the kernel of `device` supports: the CPU draws from every dtype and HEAD_DIMS,
    CUDA from its float16/bfloat16 and head dims 64/128 (the rest of the draw is the same)."""
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
def test_backward_is_bitwise_deterministic(device, deterministic):
    # Both settings on both devices: atp_attention's docstring promises a deterministic backward
    # whatever use_deterministic_algorithms says (no kernel uses atomics).
    gen = torch.Generator().manual_seed(19)
    dtype, d = pick(OP, device, torch.float32, 32)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 1, 100, 400, d, dtype, "blhd", device, gen)  # 2 x 2 tiles
    bias = make_bias("neg_inf", 2, 400, dtype, device, gen)
    do = torch.randn(q.shape, generator=gen).to(device, dtype)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(deterministic)
    try:
        runs = []
        for _ in range(2):
            ins = [leaf(t) for t in (q, k, v, bias)]
            out, lse = atp_attention(*ins, return_lse=True)
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
def test_opcheck_attention_bwd(device, with_bias, with_grad_lse):
    gen = torch.Generator().manual_seed(29)
    dtype, d = pick(OP, device, torch.float32, 8)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, 7, 11, d, dtype, "contiguous", device, gen)
    bias = make_bias("neg_inf", 2, 11, dtype, device, gen) if with_bias else None
    out, lse = atp_attention(q, k, v, bias, causal=True, return_lse=True)
    do, dlse = upstream(out, lse, gen)
    opcheck(torch.ops.atp_ops.attention_bwd,
            (do, dlse if with_grad_lse else None, q, k, v, bias, out, lse, True, 0.35, False))


@pytest.mark.parametrize("device", ATTENTION_DEVICES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    gen = torch.Generator().manual_seed(31)
    dtype, d = pick(OP, device, torch.float32, 16)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, 9, 20, d, dtype, "blhd", device, gen)
    bias = make_bias("neg_inf", 2, 20, dtype, device, gen)

    def step(q, k, v, bias):
        out, lse = atp_attention(q, k, v, bias, causal=True, return_lse=True)
        return (out * out).sum() + lse.sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    ins_c = [leaf(t) for t in (q, k, v, bias)]
    ins_e = [leaf(t) for t in (q, k, v, bias)]
    loss_c = compiled(*ins_c)
    loss_c.backward()
    loss_e = step(*ins_e)
    loss_e.backward()
    # float16 out: the compiled and eager sums of out * out may round differently.
    torch.testing.assert_close(loss_c, loss_e, **({} if dtype == torch.float32 else same_tol(dtype)))
    for a, b in zip(ins_c, ins_e):
        torch.testing.assert_close(a.grad, b.grad)


def test_default_scale_is_inverse_sqrt_head_dim():
    gen = torch.Generator().manual_seed(37)
    q, k, v = make_qkv(1, 2, 2, 5, 8, 16, torch.float64, "contiguous", "cpu", gen)
    torch.testing.assert_close(atp_attention(q, k, v), atp_attention(q, k, v, scale=0.25), rtol=0, atol=0)
    assert not torch.allclose(atp_attention(q, k, v), atp_attention(q, k, v, scale=0.5))

