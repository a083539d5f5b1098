"""DESIGN §5: every bad input raises ValueError/RuntimeError naming the argument and the expected
form (wording from csrc/checks.cpp), before any kernel runs; never a silent wrong answer."""
from __future__ import annotations

import re

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from atp_ops import atp_attention, atp_hard_mask, atp_scores, atp_soft_mask
from conftest import cuda_usable

ERRORS = (ValueError, RuntimeError)
NAN, INF = float("nan"), float("inf")
B, HQ, HKV, LQ, LK, D = 2, 4, 2, 7, 11, 8


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def qkvb(dtype=torch.float32, device="cpu"):
    return (r(B, HQ, LQ, D, dtype=dtype, device=device), r(B, HKV, LK, D, dtype=dtype, device=device),
            r(B, HKV, LK, D, dtype=dtype, device=device),
            r(B, LK, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device))


def SIZES(dims: str) -> str:
    """Regex for a size list: C++ prints at::IntArrayRef as [a, b], the Python wrapper as (a, b)."""
    return r"[\(\[]" + re.escape(dims) + r"[\)\]]"


def raises(match):
    return pytest.raises(ERRORS, match=match)


# ----------------------------------------------------------------------------------------------
# atp_attention


def _attention_cases():
    q, k, v, kb = qkvb()
    h = torch.float16
    cases = {
        # rank
        "q rank 3": ((q[0], k, v, kb), r"q must have shape \(B, Hq, Lq, D\), got " + SIZES("4, 7, 8")),
        "q rank 5": ((q[None], k, v, kb), r"q must have shape \(B, Hq, Lq, D\)"),
        "k rank 3": ((q, k[0], v, kb), r"k must have shape \(B, Hkv, Lk, D\), got " + SIZES("2, 11, 8")),
        "v rank 5": ((q, k, v[None], kb), r"v must have shape \(B, Hkv, Lk, D\)"),
        # dtype
        "q int": ((q.long(), k.long(), v.long(), kb), r"q must be float16, bfloat16, float32 or float64, got Long"),
        "k float16": ((q, k.to(h), v, kb), r"q, k and v must share one dtype, got q Float, k Half, v Float"),
        "v float64": ((q, k, v.double(), kb), r"q, k and v must share one dtype"),
        # shapes
        "batch": ((q, k[:1], v[:1], kb), r"q, k and v must have the same batch B = 2"),
        "Hq % Hkv": ((q, r(B, 3, LK, D), r(B, 3, LK, D), kb),
                     r"the query heads Hq must be a positive multiple of the key/value heads Hkv, got Hq = 4, Hkv = 3"),
        "Hkv > Hq": ((q[:, :1], k, v, kb), r"the query heads Hq must be a positive multiple .* got Hq = 1, Hkv = 2"),
        "v heads": ((q, k, v[:, :1], kb), r"v must have shape \(B, Hkv, Lk, D\) like k = " + SIZES("2, 2, 11, 8")),
        "v length": ((q, k, v[:, :, :5], kb), r"v must have shape \(B, Hkv, Lk, D\) like k"),
        "head dim k": ((q, r(B, HKV, LK, 16), v, kb), r"q, k and v must share the head dim D = 8"),
        "head dim v": ((q, k, r(B, HKV, LK, 4), kb), r"q, k and v must share the head dim D = 8"),
        # key_bias
        "key_bias (Lk,)": ((q, k, v, kb[0]), r"key_bias must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("11")),
        "key_bias Lk+1": ((q, k, v, r(B, LK + 1)), r"key_bias must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("2, 12")),
        "key_bias Lq": ((q, k, v, r(B, LQ)), r"key_bias must have shape \(B, Lk\) = \(2, 11\)"),
        "key_bias per head": ((q, k, v, r(B, HQ, LK)), r"key_bias must have shape \(B, Lk\)"),
        "key_bias batch": ((q, k, v, r(1, LK)), r"key_bias must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("1, 11")),
        "key_bias float16": ((q, k, v, kb.half()), r"key_bias must be float32 \(or float64 with float64 q\), got Half"),
        "key_bias bfloat16": ((q, k, v, kb.bfloat16()), r"key_bias must be float32 .* got BFloat16"),
        "key_bias float64, float32 q": ((q, k, v, kb.double()), r"key_bias must be float32 .* got Double"),
        "key_bias float32, float16 q": None,  # valid: see test_valid_mixed_dtypes_are_accepted
    }
    return {name: case for name, case in cases.items() if case is not None}


ATTENTION_CASES = _attention_cases()


@pytest.mark.parametrize("name", list(ATTENTION_CASES))
@pytest.mark.parametrize("with_key_mask", [False, True])
def test_attention_bad_input(name, with_key_mask):
    # With a (valid) key_mask the checks of key_mask_bias answer first, in the same words.
    args, match = ATTENTION_CASES[name]
    key_mask = torch.rand(B, LK) if with_key_mask else None
    with raises("atp_attention: " + match):
        atp_attention(*args, key_mask=key_mask, scale=0.5)  # explicit scale: the C++ checks answer
    if name.startswith("q rank"):
        with raises("atp_attention: " + match):
            atp_attention(*args, key_mask=key_mask)  # default scale: the Python wrapper answers first, same words


def _key_mask_cases():
    m = torch.rand(B, LK)
    cases = {
        "(Lk,)": (m[0], r"key_mask must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("11")),
        "Lk+1": (torch.rand(B, LK + 1), r"key_mask must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("2, 12")),
        "batch": (torch.rand(1, LK), r"key_mask must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("1, 11")),
        "per head": (torch.rand(B, HQ, LK), r"key_mask must have shape \(B, Lk\)"),
        "float16": (m.half(), r"key_mask must be float32 \(or float64 with float64 q\), got Half"),
        "float64, float32 q": (m.double(), r"key_mask must be float32 .* got Double"),
        "bool": (m > 0.5, r"key_mask must be float32 .* got Bool"),
    }
    for name, bad in (("NaN", NAN), ("negative", -0.25), ("-inf", -INF), ("> 1", 1.5), ("+inf", INF)):
        t = m.clone()
        t[1, 4] = bad
        cases[name] = (t, r"key_mask must hold values in \[0, 1\], no NaN: 1 keeps a key, 0 removes it")
    return cases


KEY_MASK_CASES = _key_mask_cases()


@pytest.mark.parametrize("name", list(KEY_MASK_CASES))
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_bad_key_mask(name, with_bias):
    q, k, v, kb = qkvb()
    key_mask, match = KEY_MASK_CASES[name]
    with raises("atp_attention: " + match):
        atp_attention(q, k, v, kb if with_bias else None, key_mask=key_mask)


class _OpLog(TorchDispatchMode):
    """The atp_ops ops a call reaches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "atp_ops":
            self.ops.append(func.name())
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", ["Lk+1", "float16", "NaN", "negative", "> 1"])
def test_bad_key_mask_raises_before_any_attention_kernel(name):
    q, k, v, kb = qkvb()
    key_mask, match = KEY_MASK_CASES[name]
    with _OpLog() as log, raises("atp_attention: " + match):
        atp_attention(q, k, v, kb, key_mask=key_mask)
    assert any("key_mask_bias" in op for op in log.ops) and not any("attention" in op for op in log.ops), log.ops


def test_bad_key_bias_with_key_mask():
    q, k, v, kb = qkvb()
    m = torch.rand(B, LK)
    with raises(r"atp_attention: key_bias must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("2, 12")):
        atp_attention(q, k, v, r(B, LK + 1), key_mask=m)
    for bad, mask_value in ((NAN, 0.5), (INF, 0.5), (INF, 0.0)):  # +inf + log 0 is NaN: still caught
        kb_bad, m_bad = kb.clone(), m.clone()
        kb_bad[0, 2], m_bad[0, 2] = bad, mask_value
        with raises(r"atp_attention: key_bias contains NaN or \+inf"):
            atp_attention(q, k, v, kb_bad, key_mask=m_bad)


def test_valid_key_masks_are_accepted():
    q, k, v, kb = qkvb()
    m = torch.rand(B, LK)
    m[0, 3], m[1, 0] = 0.0, 1.0  # the ends of [0, 1] are valid
    assert torch.isfinite(atp_attention(q, k, v, kb, key_mask=m)).all()
    q, k, v, kb = qkvb(torch.float64)
    assert atp_attention(q, k, v, kb, key_mask=m).dtype == torch.float64  # float32 mask with any q
    assert atp_attention(q, k, v, key_mask=m.double()).dtype == torch.float64
    q, k, v, kb = qkvb(torch.bfloat16)
    assert atp_attention(q, k, v, kb, key_mask=m).dtype == torch.bfloat16


@pytest.mark.parametrize("where", [(0, 0), (1, 10), (1, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_attention_nan_or_posinf_key_bias(where, dtype, bad):
    q, k, v, kb = qkvb(dtype)
    kb[where] = bad
    with raises(r"atp_attention: key_bias contains NaN or \+inf; use -inf to remove a key"):
        atp_attention(q, k, v, kb)


def test_valid_mixed_dtypes_are_accepted():
    # The error tests above must not be rejecting everything: the valid neighbours pass.
    q, k, v, kb = qkvb(torch.float16)
    assert atp_attention(q, k, v, kb).dtype == torch.float16
    q, k, v, kb = qkvb(torch.float64)
    assert atp_attention(q, k, v, kb).dtype == torch.float64
    assert atp_attention(q, k, v, kb.float()).dtype == torch.float64  # float32 bias with any q
    q, k, v, kb = qkvb()
    kb[0, 3] = -INF
    assert torch.isfinite(atp_attention(q, k, v, kb)).all()


def test_attention_backward_bad_input():
    q, k, v, kb = qkvb()
    out, lse = atp_attention(q, k, v, kb, return_lse=True)
    bwd = torch.ops.atp_ops.attention_bwd
    do = torch.randn_like(out)
    with raises(r"atp_attention backward: grad_out must have shape \(B, Hq, Lq, D\) = " + SIZES("2, 4, 7, 8")):
        bwd(do[:, :, :3], None, q, k, v, kb, out, lse, True, 0.3, False)
    with raises(r"atp_attention backward: lse must have shape \(B, Hq, Lq\) = \(2, 4, 7\), got " + SIZES("2, 4, 6")):
        bwd(do, None, q, k, v, kb, out, lse[..., 1:], True, 0.3, False)
    with raises(r"atp_attention backward: grad_lse must be Float for Float q, got Double"):
        bwd(do, lse.double(), q, k, v, kb, out, lse, True, 0.3, False)
    with raises(r"atp_attention backward: key_bias contains NaN"):
        bad = kb.clone()
        bad[1, 1] = NAN
        bwd(do, None, q, k, v, bad, out, lse, True, 0.3, False)
    with raises(r"atp_attention backward: grad_bias must have shape \(B, Lk\) = \(2, 11\), got " + SIZES("2, 10")):
        bwd(do, None, q, k, v, kb, out, lse, True, 0.3, False, kb[:, 1:])
    with raises(r"atp_attention backward: grad_bias must be float32 \(or float64 with float64 q\), got Double"):
        bwd(do, None, q, k, v, kb, out, lse, True, 0.3, False, kb.double())
    with raises(r"atp_attention backward: grad_bias contains NaN or \+inf"):
        bwd(do, None, q, k, v, kb, out, lse, True, 0.3, False, bad)


@pytest.mark.skipif(not cuda_usable("attention_fwd"), reason="needs a GPU and CUDA attention kernels")
def test_attention_device_mix():
    q, k, v, kb = qkvb(device="cuda")
    with raises(r"atp_attention: q, k and v must be on one device"):
        atp_attention(q, k.cpu(), v, kb)
    with raises(r"atp_attention: q, k and v must be on one device"):
        atp_attention(q, k, v.cpu(), kb)
    with raises(r"atp_attention: key_bias must be on q's device cuda"):
        atp_attention(q, k, v, kb.cpu())
    m = torch.rand(B, LK, device="cuda")
    with raises(r"atp_attention: key_mask must be on q's device cuda:0, got cpu"):
        atp_attention(q, k, v, kb, key_mask=m.cpu())
    with raises(r"atp_attention: key_bias must be on q's device cuda"):
        atp_attention(q, k, v, kb.cpu(), key_mask=m)


# ----------------------------------------------------------------------------------------------
# atp_scores


def _score_inputs():
    q, k, v, kb = qkvb()
    _, lse = atp_attention(q, k, v, kb, return_lse=True)
    w = torch.ones(B, LQ)
    return q, k, lse, kb, w, w.clone()


def _score_cases():
    q, k, lse, kb, w_self, w_cross = _score_inputs()

    def with_(i, value):
        args = [q, k, lse, kb, w_self, w_cross]
        args[i] = value
        return tuple(args)

    neg, nan, inf = w_self.clone(), w_cross.clone(), w_cross.clone()
    neg[1, 2] = -0.5
    nan[0, 0] = NAN
    inf[1, 6] = INF
    nan_bias = kb.clone()
    nan_bias[0, 4] = NAN
    return {
        "lse rank": (with_(2, lse[0]), r"lse must have shape \(B, Hq, Lq\) = \(2, 4, 7\), got " + SIZES("4, 7")),
        "lse heads": (with_(2, lse[:, :2]), r"lse must have shape \(B, Hq, Lq\) = \(2, 4, 7\), got " + SIZES("2, 2, 7")),
        "lse length": (with_(2, lse[..., :3]), r"lse must have shape \(B, Hq, Lq\)"),
        "lse dtype": (with_(2, lse.half()), r"lse must be Float for Float q, got Half"),
        "w_self shape": (with_(4, w_self[:, :3]), r"w_self must have shape \(B, Lq\) = " + SIZES("2, 7") + r", got " + SIZES("2, 3")),
        "w_self (Lq,)": (with_(4, w_self[0]), r"w_self must have shape \(B, Lq\) = " + SIZES("2, 7") + r", got " + SIZES("7")),
        "w_cross shape": (with_(5, torch.ones(B, LK)), r"w_cross must have shape \(B, Lq\) = " + SIZES("2, 7") + r", got " + SIZES("2, 11")),
        "w_self negative": (with_(4, neg), r"w_self must hold finite weights >= 0"),
        "w_cross NaN": (with_(5, nan), r"w_cross must hold finite weights >= 0"),
        "w_cross inf": (with_(5, inf), r"w_cross must hold finite weights >= 0"),
        "w_self int": (with_(4, w_self.long()), r"w_self must be float32 or float64, got Long"),
        "w_cross float16": (with_(5, w_cross.half()), r"w_cross must be float32 or float64, got Half"),
        "key_bias NaN": (with_(3, nan_bias), r"key_bias contains NaN"),
        "key_bias shape": (with_(3, kb[:, :5]), r"key_bias must have shape \(B, Lk\) = \(2, 11\)"),
        "k head dim": (with_(1, r(B, HKV, LK, 4)), r"q, k and v must share the head dim D = 8"),
        "Hq % Hkv": (with_(1, r(B, 3, LK, D)), r"the query heads Hq must be a positive multiple of the key/value heads Hkv"),
        "k rank": (with_(1, k[0]), r"k must have shape \(B, Hkv, Lk, D\)"),
    }


SCORE_CASES = _score_cases()


@pytest.mark.parametrize("name", list(SCORE_CASES))
def test_scores_bad_input(name):
    args, match = SCORE_CASES[name]
    with raises("atp_scores: " + match):
        atp_scores(*args, scale=0.5)


def test_scores_bad_q_rank():
    q, k, lse, kb, w_self, w_cross = _score_inputs()
    with raises(r"q must have shape \(B, Hq, Lq, D\), got " + SIZES("4, 7, 8")):
        atp_scores(q[0], k, lse, kb, w_self, w_cross)
    with raises(r"atp_scores: q must have shape \(B, Hq, Lq, D\), got " + SIZES("4, 7, 8")):
        atp_scores(q[0], k, lse, kb, w_self, w_cross, scale=0.5)


def test_scores_valid_weights_are_accepted():
    q, k, lse, kb, w_self, w_cross = _score_inputs()
    w_self[0] = 0  # zeros are allowed (a sum of 0 gives scores of 0)
    s_self, s_cross = atp_scores(q, k, lse, kb, w_self.double(), w_cross)
    assert torch.equal(s_self[0], torch.zeros_like(s_self[0])) and torch.isfinite(s_cross).all()


# ----------------------------------------------------------------------------------------------
# atp_soft_mask / atp_hard_mask

N = 5


def _mask_inputs(dtype=torch.float32, device="cpu"):
    return (torch.rand(B, N, dtype=dtype, device=device), torch.rand(N, dtype=dtype, device=device),
            torch.rand(B, dtype=dtype, device=device), torch.rand(B, dtype=dtype, device=device),
            torch.zeros(B, N, dtype=dtype, device=device))


def _mask_cases():
    s_red, s_sp, th_r, th_s, prev = _mask_inputs()

    def with_(i, value, temperature=2.0):
        args = [s_red, s_sp, th_r, th_s, prev]
        args[i] = value
        return tuple(args), temperature

    nan_prev = prev.clone()
    nan_prev[1, 1] = NAN
    d = torch.float64
    return {
        "s_red rank 1": (with_(0, s_red[0]), r"s_red must have shape \(B, N\), got " + SIZES("5")),
        "s_red rank 3": (with_(0, s_red[None]), r"s_red must have shape \(B, N\), got " + SIZES("1, 2, 5")),
        "s_red float16": (with_(0, s_red.half()), r"s_red must be float32 or float64, got Half"),
        "s_spatial N+1": (with_(1, torch.rand(N + 1)), r"s_spatial must have shape \(B, N\) = \(2, 5\) or \(N,\), got " + SIZES("6")),
        "s_spatial (B, N+1)": (with_(1, torch.rand(B, N + 1)), r"s_spatial must have shape \(B, N\) = \(2, 5\) or \(N,\)"),
        "s_spatial (1, N)": (with_(1, torch.rand(1, N)), r"s_spatial must have shape \(B, N\) = \(2, 5\) or \(N,\), got " + SIZES("1, 5")),
        "theta_r (B, 1)": (with_(2, th_r[:, None]), r"theta_r must have shape \(B,\) = \(2,\), got " + SIZES("2, 1")),
        "theta_r scalar": (with_(2, th_r[0]), r"theta_r must have shape \(B,\) = \(2,\), got " + SIZES("")),
        "theta_s (B+1,)": (with_(3, torch.rand(B + 1)), r"theta_s must have shape \(B,\) = \(2,\), got " + SIZES("3")),
        "temperature 0": (with_(0, s_red, 0.0), r"temperature must be a finite number > 0, got 0"),
        "temperature < 0": (with_(0, s_red, -1.0), r"temperature must be a finite number > 0, got -1"),
        "temperature NaN": (with_(0, s_red, NAN), r"temperature must be a finite number > 0, got nan"),
        "temperature inf": (with_(0, s_red, INF), r"temperature must be a finite number > 0, got inf"),
        "s_spatial float64": (with_(1, s_sp.to(d)), r"s_spatial must have s_red's dtype Float, got Double"),
        "theta_r float64": (with_(2, th_r.to(d)), r"theta_r must have s_red's dtype Float, got Double"),
        "theta_s float64": (with_(3, th_s.to(d)), r"theta_s must have s_red's dtype Float, got Double"),
        "prev_bias shape": (with_(4, prev[:, :3]), r"prev_bias must have shape \(B, N\) = " + SIZES("2, 5") + r", got " + SIZES("2, 3")),
        "prev_bias dtype": (with_(4, prev.to(d)), r"prev_bias must have s_red's dtype Float, got Double"),
        "prev_bias NaN": (with_(4, nan_prev), r"prev_bias contains NaN"),
    }


MASK_CASES = _mask_cases()


@pytest.mark.parametrize("name", list(MASK_CASES))
@pytest.mark.parametrize("hard", [False, True])
def test_soft_mask_bad_input(name, hard):
    (args, temperature), match = MASK_CASES[name]
    if hard:
        if name.startswith("temperature"):
            pytest.skip("the hard mask takes no temperature")
        with raises("atp_soft_mask: " + match):
            atp_hard_mask(*args)
    else:
        with raises("atp_soft_mask: " + match):
            atp_soft_mask(*args[:4], temperature, args[4])


def test_soft_mask_backward_bad_grad():
    s_red, s_sp, th_r, th_s, _ = _mask_inputs()
    bwd = torch.ops.atp_ops.soft_mask_bwd
    with raises(r"atp_soft_mask backward: grad must have shape \(B, N\) = " + SIZES("2, 5") + r", got " + SIZES("2, 4")):
        bwd(torch.zeros(B, N - 1), s_red, s_sp, th_r, th_s, 1.0)
    with raises(r"atp_soft_mask backward: grad must have s_red's dtype Float, got Double"):
        bwd(torch.zeros(B, N, dtype=torch.float64), s_red, s_sp, th_r, th_s, 1.0)
    with raises(r"atp_soft_mask backward: temperature must be a finite number > 0"):
        bwd(torch.zeros(B, N), s_red, s_sp, th_r, th_s, 0.0)


def test_soft_mask_valid_inputs_are_accepted():
    s_red, s_sp, th_r, th_s, prev = _mask_inputs(torch.float64)
    prev[0, 0] = -INF  # -inf is a valid prev_bias: the token was removed before
    out = atp_soft_mask(s_red, s_sp, th_r, th_s, 1e-6, prev)
    assert torch.isneginf(out[0, 0]) and torch.isfinite(out.flatten()[1:]).all()
    assert atp_hard_mask(s_red, s_sp.expand(B, N), th_r, th_s).shape == (B, N)


@pytest.mark.skipif(not cuda_usable("soft_mask_fwd", "soft_mask_bwd"), reason="needs a GPU and CUDA soft-mask kernels")
@pytest.mark.parametrize("moved", ["s_spatial", "theta_r", "theta_s", "prev_bias", "s_red"])
def test_soft_mask_device_mix(moved):
    names = ["s_red", "s_spatial", "theta_r", "theta_s", "prev_bias"]
    args = list(_mask_inputs(device="cuda"))
    i = names.index(moved)
    args[i] = args[i].cpu()
    if moved == "s_red":  # everything else is on the GPU: each is named against s_red's device
        match = r"atp_soft_mask: (s_spatial|theta_r|theta_s|prev_bias) must be on (s_red's )?device"
    elif moved == "prev_bias":
        match = r"atp_soft_mask: prev_bias must be on device cuda:0, got cpu"
    else:
        match = re.escape(f"atp_soft_mask: {moved} must be on s_red's device cuda:0, got cpu")
    with raises(match):
        atp_soft_mask(*args[:4], 2.0, args[4])


# ----------------------------------------------------------------------------------------------
# the value-check switch (atp_ops.set_validation, ATP_OPS_VALIDATION)


def _value_reductions(fn) -> int:
    """How many aten::any / aten::all reductions (each a host sync on CUDA) fn() runs, from the
    profiler (the C++ ops call them below the dispatcher level a TorchDispatchMode sees)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name in ("aten::any", "aten::all"))


@pytest.fixture
def validation_off():
    import atp_ops
    previous = atp_ops.set_validation(False)
    yield
    atp_ops.set_validation(previous)


def test_value_checks_run_by_default_one_reduction_each():
    import atp_ops
    assert atp_ops.validation_enabled()
    q, k, v, kb = qkvb()
    assert _value_reductions(lambda: atp_attention(q, k, v, kb)) == 1  # key_bias
    assert _value_reductions(lambda: atp_attention(q, k, v, kb, key_mask=torch.rand(B, LK))) == 2  # + key_mask


def test_set_validation_false_skips_the_value_checks_only(validation_off):
    import atp_ops
    assert not atp_ops.validation_enabled()
    q, k, v, kb = qkvb()
    kb[0, 3] = NAN
    out = atp_attention(q, k, v, kb, key_mask=torch.full((B, LK), 2.0))
    assert _value_reductions(lambda: atp_attention(q, k, v, kb, key_mask=torch.full((B, LK), 2.0))) == 0
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()  # not caught, as documented
    w = torch.zeros(B, LQ)
    w[:, 0] = -1.0
    _, lse = atp_attention(q, k, v, None, return_lse=True)
    atp_scores(q, k, lse, None, w, w)  # negative weights pass unchecked
    with raises(r"atp_attention: key_bias must have shape \(B, Lk\)"):  # shapes are still checked
        atp_attention(q, k, v, kb[:, 1:])


def test_set_validation_returns_the_previous_setting():
    import atp_ops
    assert atp_ops.set_validation(False) is True
    assert atp_ops.set_validation(True) is False
    assert atp_ops.validation_enabled()


@pytest.mark.parametrize("value,enabled", [("0", False), ("off", False), ("false", False), ("1", True)])
def test_environment_variable_sets_validation_at_import(value, enabled):
    import os
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-c", "import atp_ops; print(atp_ops.validation_enabled())"],
                         env={**os.environ, "ATP_OPS_VALIDATION": value}, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == str(enabled)
