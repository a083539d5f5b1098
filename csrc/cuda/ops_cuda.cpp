// CUDA implementations' host glue: validate, guard the device, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda/launch.h"
#include "soft_mask_host.h"

namespace atp {
namespace {

int dtype_code(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? 1 : 0; }

void check_grid_rows(const char* op, int64_t B) {
  TORCH_CHECK(B <= 65535, op, ": at most 65535 samples per call on CUDA, got B = ", B);
}

at::Tensor soft_mask_fwd_cuda(const at::Tensor& s_red, const at::Tensor& s_spatial,
                              const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature,
                              const c10::optional<at::Tensor>& prev_bias, bool hard) {
  const c10::cuda::CUDAGuard guard(s_red.device());
  SoftMaskInputs in = prepare_soft_mask("atp_soft_mask", s_red, s_spatial, theta_r, theta_s,
                                        temperature, prev_bias, c10::nullopt);
  check_grid_rows("atp_soft_mask", in.params.B);
  at::Tensor out = at::empty({in.params.B, in.params.N}, s_red.options());
  if (out.numel() == 0) return out;
  in.params.out = out.data_ptr();
  in.params.hard = hard;
  cuda::soft_mask_fwd_launch(in.params, dtype_code(s_red), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_mask_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& s_red, const at::Tensor& s_spatial,
    const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature) {
  const c10::cuda::CUDAGuard guard(s_red.device());
  SoftMaskInputs in = prepare_soft_mask("atp_soft_mask backward", s_red, s_spatial, theta_r, theta_s,
                                        temperature, c10::nullopt, grad);
  check_grid_rows("atp_soft_mask backward", in.params.B);
  SoftMaskGrads g = allocate_soft_mask_grads(in);
  if (in.params.B > 0) {
    cuda::soft_mask_bwd_launch(in.params, dtype_code(s_red), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {g.d_s_red, g.d_s_spatial, g.d_theta_r, g.d_theta_s};
}

}  // namespace
}  // namespace atp

TORCH_LIBRARY_IMPL(atp_ops, CUDA, m) {
  m.impl("soft_mask_fwd", &atp::soft_mask_fwd_cuda);
  m.impl("soft_mask_bwd", &atp::soft_mask_bwd_cuda);
}
