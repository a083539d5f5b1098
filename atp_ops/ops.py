"""Public ATP ops: thin wrappers over torch.ops.atp_ops with their fake kernels and autograd.

The schemas and the CPU/CUDA kernels live in C++ (csrc/); this module attaches
  * fake (meta) kernels, so the ops trace under torch.compile and FakeTensor;
  * autograd, with each backward being an op of its own (attention_bwd, soft_mask_bwd, and
    scores_bwd, an ATen composite defined here).
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch

from . import _C  # loads the library: registers torch.ops.atp_ops.*
from .reference import compute_dtype

__all__ = [
    "atp_attention",
    "atp_scores",
    "atp_soft_mask",
    "atp_hard_mask",
    "redundant_score",
    "normalize_scores",
    "has_cuda_kernels",
    "set_validation",
    "validation_enabled",
]

_ops = torch.ops.atp_ops


def _default_scale(op: str, q: torch.Tensor, scale: Optional[float]) -> float:
    if scale is not None:
        return float(scale)
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"{op}: q must have shape (B, Hq, Lq, D), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    return q.shape[-1] ** -0.5


def has_cuda_kernels(op: str = "attention_fwd") -> bool:
    """Whether this build registered a CUDA kernel for torch.ops.atp_ops.<op>."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"atp_ops::{op}", "CUDA")


def set_validation(enabled: bool) -> bool:
    """Turns the ops' value checks on or off; returns the previous setting.

    The checks that read tensor values (``key_bias`` / ``prev_bias`` free of NaN and +inf,
    ``key_mask`` in [0, 1], finite non-negative row weights) cost one reduction and one host
    sync each, which stalls the CPU behind the GPU and cannot be captured in a CUDA graph. They
    are on by default (``ATP_OPS_VALIDATION=0`` in the environment turns them off at import) and
    are skipped automatically while a CUDA graph is being captured. With them off, bad values
    are not caught: NaN propagates into the outputs. Shape, dtype and device checks always run.
    """
    previous = bool(_C.validation())
    _C.set_validation(bool(enabled))
    return previous


def validation_enabled() -> bool:
    """Whether the ops' value checks run (see set_validation)."""
    return bool(_C.validation())


# ----------------------------------------------------------------------------------------------
# atp_attention


def atp_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: Optional[torch.Tensor] = None,
    *,
    key_mask: Optional[torch.Tensor] = None,
    causal: bool = True,
    scale: Optional[float] = None,
    return_lse: bool = False,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Attention with an additive per-key bias shared by all heads (DESIGN §3.1).

    ``softmax(scale * q k^T + key_bias[:, None, None, :]) v`` with GQA and bottom-right aligned
    causal masking (query i sees keys j <= i + Lk - Lq). ``key_bias = log M`` turns the paper's
    masked-exponent softmax ``M_j exp(s_ij) / sum_k M_k exp(s_ik)`` into this form: 0 keeps a
    key, -inf removes it, values in between soft-mask it.

    ``key_mask`` gives M itself, multiplying each key's exponential on top of key_bias: the
    attention is ``softmax(scale * q k^T + key_bias + log(key_mask))``. Its gradient is the
    derivative with respect to M, defined at M = 0 too (what straight-through hard masks
    need): ``sum over heads and rows of exp(s_ij + key_bias_j - lse_i) (dP_ij - delta_i)``, the
    probability key j would have had, times (dP - delta). key_bias's gradient is then
    ``key_mask`` times that. Padding stays at -inf in key_bias.

    Shapes:
        q         (B, Hq, Lq, D)    float16 / bfloat16 / float32 / float64
        k, v      (B, Hkv, Lk, D)   same dtype; Hq % Hkv == 0
        key_bias  (B, Lk)           float32 (float64 with float64 q), no NaN; or None
        key_mask  (B, Lk)           float32 (float64 with float64 q), values in [0, 1]; or None
        returns   out (B, Hq, Lq, D) in q's dtype
                  [lse (B, Hq, Lq) float32 (float64 for float64 q), if return_lse]

    A row with no finite logit returns 0 and lse = -inf. Differentiable in q, k, v, key_bias,
    key_mask (and through lse). The backward is deterministic (bitwise repeatable) on CPU and on
    CUDA, whatever ``torch.use_deterministic_algorithms`` says: no kernel uses atomics. CUDA
    supports float16/bfloat16 with head dims 64, 96 and 128. Inputs may be non-contiguous views
    (e.g. HF's transposed (B, L, H, D) tensors); the CPU kernel computes fp16/bf16 in float32.

    Equivalent to ``atp_ops.reference.attention_ref`` without materialising (Lq, Lk).
    """
    scale = _default_scale("atp_attention", q, scale)
    if key_mask is None:
        out, lse = _ops.attention_fwd(q, k, v, key_bias, causal, scale)
    else:
        out, lse = _KeyMaskAttention.apply(q, k, v, key_bias, key_mask, causal, scale)
    return (out, lse) if return_lse else out


@torch.library.register_fake("atp_ops::attention_fwd")
def _attention_fwd_fake(q, k, v, key_bias, causal, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        q.shape[:3], dtype=compute_dtype(q.dtype))


@torch.library.register_fake("atp_ops::attention_bwd")
def _attention_bwd_fake(grad_out, grad_lse, q, k, v, key_bias, out, lse, causal, scale, deterministic,
                        grad_bias=None):
    dbias_dtype = key_bias.dtype if key_bias is not None else compute_dtype(q.dtype)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
        q.new_empty((q.shape[0], k.shape[2]), dtype=dbias_dtype),
    )


@torch.library.register_fake("atp_ops::key_mask_bias")
def _key_mask_bias_fake(q, k, v, key_bias, key_mask):
    return q.new_empty((q.shape[0], k.shape[2]), dtype=compute_dtype(q.dtype))


def _attention_setup_context(ctx, inputs, output):
    q, k, v, key_bias, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_bias, out, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.set_materialize_grads(False)


def _attention_backward(ctx, grad_out, grad_lse):
    q, k, v, key_bias, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, dbias = _ops.attention_bwd(
        grad_out, grad_lse, q, k, v, key_bias, out, lse, ctx.causal, ctx.scale,
        torch.are_deterministic_algorithms_enabled())
    return dq, dk, dv, (dbias if key_bias is not None else None), None, None


torch.library.register_autograd("atp_ops::attention_fwd", _attention_backward,
                                setup_context=_attention_setup_context)


class _KeyMaskAttention(torch.autograd.Function):
    """atp_attention with a key mask: the forward op on the bias key_bias + log(key_mask)
    (key_mask_bias, which checks key_mask), the backward op with grad_bias = key_bias, whose
    d_key_bias output is then the gradient with respect to the mask (ops.h)."""

    @staticmethod
    def forward(ctx, q, k, v, key_bias, key_mask, causal, scale):
        bias = _ops.key_mask_bias(q, k, v, key_bias, key_mask)
        out, lse = _ops.attention_fwd(q, k, v, bias, causal, scale)
        ctx.save_for_backward(q, k, v, key_bias, key_mask, bias, out, lse)
        ctx.causal, ctx.scale = causal, scale
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, key_bias, key_mask, bias, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        grad_bias = key_bias if key_bias is not None else torch.zeros_like(bias)
        dq, dk, dv, d_mask = _ops.attention_bwd(
            grad_out, grad_lse, q, k, v, bias, out, lse, ctx.causal, ctx.scale,
            torch.are_deterministic_algorithms_enabled(), grad_bias)
        d_key_bias = (key_mask * d_mask).to(key_bias.dtype) if ctx.needs_input_grad[3] else None
        d_key_mask = d_mask.to(key_mask.dtype) if ctx.needs_input_grad[4] else None
        return dq, dk, dv, d_key_bias, d_key_mask, None, None


# ----------------------------------------------------------------------------------------------
# atp_scores


def atp_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    lse: torch.Tensor,
    key_bias: Optional[torch.Tensor],
    w_self: torch.Tensor,
    w_cross: torch.Tensor,
    *,
    causal: bool = True,
    scale: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two ATP importance scores of every key (DESIGN §3.2, paper Eq. 3-4), no L x L map.

    ``s_self[b, n]``: mean over heads of the w_self-weighted mean over rows of the raw logit
    ``scale * q_m . k_n`` (no mask, Eq. 3); computed as the weighted mean query dotted with every
    key, O(L D). ``s_cross[b, n]``: mean over heads of the w_cross-weighted mean over rows of the
    probability the layer used, ``exp(scale q_m . k_n + key_bias_n - lse_m)`` with the causal mask
    (Eq. 4); only rows with w_cross > 0 are recomputed. A weight sum of 0 gives scores of 0.

    Shapes:
        q (B, Hq, Lq, D), k (B, Hkv, Lk, D)   as given to atp_attention
        lse (B, Hq, Lq)                        from atp_attention(..., return_lse=True)
        key_bias (B, Lk) or None               the bias that forward used
        w_self, w_cross (B, Lq)                float32/float64 row weights >= 0
        returns s_self, s_cross                (B, Lk) float32 each

    Differentiable in q, k and key_bias (``scores_bwd``), with lse taken for what it is, the
    log-normaliser of each row's logits: the gradient is that of the scores with lse recomputed
    from q, k and key_bias, and none is returned for the lse tensor (so a score layer's gradient
    does not run into the attention's backward a second time). The row weights get none. Pass
    detached inputs for scores that carry no gradient.
    """
    scale = _default_scale("atp_scores", q, scale)
    return _ops.scores(q, k, lse, key_bias, w_self, w_cross, causal, scale)


@torch.library.register_fake("atp_ops::scores")
def _scores_fake(q, k, lse, key_bias, w_self, w_cross, causal, scale):
    shape = (q.shape[0], k.shape[2])
    return q.new_empty(shape, dtype=torch.float32), q.new_empty(shape, dtype=torch.float32)


@torch.library.custom_op("atp_ops::scores_bwd", mutates_args=())
def _scores_bwd(grad_self: torch.Tensor, grad_cross: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                lse: torch.Tensor, key_bias: Optional[torch.Tensor], w_self: torch.Tensor,
                w_cross: torch.Tensor, causal: bool, scale: float
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of atp_scores' (s_self, s_cross) in q, k and key_bias, lse being the function
    of them it is (DESIGN §3.2); one ATen composite for every device. Returns dq, dk in their
    inputs' dtypes and dbias (B, Lk) in float32 (float64 for float64 q).

    s_self is the weighted mean query of each head dotted with every key, so its gradient is two
    outer products (O(L D) per head). s_cross is recomputed from the w_cross rows only (R of
    them, the most any sample has) against every key, (B, Hq, R, Lk): with P the probabilities
    and dP = g_n c_m / Hq (c the normalised row weights), the softmax backward gives the logits'
    gradient P (dP - sum_n P dP), hence dq, dk and dbias.
    """
    dt = compute_dtype(q.dtype)
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    qf, kf = q.to(dt), k.to(dt).repeat_interleave(group, dim=1)  # (B, Hq, Lk, D)
    gs, gc = grad_self.to(dt), grad_cross.to(dt)

    def row_weights(w):
        w = w.to(dt)
        tot = w.sum(-1, keepdim=True)
        return torch.where(tot > 0, w / torch.where(tot > 0, tot, 1.0), 0.0)

    # s_self[b, n] = scale / Hq * sum_h qbar_h . k_hn, qbar_h = sum_m c_m q_hm
    c_self = row_weights(w_self)
    qbar = torch.einsum("bm,bhmd->bhd", c_self, qf)
    dqbar = torch.einsum("bn,bhnd->bhd", gs, kf) * (scale / hq)
    dq = c_self[:, None, :, None] * dqbar[:, :, None, :]
    dk = gs[:, None, :, None] * qbar[:, :, None, :] * (scale / hq)

    # s_cross over the w_cross rows, gathered: R = the most rows any sample has
    c_cross = row_weights(w_cross)
    r = int((c_cross > 0).sum(-1).max()) if b else 0
    dbias = torch.zeros(b, lk, dtype=dt, device=q.device)
    if r > 0:
        rows = (c_cross > 0).to(torch.int8).argsort(dim=-1, descending=True, stable=True)[:, :r]  # (B, R)
        cr = c_cross.gather(1, rows)  # 0 on a sample's spare rows
        qr = qf.gather(2, rows[:, None, :, None].expand(b, hq, r, d))
        lser = lse.to(dt).gather(2, rows[:, None, :].expand(b, hq, r))
        logits = torch.matmul(qr, kf.transpose(-1, -2)) * scale
        if key_bias is not None:
            logits = logits + key_bias.to(dt)[:, None, None, :]
        allowed = torch.isfinite(lser)[..., None] & torch.isfinite(logits)
        if causal:
            cols = torch.arange(lk, device=q.device)
            allowed = allowed & (cols[None, None, None, :] <= rows[:, None, :, None] + (lk - lq))
        p = torch.where(allowed, torch.exp(torch.where(allowed, logits - lser[..., None], 0.0)), 0.0)
        pdp = p * (gc[:, None, None, :] * cr[:, None, :, None] / hq)  # (B, Hq, R, Lk)
        dlogit = pdp - p * pdp.sum(-1, keepdim=True)
        dq = dq.scatter_add(2, rows[:, None, :, None].expand(b, hq, r, d), torch.matmul(dlogit, kf) * scale)
        dk = dk + torch.matmul(dlogit.transpose(-1, -2), qr) * scale
        dbias = dlogit.sum((1, 2))
    dk = dk.reshape(b, hkv, group, lk, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dbias


@_scores_bwd.register_fake
def _scores_bwd_fake(grad_self, grad_cross, q, k, lse, key_bias, w_self, w_cross, causal, scale):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            q.new_empty((q.shape[0], k.shape[2]), dtype=compute_dtype(q.dtype)))


def _scores_setup_context(ctx, inputs, output):
    q, k, lse, key_bias, w_self, w_cross, causal, scale = inputs
    ctx.save_for_backward(q, k, lse, key_bias, w_self, w_cross)
    ctx.causal, ctx.scale = causal, scale
    ctx.set_materialize_grads(False)


def _scores_backward(ctx, grad_self, grad_cross):
    q, k, lse, key_bias, w_self, w_cross = ctx.saved_tensors
    if grad_self is None and grad_cross is None:
        return None, None, None, None, None, None, None, None
    zeros = q.new_zeros((q.shape[0], k.shape[2]), dtype=torch.float32)
    dq, dk, dbias = _scores_bwd(zeros if grad_self is None else grad_self,
                                zeros if grad_cross is None else grad_cross,
                                q, k, lse.detach(), key_bias, w_self, w_cross, ctx.causal, ctx.scale)
    d_bias = None if key_bias is None or not ctx.needs_input_grad[3] else dbias.to(key_bias.dtype)
    return dq, dk, None, d_bias, None, None, None, None


torch.library.register_autograd("atp_ops::scores", _scores_backward, setup_context=_scores_setup_context)


def normalize_scores(s: torch.Tensor, kept: Optional[torch.Tensor] = None, eps: float = 1e-12) -> torch.Tensor:
    """Min-max normalise each row of ``s`` (B, N) to [0, 1] over its ``kept`` entries (bool (B, N);
    all if None); entries not kept get 0, a row whose kept entries are all equal gets 0.
    Invariant to a positive rescaling and a shift of each row. Returns float32 (float64 for
    float64 input). The one normalisation of scores in the package (DESIGN §3.2)."""
    s = s.to(compute_dtype(s.dtype))
    return _normalize(s, None if kept is None else ~kept, eps)


def _normalize(s: torch.Tensor, dropped: Optional[torch.Tensor], eps: float) -> torch.Tensor:
    """``normalize_scores`` of ``s`` (..., N), already in its compute dtype, with ``dropped`` =
    ~kept (None: every entry kept). Every row is normalised on its own, so scores stacked on a
    leading dimension give what each gives alone, bit for bit (min and max are exact)."""
    if dropped is None:
        lo, hi = s.amin(-1, keepdim=True), s.amax(-1, keepdim=True)
    else:
        lo = s.masked_fill(dropped, float("inf")).amin(-1, keepdim=True)
        hi = s.masked_fill(dropped, float("-inf")).amax(-1, keepdim=True)
    span = (hi - lo).clamp_min(eps)
    out = (s - lo) / span
    return out if dropped is None else out.masked_fill(dropped, 0.0)


def redundant_score(s_self: torch.Tensor, s_cross: torch.Tensor, kept: Optional[torch.Tensor] = None,
                    eps: float = 1e-12) -> torch.Tensor:
    """The paper's redundant score, "the average of S_self and S_cross" (DESIGN §3.2).

    s_self is a logit and s_cross a probability, so each is first min-max normalised to [0, 1]
    over the sample's vision tokens that are still kept (``kept``, bool (B, N); all if None;
    ``normalize_scores``), then the two are averaged. Tokens not kept get 0. s_self, s_cross:
    (B, N) over the vision tokens.
    """
    a, b = s_self.to(compute_dtype(s_self.dtype)), s_cross.to(compute_dtype(s_cross.dtype))
    dropped = None if kept is None else ~kept
    if a.dtype == b.dtype and a.shape == b.shape:  # both in one pass: the same values, half the ops
        both = _normalize(torch.stack([a, b]), dropped, eps)
        return 0.5 * (both[0] + both[1])
    return 0.5 * (_normalize(a, dropped, eps) + _normalize(b, dropped, eps))


# ----------------------------------------------------------------------------------------------
# atp_soft_mask / atp_hard_mask


def atp_soft_mask(
    s_red: torch.Tensor,
    s_spatial: torch.Tensor,
    theta_r: torch.Tensor,
    theta_s: torch.Tensor,
    temperature: float,
    prev_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Soft threshold mask in log space, accumulated onto the previous key bias (Eq. 9-11).

    ``prev_bias + log max(sigmoid((s_red - theta_r) T), sigmoid((s_spatial - theta_s) T))``,
    computed with logsigmoid so it never underflows to -inf. Adding it to the key_bias of all
    later layers keeps a token pruned early pruned.

    Shapes: s_red (B, N); s_spatial (B, N) or (N,); theta_r, theta_s (B,); prev_bias (B, N) or
    None (= 0); all float32 or all float64. Returns (B, N). Differentiable in s_red, s_spatial,
    theta_r, theta_s and prev_bias. Equivalent to ``reference.soft_mask_ref``.
    """
    return _ops.soft_mask_fwd(s_red, s_spatial, theta_r, theta_s, float(temperature), prev_bias, False)


def atp_hard_mask(
    s_red: torch.Tensor,
    s_spatial: torch.Tensor,
    theta_r: torch.Tensor,
    theta_s: torch.Tensor,
    prev_bias: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hard mask for inference (DESIGN §3.4): ``prev_bias`` (0 if None) where
    ``s_red > theta_r or s_spatial > theta_s``, -inf elsewhere; shapes as atp_soft_mask.
    ``torch.isfinite(result)`` is the keep mask. Equivalent to ``reference.hard_mask_ref``."""
    return _ops.soft_mask_fwd(s_red, s_spatial, theta_r, theta_s, 1.0, prev_bias, True)


@torch.library.register_fake("atp_ops::soft_mask_fwd")
def _soft_mask_fwd_fake(s_red, s_spatial, theta_r, theta_s, temperature, prev_bias, hard):
    return s_red.new_empty(s_red.shape)


@torch.library.register_fake("atp_ops::soft_mask_bwd")
def _soft_mask_bwd_fake(grad, s_red, s_spatial, theta_r, theta_s, temperature):
    b, n = s_red.shape
    return s_red.new_empty((b, n)), s_red.new_empty((b, n)), s_red.new_empty((b,)), s_red.new_empty((b,))


def _soft_mask_setup_context(ctx, inputs, output):
    s_red, s_spatial, theta_r, theta_s, temperature, prev_bias, hard = inputs
    ctx.save_for_backward(s_red, s_spatial, theta_r, theta_s)
    ctx.temperature, ctx.hard = temperature, hard
    ctx.has_prev = prev_bias is not None
    ctx.spatial_shape = s_spatial.shape


def _soft_mask_backward(ctx, grad):
    s_red, s_spatial, theta_r, theta_s = ctx.saved_tensors
    if ctx.hard:
        # Piecewise constant in the scores and thresholds; the identity in prev_bias where kept.
        if not ctx.has_prev:
            return None, None, None, None, None, None, None
        keep = (s_red > theta_r[:, None]) | (s_spatial > theta_s[:, None])
        return None, None, None, None, None, torch.where(keep, grad, torch.zeros_like(grad)), None
    d_red, d_spatial, d_theta_r, d_theta_s = _ops.soft_mask_bwd(
        grad, s_red, s_spatial, theta_r, theta_s, ctx.temperature)
    d_spatial = d_spatial.sum_to_size(ctx.spatial_shape)
    return d_red, d_spatial, d_theta_r, d_theta_s, None, (grad if ctx.has_prev else None), None


torch.library.register_autograd("atp_ops::soft_mask_fwd", _soft_mask_backward,
                                setup_context=_soft_mask_setup_context)
