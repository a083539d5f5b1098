// CPU soft / hard threshold masks (DESIGN §3.4): soft_mask.h's per-token math over rows.
#include <ATen/ATen.h>

#include "checks.h"
#include "cpu/tiles.h"
#include "ops.h"
#include "soft_mask_host.h"

namespace atp {
namespace {

template <typename T>
void soft_mask_fwd_kernel(const SoftMaskParams& p) {
  const T* s_red = static_cast<const T*>(p.s_red);
  const T* s_sp = static_cast<const T*>(p.s_spatial);
  const T* prev = static_cast<const T*>(p.prev_bias);
  const T* th_r = static_cast<const T*>(p.theta_r);
  const T* th_s = static_cast<const T*>(p.theta_s);
  T* out = static_cast<T*>(p.out);
  const T temp = static_cast<T>(p.temperature);
  cpu::parallel_tasks(p.B, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      for (int64_t n = 0; n < p.N; ++n) {
        out[b * p.N + n] = soft_mask_bias(s_red[b * p.s_red_stride + n], s_sp[b * p.s_spatial_stride + n],
                                          th_r[b], th_s[b], temp, prev ? prev[b * p.prev_stride + n] : T(0),
                                          p.hard);
      }
    }
  });
}

template <typename T>
void soft_mask_bwd_kernel(const SoftMaskParams& p) {
  const T* g = static_cast<const T*>(p.grad);
  const T* s_red = static_cast<const T*>(p.s_red);
  const T* s_sp = static_cast<const T*>(p.s_spatial);
  const T* th_r = static_cast<const T*>(p.theta_r);
  const T* th_s = static_cast<const T*>(p.theta_s);
  T* d_red = static_cast<T*>(p.out);
  T* d_sp = static_cast<T*>(p.d_s_spatial);
  T* d_th_r = static_cast<T*>(p.d_theta_r);
  T* d_th_s = static_cast<T*>(p.d_theta_s);
  const T temp = static_cast<T>(p.temperature);
  cpu::parallel_tasks(p.B, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T sum_r = 0, sum_s = 0;
      for (int64_t n = 0; n < p.N; ++n) {
        T dr, ds;
        soft_mask_grad(g[b * p.grad_stride + n], s_red[b * p.s_red_stride + n],
                       s_sp[b * p.s_spatial_stride + n], th_r[b], th_s[b], temp, dr, ds);
        d_red[b * p.N + n] = dr;
        d_sp[b * p.N + n] = ds;
        sum_r += dr;
        sum_s += ds;
      }
      d_th_r[b] = -sum_r;  // the threshold enters with the opposite sign of its score
      d_th_s[b] = -sum_s;
    }
  });
}

}  // namespace

at::Tensor soft_mask_fwd_cpu(const at::Tensor& s_red, const at::Tensor& s_spatial,
                             const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature,
                             const c10::optional<at::Tensor>& prev_bias, bool hard) {
  const BelowAutograd below_autograd;
  SoftMaskInputs in = prepare_soft_mask("atp_soft_mask", s_red, s_spatial, theta_r, theta_s,
                                        temperature, prev_bias, c10::nullopt);
  at::Tensor out = at::empty({in.params.B, in.params.N}, s_red.options());
  in.params.out = out.data_ptr();
  in.params.hard = hard;
  AT_DISPATCH_FLOATING_TYPES(s_red.scalar_type(), "atp_soft_mask_fwd_cpu",
                             [&] { soft_mask_fwd_kernel<scalar_t>(in.params); });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_mask_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& s_red, const at::Tensor& s_spatial,
    const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature) {
  const BelowAutograd below_autograd;
  SoftMaskInputs in = prepare_soft_mask("atp_soft_mask backward", s_red, s_spatial, theta_r, theta_s,
                                        temperature, c10::nullopt, grad);
  SoftMaskGrads g = allocate_soft_mask_grads(in);
  AT_DISPATCH_FLOATING_TYPES(s_red.scalar_type(), "atp_soft_mask_bwd_cpu",
                             [&] { soft_mask_bwd_kernel<scalar_t>(in.params); });
  return {g.d_s_red, g.d_s_spatial, g.d_theta_r, g.d_theta_s};
}

}  // namespace atp
