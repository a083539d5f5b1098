"""Materialised PyTorch versions of every atp_ops op: the ground truth of the tests and the
"eager" peer of the benchmarks.

These build the full (B, H, Lq, Lk) attention map on purpose; nothing else in the package does.
Each function follows docs/DESIGN.md §3 to the letter; each says the precision it computes in
(float64, or float32 as the kernels do where its docstring says so).
"""
from __future__ import annotations

import torch

__all__ = [
    "attention_ref",
    "scores_ref",
    "soft_mask_ref",
    "hard_mask_ref",
    "compute_dtype",
    "causal_mask",
]


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other dtype is computed in float32 (as the kernels do)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def causal_mask(lq: int, lk: int, device=None) -> torch.Tensor:
    """(Lq, Lk) bool, True where query i may see key j: j <= i + (Lk - Lq) (bottom-right)."""
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def _logits(q, k, key_bias, causal, scale, dtype):
    """scale q.k^T + key_bias, causal-masked to -inf, as (B, Hq, Lq, Lk) in `dtype`."""
    hq, hkv = q.shape[1], k.shape[1]
    q, k = q.to(dtype), k.to(dtype)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_bias is not None:
        s = s + key_bias.to(dtype)[:, None, None, :]
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    return s


def _softmax_lse(s, key_mask=None):
    """Row softmax and log-sum-exp that give p = 0, lse = -inf (and zero gradients, no NaN) on
    rows whose logits are all -inf. The shift m is detached: softmax does not depend on it.

    key_mask (B, Lk) multiplies each key's exponential, p_ij = M_j e_ij / sum_k M_k e_ik (the
    paper's form): the same values as adding log M to the logits, but written as a product its
    autograd is the derivative with respect to M at M = 0 too, where log M would give NaN."""
    if key_mask is None:
        m = s.detach().amax(dim=-1, keepdim=True)
    else:
        key_mask = key_mask.to(s.dtype)[:, None, None, :]
        log_m = torch.where(key_mask > 0, torch.log(key_mask.detach()), float("-inf"))
        m = (s.detach() + log_m).amax(dim=-1, keepdim=True)  # the largest key the mask keeps
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(s - m)
    if key_mask is not None:
        e = e * key_mask
    denom = e.sum(dim=-1, keepdim=True)
    has_mass = denom > 0
    safe = torch.where(has_mass, denom, torch.ones_like(denom))
    p = e / safe
    lse = torch.where(has_mass, m + torch.log(safe), torch.full_like(m, float("-inf")))
    return p, lse.squeeze(-1)


def attention_ref(q, k, v, key_bias=None, *, key_mask=None, causal=True, scale=None, return_lse=False,
                  upcast=True):
    """Reference of atp_attention (DESIGN §3.1), materialising the attention map.

    q (B, Hq, Lq, D), k/v (B, Hkv, Lk, D), key_bias (B, Lk) or None, key_mask (B, Lk) in
    [0, 1] or None: softmax(scale q k^T + key_bias + log key_mask), with key_mask applied as
    the paper's product M_j exp(s_ij) / sum_k M_k exp(s_ik), so that autograd gives its
    gradient at M = 0 as well (_softmax_lse).
    Returns out (B, Hq, Lq, D) in q's dtype [and lse (B, Hq, Lq)].
    upcast=True computes in float32 (float64 for float64 inputs); upcast=False computes in q's
    own dtype, which is "the same computation done in PyTorch at that dtype" of the error rule.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = compute_dtype(q.dtype) if upcast else q.dtype
    s = _logits(q, k, key_bias, causal, scale, dtype)
    p, lse = _softmax_lse(s, key_mask)
    hq, hkv = q.shape[1], v.shape[1]
    vv = v.to(dtype)
    if hq != hkv:
        vv = vv.repeat_interleave(hq // hkv, dim=1)
    out = torch.matmul(p, vv).to(q.dtype)
    if return_lse:
        return out, lse.to(compute_dtype(q.dtype))
    return out


def scores_ref(q, k, lse, key_bias, w_self, w_cross, *, causal=True, scale=None):
    """Reference of atp_scores (DESIGN §3.2, paper Eq. 3-4) from the materialised maps.

    s_self = column mean of the raw logits (no mask) over rows weighted by w_self;
    s_cross = column mean of the probabilities the layer used, exp(logit + bias - lse), over rows
    weighted by w_cross; both averaged over heads, computed in float64. Returns two (B, Lk)
    float32 tensors, as the op does.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    dtype = torch.float64
    raw = _logits(q, k, None, False, scale, dtype)  # (B, Hq, Lq, Lk)
    s = _logits(q, k, key_bias, causal, scale, dtype)
    lse = lse.to(dtype)[..., None]
    p = torch.where(torch.isfinite(lse), torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0)), 0.0)

    def weighted_mean(m, w):
        w = w.to(dtype)
        tot = w.sum(-1)
        col = (w[:, None, :, None] * m).sum(2).mean(1)  # (B, Lk)
        return torch.where(tot[:, None] > 0, col / torch.where(tot > 0, tot, 1.0)[:, None], 0.0)

    return weighted_mean(raw, w_self).float(), weighted_mean(p, w_cross).float()


def soft_mask_ref(s_red, s_spatial, theta_r, theta_s, temperature, prev_bias=None):
    """Reference of atp_soft_mask (paper Eq. 9-11, DESIGN §3.4), in log space.

    s_red (B, N), s_spatial (B, N) or (N,), theta_r/theta_s (B,), prev_bias (B, N) or None.
    Returns prev_bias + log max(sigmoid((s_red - theta_r) T), sigmoid((s_spatial - theta_s) T)).
    """
    a = torch.nn.functional.logsigmoid((s_red - theta_r[:, None]) * temperature)
    b = torch.nn.functional.logsigmoid((s_spatial - theta_s[:, None]) * temperature)
    log_m = torch.where(a >= b, a, b)  # ties go to the redundant branch, as in the kernels
    return log_m if prev_bias is None else prev_bias + log_m


def hard_mask_ref(s_red, s_spatial, theta_r, theta_s, prev_bias=None):
    """Reference of atp_hard_mask: prev_bias (0 if None) where s_red > theta_r or
    s_spatial > theta_s, -inf elsewhere. A token already at -inf stays there."""
    keep = (s_red > theta_r[:, None]) | (s_spatial > theta_s[:, None])
    prev = torch.zeros_like(s_red) if prev_bias is None else prev_bias
    return torch.where(keep, prev, torch.full_like(prev, float("-inf")))
