// extern "C" entry points of the emulated soft-mask kernels (their own translation unit: each
// kernel file keeps its constants in an anonymous namespace).
#include "emu_runtime.h"  // the CUDA execution model, before the kernel file
#include "cuda/soft_mask.cu"

using atp::SoftMaskParams;
using namespace atp::cuda;

// Soft / hard masks over rows of N contiguous elements; dtype 0 = float32, 1 = float64.
extern "C" void emu_soft_mask_fwd(int dtype, int64_t B, int64_t N, const void* s_red, const void* s_spatial,
                                  int64_t s_spatial_stride, const void* theta_r, const void* theta_s,
                                  const void* prev, double temperature, int hard, void* out) {
  SoftMaskParams p{};
  p.s_red = s_red; p.s_spatial = s_spatial; p.theta_r = theta_r; p.theta_s = theta_s; p.prev_bias = prev;
  p.out = out; p.s_red_stride = N; p.s_spatial_stride = s_spatial_stride; p.prev_stride = N;
  p.B = B; p.N = N; p.temperature = temperature; p.hard = hard;
  soft_mask_fwd_launch(p, dtype, nullptr);
}

extern "C" void emu_soft_mask_bwd(int dtype, int64_t B, int64_t N, const void* grad, const void* s_red,
                                  const void* s_spatial, int64_t s_spatial_stride, const void* theta_r,
                                  const void* theta_s, double temperature, void* d_s_red, void* d_s_spatial,
                                  void* d_theta_r, void* d_theta_s) {
  SoftMaskParams p{};
  p.grad = grad; p.s_red = s_red; p.s_spatial = s_spatial; p.theta_r = theta_r; p.theta_s = theta_s;
  p.out = d_s_red; p.d_s_spatial = d_s_spatial; p.d_theta_r = d_theta_r; p.d_theta_s = d_theta_s;
  p.grad_stride = N; p.s_red_stride = N; p.s_spatial_stride = s_spatial_stride;
  p.B = B; p.N = N; p.temperature = temperature;
  soft_mask_bwd_launch(p, dtype, nullptr);
}
