"""atp_scores (DESIGN §3.2, paper Eq. 3-4) against reference.scores_ref and by-hand column means.

Every test runs on "cpu" and "cuda" (skipped without a GPU). What the CPU runs is fixed. CUDA's
scores kernel takes float16/bfloat16/float32 with head dims up to 256, its attention kernel only
float16/bfloat16 with head dims 64/96/128 (conftest.DTYPES_FOR / HEAD_DIMS_FOR): on CUDA a float64
case runs at a supported dtype instead (conftest.pick), and where the CUDA attention kernel
cannot produce lse for the case, lse comes from reference.attention_ref (float32, on the GPU),
so the scores kernel is still the thing tested.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from atp_ops import atp_attention, atp_scores, reference
from conftest import SCORES_DEVICES, bias_dtype, dtypes_for, head_dims_for, make_bias, make_qkv, pick, supported

NEG_INF = float("-inf")
TOL = dict(rtol=1e-4, atol=1e-6)
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
HEAD_DIMS = (8, 16, 64, 128)
OP = "scores"  # conftest's name for atp_scores' kernel


def attention_lse(q, k, v, key_bias, causal=True, scale=None):
    """The lse of atp_attention (out discarded), as the scores take it. Where the device has no
    attention kernel for q's dtype and head dim (CUDA with float32 or D not in 64/96/128), the
    reference's lse instead: float32 (compute_dtype) on q's device, what atp_attention returns."""
    if supported("attention", q.device, q.dtype, q.shape[-1]):
        return atp_attention(q, k, v, key_bias, causal=causal, scale=scale, return_lse=True)[1]
    return reference.attention_ref(q, k, v, key_bias, causal=causal, scale=scale, return_lse=True)[1]


def vision_text_weights(b, lq, v0, v1, device, dtype=torch.float32):
    """w_self = indicator of the vision rows [v0, v1); w_cross = indicator of the text rows after."""
    w_self = torch.zeros(b, lq, dtype=dtype, device=device)
    w_self[:, v0:v1] = 1
    w_cross = torch.zeros(b, lq, dtype=dtype, device=device)
    w_cross[:, v1:] = 1
    return w_self, w_cross


def expand_kv(q, k):
    return k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)


# ----------------------------------------------------------------------------------------------
# against the reference


@st.composite
def score_cases(draw, device):
    """A case the scores kernel of `device` supports: the CPU draws from every dtype, CUDA from
    float32/float16/bfloat16 (head dims 8..128 are all <= 256); the rest of the draw is the same."""
    causal = draw(st.booleans())
    lq = draw(st.sampled_from([1, 2, 17, 64, 65, 129]))
    lk = draw(st.one_of(st.sampled_from([0, 1, 30]).map(lambda e: lq + e),
                        st.sampled_from([256, 257, 300, 600]),
                        # Lq > Lk: causal top rows see nothing and must contribute nothing.
                        st.sampled_from([1, 5]).map(lambda lk: min(lk, lq))))
    return dict(
        b=draw(st.integers(1, 3)),
        heads=draw(st.sampled_from([(4, 1), (4, 2), (2, 2), (1, 1)])),
        lq=lq, lk=lk,
        d=draw(st.sampled_from(head_dims_for(OP, device, HEAD_DIMS))),
        dtype=draw(st.sampled_from(dtypes_for(OP, device, DTYPES))),
        causal=causal,
        layout=draw(st.sampled_from(["contiguous", "blhd", "last_dim_strided", "mixed"])),
        bias=draw(st.sampled_from(["none", "finite", "neg_inf", "dead_sample"])),
        weights=draw(st.sampled_from(["indicator", "random", "soft_vision", "zero_sample"])),
        w_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
        scale=draw(st.sampled_from([None, 0.2])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_weights(kind, b, lq, key_bias, dtype, device, gen):
    v1 = max(1, (2 * lq) // 3)
    w_self, w_cross = vision_text_weights(b, lq, 0, v1, device, dtype)
    if kind == "random":
        w_self = torch.rand(b, lq, generator=gen, dtype=torch.float64).to(dtype).to(device)
        w_cross = torch.rand(b, lq, generator=gen, dtype=torch.float64).to(dtype).to(device)
        w_cross[w_cross < 0.5] = 0  # only some rows recomputed
    elif kind == "soft_vision" and key_bias is not None and key_bias.shape[1] >= lq:
        # DESIGN: vision rows weighted by their current soft mask exp(key_bias) (0 where removed).
        w_self = w_self * torch.exp(key_bias[:, -lq:].to(dtype))
    elif kind == "zero_sample":
        w_self[0] = 0
        w_cross[-1] = 0
    return w_self, w_cross


@pytest.mark.parametrize("device", SCORES_DEVICES)
@given(data=st.data())
def test_scores_match_reference(device, data):
    case = data.draw(score_cases(device), label="case")
    gen = torch.Generator().manual_seed(case["seed"])
    hq, hkv = case["heads"]
    b, lq, lk = case["b"], case["lq"], case["lk"]
    q, k, v = make_qkv(b, hq, hkv, lq, lk, case["d"], case["dtype"], case["layout"], device, gen)
    key_bias = make_bias(case["bias"], b, lk, case["dtype"], device, gen)
    lse = attention_lse(q, k, v, key_bias, causal=case["causal"], scale=case["scale"])
    w_self, w_cross = make_weights(case["weights"], b, lq, key_bias, case["w_dtype"], device, gen)

    s_self, s_cross = atp_scores(q, k, lse, key_bias, w_self, w_cross, causal=case["causal"],
                                 scale=case["scale"])
    r_self, r_cross = reference.scores_ref(q, k, lse, key_bias, w_self, w_cross, causal=case["causal"],
                                           scale=case["scale"])
    for got in (s_self, s_cross):
        assert got.dtype == torch.float32 and got.shape == (b, lk) and got.device == q.device
        assert torch.isfinite(got).all()
    torch.testing.assert_close(s_self, r_self.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_cross, r_cross.float(), **TOL)
    if case["weights"] == "zero_sample":
        assert torch.equal(s_self[0], torch.zeros_like(s_self[0]))
        assert torch.equal(s_cross[-1], torch.zeros_like(s_cross[-1]))


# ----------------------------------------------------------------------------------------------
# by hand, from the materialised maps


@pytest.mark.parametrize("device", SCORES_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 2), (2, 2), (4, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_equal_column_means_of_the_maps(device, causal, heads, dtype):
    b, lq, lk, d = 2, 70, 300, 16
    dtype, d = pick(OP, device, dtype, d)  # CUDA: float64 -> bfloat16 (float32 and D = 16 as given)
    hq, hkv = heads
    gen = torch.Generator().manual_seed(hq * 10 + hkv + causal)
    q, k, v = make_qkv(b, hq, hkv, lq, lk, d, dtype, "blhd", device, gen)
    key_bias = torch.randn(b, lk, generator=gen, dtype=torch.float64)
    key_bias[:, 1::5] = NEG_INF
    key_bias = key_bias.to(bias_dtype(dtype)).to(device)
    # A LLaVA-like row layout: system rows, vision rows, text rows.
    v0, v1 = 5, 50
    w_self, w_cross = vision_text_weights(b, lq, v0, v1, device)
    lse = attention_lse(q, k, v, key_bias, causal=causal)
    s_self, s_cross = atp_scores(q, k, lse, key_bias, w_self, w_cross, causal=causal)

    q64, k64, kb64 = q.double(), expand_kv(q, k).double(), key_bias.double()
    raw = torch.einsum("bhmd,bhnd->bhmn", q64, k64) / math.sqrt(d)
    # Eq. 3: raw logits (no bias, no causal mask), mean over the vision rows, then over heads.
    self_hand = raw[:, :, v0:v1, :].mean(dim=2).mean(dim=1)
    # Eq. 4: the probabilities the layer used (bias + causal mask), mean over the text rows.
    logits = raw + kb64[:, None, None, :]
    if causal:
        visible = torch.arange(lk, device=device)[None, :] <= torch.arange(lq, device=device)[:, None] + lk - lq
        logits = logits.masked_fill(~visible, NEG_INF)
    probs = torch.softmax(logits, dim=-1)
    cross_hand = probs[:, :, v1:, :].mean(dim=2).mean(dim=1)

    torch.testing.assert_close(s_self, self_hand.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_cross, cross_hand.float(), **TOL)
    # The text rows' probabilities each sum to 1, so the cross score of a sample sums to 1, and
    # removed keys get exactly 0.
    torch.testing.assert_close(s_cross.double().sum(-1), torch.ones(b, dtype=torch.float64, device=device),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(s_cross[:, 1::5], torch.zeros_like(s_cross[:, 1::5]))


@pytest.mark.parametrize("device", SCORES_DEVICES)
def test_s_self_is_invariant_to_weight_scale_and_linear_in_q(device):
    gen = torch.Generator().manual_seed(41)
    dtype, d = pick(OP, device, torch.float64, 16, dtype_for_device=torch.float32)  # CUDA: float32
    q, k, v = make_qkv(2, 4, 2, 20, 40, d, dtype, "contiguous", device, gen)
    lse = attention_lse(q, k, v, None)
    w = torch.rand(2, 20, generator=gen, dtype=torch.float64).to(device)
    s1, c1 = atp_scores(q, k, lse, None, w, w)
    s2, c2 = atp_scores(q, k, lse, None, 7.5 * w, 7.5 * w)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(c1, c2, rtol=1e-6, atol=1e-7)
    s3, _ = atp_scores(2 * q, k, lse, None, w, w)  # lse is not used by Eq. 3
    torch.testing.assert_close(s3, 2 * s1, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", SCORES_DEVICES)
def test_zero_weight_sum_gives_zero_scores(device):
    gen = torch.Generator().manual_seed(43)
    q, k, v = make_qkv(3, 4, 2, 17, 30, 8, torch.float32, "contiguous", device, gen)
    lse = attention_lse(q, k, v, None)
    w_self, w_cross = vision_text_weights(3, 17, 0, 10, device)
    w_self[1] = 0
    w_cross[2] = 0
    s_self, s_cross = atp_scores(q, k, lse, None, w_self, w_cross)
    assert torch.equal(s_self[1], torch.zeros(30, device=device))
    assert torch.equal(s_cross[2], torch.zeros(30, device=device))
    # The other samples are untouched by their neighbours' zero weights.
    r_self, r_cross = reference.scores_ref(q, k, lse, None, w_self, w_cross)
    torch.testing.assert_close(s_self, r_self, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(s_cross, r_cross, **TOL)
    assert s_self[0].abs().sum() > 0 and s_cross[0].abs().sum() > 0


@pytest.mark.parametrize("device", SCORES_DEVICES)
def test_rows_that_saw_nothing_contribute_nothing(device):
    """A fully masked sample (lse = -inf on every row) gets s_cross = 0, never NaN."""
    gen = torch.Generator().manual_seed(47)
    q, k, v = make_qkv(2, 2, 2, 9, 12, 8, torch.float32, "contiguous", device, gen)
    key_bias = torch.zeros(2, 12, device=device)
    key_bias[1] = NEG_INF
    lse = attention_lse(q, k, v, key_bias)
    w = torch.ones(2, 9, device=device)
    s_self, s_cross = atp_scores(q, k, lse, key_bias, w, w)
    assert torch.isfinite(s_self).all() and torch.isfinite(s_cross).all()
    assert torch.equal(s_cross[1], torch.zeros_like(s_cross[1]))
    assert s_self[1].abs().sum() > 0  # Eq. 3 uses raw logits: no mask


# ----------------------------------------------------------------------------------------------
# gradient, opcheck


def _weighted_loss(s_self, s_cross, g_self, g_cross):
    return (s_self.double() * g_self).sum() + (s_cross.double() * g_cross).sum()


@pytest.mark.parametrize("device", SCORES_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads,lq,lk", [((4, 2), 9, 12), ((2, 2), 7, 7), ((4, 1), 12, 9)])
@pytest.mark.parametrize("weights", ["random", "zero_sample"])
def test_scores_gradient_matches_reference(device, causal, heads, lq, lk, weights):
    """d(g_self . s_self + g_cross . s_cross) in q, k and key_bias against autograd of the
    materialised-map reference, its lse recomputed from the same q, k and key_bias: the op's
    backward (scores_bwd) is the derivative with lse as the function of them it is, and gives
    none to the lse tensor."""
    gen = torch.Generator().manual_seed(67 + lq)
    dtype, d = pick(OP, device, torch.float64, 8)  # CUDA: bfloat16 -> compared at its tolerance
    q, k, v = make_qkv(2, *heads, lq, lk, d, dtype, "blhd", device, gen)
    key_bias = make_bias("neg_inf", 2, lk, bias_dtype(dtype), device, gen)
    lse = attention_lse(q, k, v, key_bias, causal=causal).requires_grad_(True)
    w_self, w_cross = make_weights(weights, 2, lq, key_bias, torch.float32, device, gen)
    g_self, g_cross = (torch.randn(2, lk, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    leaves = [t.detach().requires_grad_(True) for t in (q, k, key_bias)]
    q_, k_, b_ = leaves
    got = torch.autograd.grad(_weighted_loss(*atp_scores(q_, k_, lse, b_, w_self, w_cross, causal=causal),
                                             g_self, g_cross), leaves + [lse], allow_unused=True)
    assert got[3] is None, "the lse tensor gets no gradient"
    qr, kr, br = ref_leaves = [t.detach().double().requires_grad_(True) for t in (q, k, key_bias)]
    _, lse_r = reference.attention_ref(qr, kr, v.double(), br, causal=causal, return_lse=True)
    want = torch.autograd.grad(_weighted_loss(*reference.scores_ref(qr, kr, lse_r, br, w_self, w_cross,
                                                                    causal=causal), g_self, g_cross), ref_leaves)
    tol = dict(rtol=1e-5, atol=1e-7) if dtype in (torch.float32, torch.float64) else dict(rtol=2e-2, atol=2e-3)
    for name, a, b, leaf in zip(("q", "k", "key_bias"), got, want, leaves):
        assert a.dtype == leaf.dtype, name
        torch.testing.assert_close(a.double(), b, **tol, msg=lambda m: f"d{name}: {m}")
    assert all(float(g.abs().max()) > 0 for g in got[:2])


@pytest.mark.parametrize("device", SCORES_DEVICES)
def test_scores_gradient_with_the_attentions_lse(device):
    """Attention then scores, as a score layer runs them, lse passed on with its graph: the
    scores add their own gradient to q and k once (none through the lse tensor), and the sum is
    the derivative of the reference chain."""
    gen = torch.Generator().manual_seed(71)
    dtype, d = pick(("attention", OP), device, torch.float64, 8)  # CUDA: bfloat16, D = 64
    q, k, v = (t.requires_grad_(True) for t in make_qkv(2, 4, 2, 10, 10, d, dtype, "blhd", device, gen))
    key_bias = make_bias("neg_inf", 2, 10, bias_dtype(dtype), device, gen)
    w_self, w_cross = vision_text_weights(2, 10, 0, 6, device)
    g_self, g_cross = (torch.randn(2, 10, generator=gen, dtype=torch.float64).to(device) for _ in range(2))
    out, lse = atp_attention(q, k, v, key_bias, return_lse=True)
    got = torch.autograd.grad(_weighted_loss(*atp_scores(q, k, lse, key_bias, w_self, w_cross), g_self, g_cross),
                              (q, k))
    qr, kr, vr = (t.detach().double().requires_grad_(True) for t in (q, k, v))
    _, lse_r = reference.attention_ref(qr, kr, vr, key_bias.double(), return_lse=True)
    want = torch.autograd.grad(_weighted_loss(*reference.scores_ref(qr, kr, lse_r, key_bias, w_self, w_cross),
                                              g_self, g_cross), (qr, kr))
    tol = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float64 else dict(rtol=3e-2, atol=3e-3)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, **tol)


@pytest.mark.parametrize("device", SCORES_DEVICES)
def test_row_weights_get_no_gradient_and_detached_inputs_give_constant_scores(device):
    gen = torch.Generator().manual_seed(53)
    dtype, d = pick(("attention", OP), device, torch.float32, 8)  # CUDA: float16, D = 64
    q, k, v = (t.requires_grad_(True) for t in make_qkv(2, 4, 2, 9, 12, d, dtype, "blhd", device, gen))
    key_bias = torch.randn(2, 12, generator=gen).to(device).requires_grad_(True)
    out, lse = atp_attention(q, k, v, key_bias, return_lse=True)
    w_self = torch.rand(2, 9, device=device, requires_grad=True)
    w_cross = torch.rand(2, 9, device=device, requires_grad=True)
    s_self, s_cross = atp_scores(q, k, lse, key_bias, w_self, w_cross)
    assert s_self.requires_grad and s_cross.requires_grad
    (s_self.sum() + s_cross.sum()).backward()
    assert w_self.grad is None and w_cross.grad is None
    assert q.grad is not None and k.grad is not None and key_bias.grad is not None
    s_self, s_cross = atp_scores(q.detach(), k.detach(), lse.detach(), key_bias.detach(), w_self.detach(),
                                 w_cross.detach())
    assert s_self.grad_fn is None and s_cross.grad_fn is None


def _score_args(device, requires_grad):
    gen = torch.Generator().manual_seed(59)
    q, k, v = make_qkv(2, 4, 2, 7, 11, 8, torch.float32, "blhd", device, gen)
    key_bias = make_bias("neg_inf", 2, 11, torch.float32, device, gen)
    lse = attention_lse(q, k, v, key_bias)
    w_self, w_cross = vision_text_weights(2, 7, 0, 4, device)
    args = [q, k, lse, key_bias, w_self, w_cross]
    if requires_grad:
        args = [t.detach().requires_grad_(i in (0, 1, 3)) for i, t in enumerate(args)]
    return args


@pytest.mark.parametrize("device", SCORES_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck_scores(device, causal, requires_grad):
    args = _score_args(device, requires_grad)
    opcheck(torch.ops.atp_ops.scores, (*args, causal, 0.35))


@pytest.mark.parametrize("device", SCORES_DEVICES)
@pytest.mark.parametrize("causal", [False, True])
def test_opcheck_scores_bwd(device, causal):
    args = _score_args(device, requires_grad=False)
    gen = torch.Generator().manual_seed(61)
    grads = [torch.randn(2, 11, generator=gen).to(device) for _ in range(2)]
    opcheck(torch.ops.atp_ops.scores_bwd, (*grads, *args, causal, 0.35))


@pytest.mark.parametrize("device", SCORES_DEVICES)
def test_torch_compile_attention_then_scores(device):
    gen = torch.Generator().manual_seed(61)
    dtype, d = pick(("attention", OP), device, torch.float32, 16)  # CUDA: float16, D = 64
    q, k, v = make_qkv(2, 4, 2, 9, 20, d, dtype, "blhd", device, gen)
    key_bias = make_bias("neg_inf", 2, 20, dtype, device, gen)
    w_self, w_cross = vision_text_weights(2, 9, 0, 6, device)

    def layer(q, k, v, key_bias):
        out, lse = atp_attention(q, k, v, key_bias, return_lse=True)
        s_self, s_cross = atp_scores(q, k, lse, key_bias, w_self, w_cross)
        return out, s_self, s_cross

    torch._dynamo.reset()
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, v, key_bias)
    for a, b in zip(got, layer(q, k, v, key_bias)):
        torch.testing.assert_close(a, b)
