// Host entry points of the ops, one per (op, device). Schemas live in ops.cpp.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace atp {

// DESIGN §3.1. Returns (out [B, Hq, Lq, D] in q's dtype, lse [B, Hq, Lq] float32/float64).
std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& key_bias,
                                                     bool causal, double scale);

// Returns (dq, dk, dv, d_key_bias); d_key_bias is [B, Lk] in key_bias's dtype (the compute
// dtype, zeros-shaped, when key_bias is None, so the schema has a fixed arity). It is the column
// sum of P_ij (dP_ij - delta_i) with P from key_bias; with grad_bias [B, Lk] given, of
// exp(s_ij + grad_bias_j - lse_i) (dP_ij - delta_i) instead: for key_bias = grad_bias + log M,
// the gradient with respect to the mask M, defined at M = 0 too. dq, dk, dv are the same either way.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& key_bias,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, bool deterministic,
    const c10::optional<at::Tensor>& grad_bias);

// The key bias atp_attention runs with when given a key mask M [B, Lk] in [0, 1]:
// key_bias + log M (log M if key_bias is None), [B, Lk] contiguous in q's compute dtype. Checks
// q, k, v, key_bias's form and key_mask (shape, dtype, device, values) with attention_fwd's
// words, so a bad key_mask fails before any kernel. Every device (ATen ops only; key_mask.cpp).
at::Tensor key_mask_bias(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& key_bias, const at::Tensor& key_mask);

// DESIGN §3.2. Returns (s_self, s_cross), each [B, Lk] float32.
std::tuple<at::Tensor, at::Tensor> scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& lse,
                                              const c10::optional<at::Tensor>& key_bias,
                                              const at::Tensor& w_self, const at::Tensor& w_cross,
                                              bool causal, double scale);

// DESIGN §3.4. Returns the new key bias [B, N].
at::Tensor soft_mask_fwd_cpu(const at::Tensor& s_red, const at::Tensor& s_spatial,
                             const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature,
                             const c10::optional<at::Tensor>& prev_bias, bool hard);

// Returns (d_s_red [B, N], d_s_spatial [B, N], d_theta_r [B], d_theta_s [B]).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_mask_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& s_red, const at::Tensor& s_spatial,
    const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature);

}  // namespace atp
