"""CUDA-only checks of atp_attention / atp_scores that the device-parametrised suites do not make.

The shared suites (test_attention.py, test_scores.py) run most cases on both devices with small
head dims; the CUDA kernels support fp16/bf16 with head dims 64, 96 and 128 only, so the cases here
use those: FlashAttention's error rule at realistic shapes, the split-K decode path, bitwise
repeatability of the backward, misaligned views, and the error messages of what CUDA rejects.
Everything skips cleanly without a GPU.
"""
from __future__ import annotations

import pytest
import torch

import atp_ops
from atp_ops import atp_attention, atp_scores, reference
from conftest import assert_close_fa, leaf, make_bias, make_qkv

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and atp_ops.has_cuda_kernels("attention_fwd")
         and atp_ops.has_cuda_kernels("attention_bwd") and atp_ops.has_cuda_kernels("scores")),
    reason="needs a CUDA device and a build with the CUDA attention kernels")

LOW = (torch.float16, torch.bfloat16)


def _grads(fn, q, k, v, key_bias, do, dlse, **kw):
    """out, lse and d(q, k, v, key_bias) of sum(out * do) + sum(finite lse * dlse)."""
    q, k, v, key_bias = leaf(q), leaf(k), leaf(v), leaf(key_bias)
    out, lse = fn(q, k, v, key_bias, return_lse=True, **kw)
    finite = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    loss = (out * do.to(out.dtype)).sum() + (finite * dlse.to(lse.dtype)).sum()
    inputs = [t for t in (q, k, v, key_bias) if t is not None]
    grads = list(torch.autograd.grad(loss, inputs)) + ([None] if key_bias is None else [])
    return out, lse, grads


def _check(q, k, v, key_bias, causal, backward=True, seed=0):
    """Kernel vs the fp32 reference, with twice PyTorch's own low-precision error as budget."""
    gen = torch.Generator().manual_seed(seed)
    out, lse = atp_attention(q, k, v, key_bias, causal=causal, return_lse=True)
    up = lambda t: None if t is None else t.detach().float()  # noqa: E731
    if not backward:
        ref_out, ref_lse = reference.attention_ref(up(q), up(k), up(v), up(key_bias), causal=causal,
                                                   return_lse=True)
        lowp_out = reference.attention_ref(q, k, v, key_bias, causal=causal, upcast=False)
        assert_close_fa("out", out, ref_out, lowp_out)
        assert_close_fa("lse", lse, ref_lse)
        return out, lse
    do = torch.randn(out.shape, generator=gen).to(out.device, out.dtype)
    dlse = torch.randn(lse.shape, generator=gen).to(lse.device)
    got = _grads(atp_attention, q, k, v, key_bias, do, dlse, causal=causal)
    ref = _grads(reference.attention_ref, up(q), up(k), up(v), up(key_bias), up(do), dlse, causal=causal)
    lowp = _grads(reference.attention_ref, q, k, v, key_bias, do, dlse, causal=causal, upcast=False)
    assert_close_fa("out", got[0], ref[0], lowp[0])
    assert_close_fa("lse", got[1], ref[1])
    for name, g, r, lp in zip(("dq", "dk", "dv", "d_key_bias"), got[2], ref[2], lowp[2]):
        if r is None:
            assert g is None
            continue
        assert_close_fa(name, g, r, lp)
    return got


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq,lk", [(1, 1), (17, 129), (64, 64), (129, 100), (200, 1000)])
def test_fa_error_rule(dtype, d, causal, lq, lk):
    gen = torch.Generator().manual_seed(lq * 1000 + lk + d)
    q, k, v = make_qkv(2, 4, 2, lq, lk, d, dtype, "mixed", "cuda", gen)
    key_bias = make_bias("neg_inf", 2, lk, dtype, "cuda", gen)
    _check(q, k, v, key_bias, causal)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_gqa_and_no_bias(dtype, heads):
    hq, hkv = heads
    gen = torch.Generator().manual_seed(hq * 10 + hkv)
    q, k, v = make_qkv(1, hq, hkv, 77, 190, 64, dtype, "blhd", "cuda", gen)
    _check(q, k, v, None, causal=True)


@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lq", [1, 4, 16])
def test_decode_split_k(dtype, causal, lq):
    """Lq <= 16 against a long cache takes the split-K path (partial results + combine);
    -inf slots in key_bias are pruned tokens."""
    b, hq, hkv, lk, d = 8, 32, 8, 2880, 128
    gen = torch.Generator().manual_seed(lq)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, "contiguous", "cuda", gen)
    key_bias = make_bias("neg_inf", b, lk, dtype, "cuda", gen)
    key_bias[:, 1000:2000] = float("-inf")  # a whole split's worth of removed keys
    _check(q, k, v, key_bias, causal, backward=False)


def test_decode_split_k_dead_sample():
    """A sample whose every key is removed: out 0 and lse -inf through the combine kernel."""
    gen = torch.Generator().manual_seed(5)
    q, k, v = make_qkv(2, 8, 8, 1, 2880, 64, torch.bfloat16, "contiguous", "cuda", gen)
    key_bias = make_bias("dead_sample", 2, 2880, torch.bfloat16, "cuda", gen)
    out, lse = atp_attention(q, k, v, key_bias, return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[1]).all() and torch.isfinite(lse[0]).all()
    assert not torch.isnan(out).any()


@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_have_zero_output_and_gradients(causal):
    gen = torch.Generator().manual_seed(3)
    q, k, v = make_qkv(2, 4, 2, 70, 300, 64, torch.float16, "contiguous", "cuda", gen)
    key_bias = make_bias("dead_sample", 2, 300, torch.float16, "cuda", gen)
    out, lse, grads = _check(q, k, v, key_bias, causal)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isneginf(lse[1]).all()
    for g in grads:
        assert not torch.isnan(g).any()
        assert torch.equal(g[1], torch.zeros_like(g[1]))


def test_causal_more_queries_than_keys():
    """Bottom-right alignment with Lq > Lk: the first Lq - Lk rows see nothing."""
    gen = torch.Generator().manual_seed(4)
    q, k, v = make_qkv(1, 2, 2, 150, 40, 64, torch.bfloat16, "contiguous", "cuda", gen)
    out, lse, _ = _check(q, k, v, None, causal=True)
    assert torch.isneginf(lse[:, :, :110]).all() and torch.isfinite(lse[:, :, 110:]).all()
    assert torch.equal(out[:, :, :110], torch.zeros_like(out[:, :, :110]))


def test_misaligned_views_are_handled():
    """Views whose base is not 16-byte aligned or whose strides are odd get copied on the host."""
    gen = torch.Generator().manual_seed(6)
    big = torch.randn(2, 4, 50, 129, generator=gen).to("cuda", torch.float16)
    q = big[..., 1:]                          # last dim contiguous, base off by 2 bytes, row stride 129
    k = big[:, :2, :, :128].contiguous()[..., :]
    v = big[:, 2:, :, 1:]
    _check(q, k, v, None, causal=False)


def test_backward_is_bitwise_deterministic_over_10_runs():
    gen = torch.Generator().manual_seed(7)
    q, k, v = make_qkv(2, 8, 2, 300, 700, 128, torch.bfloat16, "blhd", "cuda", gen)
    key_bias = make_bias("neg_inf", 2, 700, torch.bfloat16, "cuda", gen)
    do = torch.randn(q.shape, generator=gen).to("cuda", q.dtype)
    first = None
    for _ in range(10):
        ins = [leaf(t) for t in (q, k, v, key_bias)]
        out, lse = atp_attention(*ins, return_lse=True)
        torch.autograd.backward([out, lse], [do, torch.ones_like(lse)])
        run = [out.detach(), lse.detach()] + [t.grad for t in ins]
        if first is None:
            first = run
        else:
            for a, b in zip(first, run):
                assert torch.equal(a, b)


def test_scores_head_dim_128_matches_reference_and_cpu():
    gen = torch.Generator().manual_seed(8)
    b, hq, hkv, lq, lk, d = 2, 8, 2, 90, 700, 128
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, torch.bfloat16, "blhd", "cuda", gen)
    key_bias = make_bias("neg_inf", b, lk, torch.bfloat16, "cuda", gen)
    _, lse = atp_attention(q, k, v, key_bias, return_lse=True)
    w_self = torch.zeros(b, lq, device="cuda")
    w_self[:, 10:60] = 1.0
    w_cross = torch.zeros(b, lq, device="cuda")
    w_cross[0, 60:] = 1.0
    w_cross[1, 70:80] = 0.5  # different row counts per sample
    s_self, s_cross = atp_scores(q, k, lse, key_bias, w_self, w_cross)
    r_self, r_cross = reference.scores_ref(q, k, lse, key_bias, w_self, w_cross)
    torch.testing.assert_close(s_self, r_self, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(s_cross, r_cross, rtol=1e-3, atol=1e-5)
    c_self, c_cross = atp_scores(q.cpu(), k.cpu(), lse.cpu(), key_bias.cpu(), w_self.cpu(), w_cross.cpu())
    torch.testing.assert_close(s_cross.cpu(), c_cross, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(s_self.cpu(), c_self, rtol=2e-3, atol=2e-3)


def test_scores_without_selected_rows_are_zero():
    gen = torch.Generator().manual_seed(9)
    q, k, v = make_qkv(2, 4, 4, 20, 70, 64, torch.float16, "contiguous", "cuda", gen)
    _, lse = atp_attention(q, k, v, return_lse=True)
    w = torch.zeros(2, 20, device="cuda")
    s_self, s_cross = atp_scores(q, k, lse, None, w, w)
    assert torch.equal(s_cross, torch.zeros_like(s_cross))
    assert torch.equal(s_self, torch.zeros_like(s_self))


@pytest.mark.parametrize("d", [16, 80, 256])
def test_unsupported_head_dim_is_a_clear_error(d):
    q = torch.randn(1, 2, 8, d, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="head dim D = 64, 96 or 128"):
        atp_attention(q, q, q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_full_precision_on_cuda_is_a_clear_error(dtype):
    q = torch.randn(1, 2, 8, 64, device="cuda", dtype=dtype)
    with pytest.raises(RuntimeError, match="float16 or bfloat16.*CPU"):
        atp_attention(q, q, q)


def test_capture_in_a_cuda_graph_with_validation_on():
    """The value checks are skipped while a graph is being captured, so forward and backward
    with a key_bias capture and replay; the replay matches eager calls."""
    assert atp_ops.validation_enabled()
    gen = torch.Generator().manual_seed(12)
    q, k, v = make_qkv(2, 8, 2, 300, 700, 128, torch.bfloat16, "contiguous", "cuda", gen)
    key_bias = make_bias("neg_inf", 2, 700, torch.bfloat16, "cuda", gen)
    do = torch.randn(q.shape, generator=gen).to("cuda", q.dtype)
    ins = [leaf(t) for t in (q, k, v, key_bias)]

    def step():
        for t in ins:
            t.grad = None
        out = atp_attention(*ins)
        out.backward(do)
        return out

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):  # warm-up on a side stream, as torch.cuda.graph requires
            eager = step().detach().clone()
            eager_grads = [t.grad.clone() for t in ins]
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    for t in ins:
        t.grad = None
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)
    for t, g in zip(ins, eager_grads):
        assert torch.equal(t.grad, g)
