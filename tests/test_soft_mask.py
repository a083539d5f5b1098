"""atp_soft_mask / atp_hard_mask (paper Eq. 9-11, DESIGN §3.4) against the reference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.library import opcheck

from atp_ops import atp_hard_mask, atp_soft_mask, reference
from conftest import SOFT_MASK_DEVICES

NEG_INF = float("-inf")
DTYPES = (torch.float32, torch.float64)


def make_inputs(b, n, dtype, device, gen, *, spatial_1d=False, prev="none", strided=False):
    """s_red (B, N) in [0, 1] (min-max normalised scores), s_spatial (B, N) or (N,) in [0, 1],
    theta_r / theta_s (B,) in (0, 1), prev_bias None / finite log-mask / with -inf entries."""
    r = lambda *shape: torch.rand(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    s_red = r(n, b).t() if strided else r(b, n)  # strided: a column-major view
    s_spatial = r(n) if spatial_1d else r(b, n)
    theta_r, theta_s = r(b) * 0.8 + 0.1, r(b) * 0.8 + 0.1
    prev_bias = None
    if prev != "none":
        prev_bias = torch.log(r(b, n).clamp_min(1e-3))
        if prev == "neg_inf":
            prev_bias[r(b, n) < 0.3] = NEG_INF
    conv = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return conv(s_red), conv(s_spatial), conv(theta_r), conv(theta_s), conv(prev_bias)


def leaves(*ts):
    return [None if t is None else t.detach().requires_grad_(True) for t in ts]


# ----------------------------------------------------------------------------------------------
# against the reference


@st.composite
def mask_cases(draw):
    return dict(
        b=draw(st.integers(1, 5)),
        n=draw(st.sampled_from([1, 7, 31, 256, 576, 1000])),
        dtype=draw(st.sampled_from(DTYPES)),
        spatial_1d=draw(st.booleans()),
        prev=draw(st.sampled_from(["none", "finite", "neg_inf"])),
        strided=draw(st.booleans()),
        temperature=draw(st.sampled_from([0.5, 1.0, 10.0, 100.0, 1e4])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@given(case=mask_cases())
def test_soft_mask_matches_reference(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    inputs = make_inputs(case["b"], case["n"], case["dtype"], device, gen, spatial_1d=case["spatial_1d"],
                         prev=case["prev"], strided=case["strided"])
    temp = case["temperature"]
    got_in, ref_in = leaves(*inputs), leaves(*inputs)
    got = atp_soft_mask(*got_in[:4], temp, got_in[4])
    ref = reference.soft_mask_ref(*ref_in[:4], temp, ref_in[4])
    assert got.shape == (case["b"], case["n"]) and got.dtype == case["dtype"]
    assert not torch.isnan(got).any()
    tol = dict(rtol=1e-12, atol=1e-12) if case["dtype"] == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, ref, **tol)
    # A token removed before stays removed; the soft mask itself never reaches -inf.
    if inputs[4] is not None:
        assert torch.equal(torch.isneginf(got), torch.isneginf(inputs[4]))
    else:
        assert torch.isfinite(got).all()
        assert (got <= 0).all()

    g = torch.randn(got.shape, generator=gen, dtype=torch.float64).to(got.dtype).to(device)
    got_grads = torch.autograd.grad(got, [t for t in got_in if t is not None], g)
    ref_grads = torch.autograd.grad(ref, [t for t in ref_in if t is not None], g)
    for a, b in zip(got_grads, ref_grads):
        assert a.shape == b.shape and not torch.isnan(a).any()
        # theta (and a (N,) s_spatial) gradients are sums over tokens (or samples) of terms up
        # to |g| T / 4, summed in another order than the reference's: scale atol with that.
        terms = case["n"] if a.dim() == 1 and a.shape[0] == case["b"] else case["b"]
        torch.testing.assert_close(a, b, rtol=tol["rtol"] * 10,
                                   atol=tol["atol"] * max(1.0, temp) * terms ** 0.5)


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@given(case=mask_cases())
def test_hard_mask_matches_reference(device, case):
    gen = torch.Generator().manual_seed(case["seed"])
    s_red, s_sp, th_r, th_s, prev = make_inputs(case["b"], case["n"], case["dtype"], device, gen,
                                                spatial_1d=case["spatial_1d"], prev=case["prev"],
                                                strided=case["strided"])
    got = atp_hard_mask(s_red, s_sp, th_r, th_s, prev)
    ref = reference.hard_mask_ref(s_red, s_sp, th_r, th_s, prev)
    assert not torch.isnan(got).any()
    assert torch.equal(got, ref)
    keep = (s_red > th_r[:, None]) | (s_sp > th_s[:, None])
    if prev is not None:
        keep &= torch.isfinite(prev)
    assert torch.equal(torch.isfinite(got), keep)  # isfinite(result) is the keep mask
    if prev is None:
        assert torch.equal(got[keep], torch.zeros_like(got[keep]))


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_hard_mask_gradient_passes_prev_bias_where_kept(device, dtype):
    gen = torch.Generator().manual_seed(67)
    s_red, s_sp, th_r, th_s, prev = make_inputs(3, 50, dtype, device, gen, prev="neg_inf")
    ins = leaves(s_red, s_sp, th_r, th_s, prev)
    out = atp_hard_mask(*ins)
    g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    (d_prev,) = torch.autograd.grad(out, [ins[4]], g)
    # The identity where the scores keep the token (also where prev_bias is already -inf, as
    # torch.where in the reference routes it), 0 where the hard mask removes it.
    keep = (s_red > th_r[:, None]) | (s_sp > th_s[:, None])
    assert (~keep).any() and (keep & ~torch.isfinite(prev)).any()
    assert torch.equal(d_prev, torch.where(keep, g, torch.zeros_like(g)))
    ref_in = leaves(s_red, s_sp, th_r, th_s, prev)
    (d_ref,) = torch.autograd.grad(reference.hard_mask_ref(*ref_in), [ref_in[4]], g)
    assert torch.equal(d_prev, d_ref)


# ----------------------------------------------------------------------------------------------
# properties


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_neg_inf_token_stays_neg_inf(device, dtype):
    gen = torch.Generator().manual_seed(71)
    s_red, s_sp, th_r, th_s, prev = make_inputs(2, 40, dtype, device, gen, prev="finite")
    prev[:, ::3] = NEG_INF
    s_red[:, ::3] = 1.0  # even tokens that clear both thresholds now stay removed
    s_sp[:, ::3] = 1.0
    for temp in (0.1, 1.0, 1e3):
        soft = atp_soft_mask(s_red, s_sp, th_r, th_s, temp, prev)
        assert torch.isneginf(soft[:, ::3]).all()
        assert torch.isfinite(soft[:, 1::3]).all()
    hard = atp_hard_mask(s_red, s_sp, th_r, th_s, prev)
    assert torch.isneginf(hard[:, ::3]).all()
    # Pruning again with the same scores and the result as prev_bias changes nothing.
    assert torch.equal(atp_hard_mask(s_red, s_sp, th_r, th_s, hard), hard)


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_soft_mask_never_nan_at_extremes(device, dtype):
    b, n = 2, 9
    s_red = torch.tensor([[-1e30, -50.0, -1.0, 0.0, 0.5, 1.0, 50.0, 1e30, 0.3]] * b, dtype=dtype, device=device)
    s_sp = s_red.flip(-1).clone()
    th = torch.tensor([0.5, 0.3], dtype=dtype, device=device)
    prev = torch.zeros(b, n, dtype=dtype, device=device)
    prev[:, 0] = NEG_INF
    for temp in (1e-3, 1.0, 1e6):
        ins = leaves(s_red, s_sp, th, th, prev)
        out = atp_soft_mask(*ins[:4], temp, ins[4])
        assert not torch.isnan(out).any()
        assert torch.isneginf(out[:, 0]).all() and torch.isfinite(out[:, 1:]).all()
        grads = torch.autograd.grad(out.sum(), ins)
        for grad in grads:
            assert not torch.isnan(grad).any()


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_large_temperature_approaches_the_hard_mask(device, dtype):
    gen = torch.Generator().manual_seed(73)
    s_red, s_sp, th_r, th_s, _ = make_inputs(3, 500, dtype, device, gen)
    # Keep every score at least 0.02 away from its threshold so the limit is clean.
    far = ((s_red - th_r[:, None]).abs() > 0.02) & ((s_sp - th_s[:, None]).abs() > 0.02)
    hard_keep = torch.isfinite(atp_hard_mask(s_red, s_sp, th_r, th_s))
    errors = []
    for temp in (10.0, 100.0, 2000.0):
        m = torch.exp(atp_soft_mask(s_red, s_sp, th_r, th_s, temp))
        errors.append((m - hard_keep.to(dtype))[far].abs().max().item())
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 1e-12
    assert errors[0] > 1e-3  # at a small temperature the mask really is soft


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
def test_soft_mask_is_the_max_of_the_two_sigmoids(device):
    """Eq. 9-11 in plain (not log) space, by hand."""
    gen = torch.Generator().manual_seed(79)
    s_red, s_sp, th_r, th_s, prev = make_inputs(4, 100, torch.float64, device, gen, prev="finite")
    temp = 7.0
    m = torch.maximum(torch.sigmoid((s_red - th_r[:, None]) * temp), torch.sigmoid((s_sp - th_s[:, None]) * temp))
    got = atp_soft_mask(s_red, s_sp, th_r, th_s, temp, prev)
    torch.testing.assert_close(got, prev + torch.log(m), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
def test_spatial_1d_equals_broadcast_2d(device):
    gen = torch.Generator().manual_seed(83)
    s_red, s_sp, th_r, th_s, prev = make_inputs(3, 64, torch.float64, device, gen, spatial_1d=True, prev="finite")
    a = leaves(s_red, s_sp, th_r, th_s)
    b = leaves(s_red, s_sp.expand(3, 64).contiguous(), th_r, th_s)
    out_a = atp_soft_mask(*a, 5.0, prev)
    out_b = atp_soft_mask(*b, 5.0, prev)
    torch.testing.assert_close(out_a, out_b, rtol=0, atol=0)
    g = torch.randn(3, 64, generator=gen, dtype=torch.float64).to(device)
    ga = torch.autograd.grad(out_a, a, g)
    gb = torch.autograd.grad(out_b, b, g)
    assert ga[1].shape == (64,)
    torch.testing.assert_close(ga[1], gb[1].sum(0), rtol=1e-12, atol=1e-12)
    for x, y in zip(ga[2:], gb[2:]):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# gradcheck, opcheck, torch.compile


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@pytest.mark.parametrize("spatial_1d", [False, True])
@pytest.mark.parametrize("temperature", [0.7, 12.0])
def test_gradcheck(device, spatial_1d, temperature):
    gen = torch.Generator().manual_seed(89)
    ins = make_inputs(3, 17, torch.float64, device, gen, spatial_1d=spatial_1d, prev="finite")
    # Keep the two branches apart, so the max() kink is not within gradcheck's eps.
    s_red, s_sp, th_r, th_s, prev = ins
    a = (s_red - th_r[:, None]) * temperature
    b = (s_sp - th_s[:, None]) * temperature
    assert ((a - b).abs() > 1e-3).all()

    def fn(s_red, s_sp, th_r, th_s, prev):
        return atp_soft_mask(s_red, s_sp, th_r, th_s, temperature, prev)

    assert torch.autograd.gradcheck(fn, tuple(leaves(*ins)), eps=1e-7, atol=1e-7, rtol=1e-5)

    # Both branches must win somewhere, or one of them goes unchecked.
    won = a >= b
    assert won.any() and (~won).any()


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("prev", ["none", "neg_inf"])
def test_opcheck_soft_mask_fwd(device, hard, prev):
    gen = torch.Generator().manual_seed(97)
    ins = leaves(*make_inputs(2, 33, torch.float32, device, gen, spatial_1d=True, prev=prev))
    opcheck(torch.ops.atp_ops.soft_mask_fwd, (*ins[:4], 3.0, ins[4], hard))


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
@pytest.mark.parametrize("spatial_1d", [False, True])
def test_opcheck_soft_mask_bwd(device, spatial_1d):
    gen = torch.Generator().manual_seed(101)
    s_red, s_sp, th_r, th_s, _ = make_inputs(2, 33, torch.float32, device, gen, spatial_1d=spatial_1d)
    grad = torch.randn(2, 33, generator=gen).to(device)
    opcheck(torch.ops.atp_ops.soft_mask_bwd, (grad, s_red, s_sp, th_r, th_s, 3.0))


@pytest.mark.parametrize("device", SOFT_MASK_DEVICES)
def test_torch_compile_fullgraph(device):
    gen = torch.Generator().manual_seed(103)
    ins = make_inputs(2, 40, torch.float32, device, gen, spatial_1d=True, prev="neg_inf")

    def step(s_red, s_sp, th_r, th_s, prev):
        bias = atp_soft_mask(s_red, s_sp, th_r, th_s, 5.0, prev)
        kept = torch.where(torch.isfinite(bias), bias.exp(), torch.zeros_like(bias))
        return kept.sum() + atp_hard_mask(s_red, s_sp, th_r, th_s, prev).isfinite().sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    a, b = leaves(*ins), leaves(*ins)
    loss_c, loss_e = compiled(*a), step(*b)
    loss_c.backward()
    loss_e.backward()
    torch.testing.assert_close(loss_c, loss_e)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.grad, y.grad)
