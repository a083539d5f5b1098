// CUDA soft / hard threshold masks (DESIGN §3.4); the per-token math is soft_mask.h's.
#include <algorithm>

#include "cuda/launch.h"

namespace atp::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void soft_mask_fwd_kernel(SoftMaskParams p) {
  const T* s_red = static_cast<const T*>(p.s_red);
  const T* s_sp = static_cast<const T*>(p.s_spatial);
  const T* prev = static_cast<const T*>(p.prev_bias);
  const T th_r = static_cast<const T*>(p.theta_r)[blockIdx.y];
  const T th_s = static_cast<const T*>(p.theta_s)[blockIdx.y];
  T* out = static_cast<T*>(p.out);
  const int64_t b = blockIdx.y;
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < p.N;
       n += int64_t(gridDim.x) * blockDim.x) {
    out[b * p.N + n] = soft_mask_bias(s_red[b * p.s_red_stride + n], s_sp[b * p.s_spatial_stride + n],
                                      th_r, th_s, static_cast<T>(p.temperature),
                                      prev ? prev[b * p.prev_stride + n] : T(0), p.hard);
  }
}

template <typename T>
__device__ T block_sum(T v, T* smem) {
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) smem[warp] = v;
  __syncthreads();  // every warp's partial is in smem before warp 0 reads them
  v = threadIdx.x < blockDim.x / 32 ? smem[lane] : T(0);
  if (warp == 0) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  }
  return v;
}

// One block per sample: the thresholds' gradients are sums over the sample's tokens, reduced in
// a fixed order (deterministic, no atomics).
template <typename T>
__global__ void __launch_bounds__(kThreads) soft_mask_bwd_kernel(SoftMaskParams p) {
  __shared__ T smem_r[kThreads / 32], smem_s[kThreads / 32];
  const int64_t b = blockIdx.x;
  const T* g = static_cast<const T*>(p.grad);
  const T* s_red = static_cast<const T*>(p.s_red);
  const T* s_sp = static_cast<const T*>(p.s_spatial);
  const T th_r = static_cast<const T*>(p.theta_r)[b];
  const T th_s = static_cast<const T*>(p.theta_s)[b];
  T* d_red = static_cast<T*>(p.out);
  T* d_sp = static_cast<T*>(p.d_s_spatial);
  T sum_r = 0, sum_s = 0;
  for (int64_t n = threadIdx.x; n < p.N; n += kThreads) {
    T dr, ds;
    soft_mask_grad(g[b * p.grad_stride + n], s_red[b * p.s_red_stride + n],
                   s_sp[b * p.s_spatial_stride + n], th_r, th_s, static_cast<T>(p.temperature), dr, ds);
    d_red[b * p.N + n] = dr;
    d_sp[b * p.N + n] = ds;
    sum_r += dr;
    sum_s += ds;
  }
  sum_r = block_sum(sum_r, smem_r);
  sum_s = block_sum(sum_s, smem_s);
  if (threadIdx.x == 0) {
    static_cast<T*>(p.d_theta_r)[b] = -sum_r;
    static_cast<T*>(p.d_theta_s)[b] = -sum_s;
  }
}

template <typename T>
void fwd(const SoftMaskParams& p, cudaStream_t stream) {
  const unsigned blocks_x = static_cast<unsigned>(std::min<int64_t>((p.N + kThreads - 1) / kThreads, 1024));
  soft_mask_fwd_kernel<T><<<dim3(blocks_x, static_cast<unsigned>(p.B)), kThreads, 0, stream>>>(p);
}

template <typename T>
void bwd(const SoftMaskParams& p, cudaStream_t stream) {
  soft_mask_bwd_kernel<T><<<static_cast<unsigned>(p.B), kThreads, 0, stream>>>(p);
}

}  // namespace

void soft_mask_fwd_launch(const SoftMaskParams& p, int dtype, cudaStream_t stream) {
  if (dtype == 0) fwd<float>(p, stream); else fwd<double>(p, stream);
}

void soft_mask_bwd_launch(const SoftMaskParams& p, int dtype, cudaStream_t stream) {
  if (dtype == 0) bwd<float>(p, stream); else bwd<double>(p, stream);
}

}  // namespace atp::cuda
