// Host-side preparation of the soft-mask ops, shared by the CPU and CUDA implementations:
// validate, make rows contiguous, fill the plain-data SoftMaskParams.
#pragma once
#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "checks.h"
#include "soft_mask.h"

namespace atp {

struct SoftMaskInputs {
  at::Tensor s_red, s_spatial, theta_r, theta_s, prev_bias, grad;  // kept alive for params
  SoftMaskParams params{};
};

inline at::Tensor rows_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 || t.size(-1) <= 1 ? t : t.contiguous();
}

inline SoftMaskInputs prepare_soft_mask(const char* op, const at::Tensor& s_red,
                                        const at::Tensor& s_spatial, const at::Tensor& theta_r,
                                        const at::Tensor& theta_s, double temperature,
                                        const c10::optional<at::Tensor>& prev_bias,
                                        const c10::optional<at::Tensor>& grad) {
  const auto [B, N] = check_soft_mask_inputs(op, s_red, s_spatial, theta_r, theta_s, temperature, prev_bias);
  SoftMaskInputs in;
  in.s_red = rows_contiguous(s_red);
  in.s_spatial = rows_contiguous(s_spatial.dim() == 1 ? s_spatial.unsqueeze(0).expand({B, N}) : s_spatial);
  in.theta_r = theta_r.contiguous();
  in.theta_s = theta_s.contiguous();
  SoftMaskParams& p = in.params;
  p.s_red = in.s_red.data_ptr();
  p.s_red_stride = in.s_red.stride(0);
  p.s_spatial = in.s_spatial.data_ptr();
  p.s_spatial_stride = in.s_spatial.stride(0);
  p.theta_r = in.theta_r.data_ptr();
  p.theta_s = in.theta_s.data_ptr();
  if (prev_bias) {
    in.prev_bias = rows_contiguous(*prev_bias);
    p.prev_bias = in.prev_bias.data_ptr();
    p.prev_stride = in.prev_bias.stride(0);
  }
  if (grad) {
    check_same_shape(op, "grad", *grad, {B, N}, "(B, N)", s_red);
    TORCH_CHECK(grad->scalar_type() == s_red.scalar_type(), op, ": grad must have s_red's dtype ",
                s_red.scalar_type(), ", got ", grad->scalar_type());
    in.grad = rows_contiguous(*grad);
    p.grad = in.grad.data_ptr();
    p.grad_stride = in.grad.stride(0);
  }
  p.B = B;
  p.N = N;
  p.temperature = temperature;
  return in;
}

struct SoftMaskGrads {
  at::Tensor d_s_red, d_s_spatial, d_theta_r, d_theta_s;
};

// Gradient outputs of the backward, wired into params. d_s_spatial is (B, N) even when
// s_spatial was (N,); the autograd layer sums it back to the input's shape.
inline SoftMaskGrads allocate_soft_mask_grads(SoftMaskInputs& in) {
  const auto opts = in.s_red.options();
  SoftMaskParams& p = in.params;
  SoftMaskGrads g{at::empty({p.B, p.N}, opts), at::empty({p.B, p.N}, opts), at::empty({p.B}, opts),
                  at::empty({p.B}, opts)};
  p.out = g.d_s_red.data_ptr();
  p.d_s_spatial = g.d_s_spatial.data_ptr();
  p.d_theta_r = g.d_theta_r.data_ptr();
  p.d_theta_s = g.d_theta_s.data_ptr();
  return g;
}

}  // namespace atp
