// Host-side parts of atp_scores shared by the CPU and CUDA implementations (DESIGN §3.2).
#pragma once
#include <ATen/ATen.h>

namespace atp {

// Eq. 3 is linear in q: the w-weighted mean query of each head, dotted with every key, averaged
// over heads. O(B H (Lq + Lk) D); no attention pass. ATen ops only, so it runs on any device.
// q [B, Hq, Lq, D], k [B, Hkv, Lk, D], w [B, Lq], all in one floating dtype. Returns [B, Lk].
inline at::Tensor self_scores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& w, double scale) {
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(3), Hkv = k.size(1);
  const at::Tensor w_sum = w.sum(-1);
  const at::Tensor q_mean = at::einsum("bm,bhmd->bhd", {w, q});  // sum_m w_m q_m
  const at::Tensor q_group = q_mean.view({B, Hkv, Hq / Hkv, D}).sum(2);
  const at::Tensor s = at::einsum("bgd,bgnd->bn", {q_group, k}) * (scale / Hq);
  return at::where(w_sum.unsqueeze(1) > 0, s / w_sum.unsqueeze(1), at::zeros_like(s));
}

}  // namespace atp
