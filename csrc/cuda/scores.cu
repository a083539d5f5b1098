// s_cross of atp_scores on CUDA (DESIGN §3.2, paper Eq. 4) without any Lq x Lk buffer.
//
// A block owns kKeys keys of one sample and accumulates, over every query head and every row
// with w_cross > 0 (their indices come precomputed from the host), w_i * P_ij with
// P_ij = exp(scale q_i.k_j + key_bias_j - lse_i) recomputed under the causal mask. The rows
// are tens (the text tokens), so plain fp32 FMAs from shared memory suffice; no tensor cores.
// Each output is written by one thread after a fixed-order sum: deterministic.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/attention_common.cuh"
#include "cuda/launch.h"

namespace atp::cuda {
namespace {

constexpr int kKeys = 64;      // keys per block
constexpr int kRowChunk = 16;  // selected query rows staged at a time
constexpr int kThreads = 128;  // two threads per key, each taking every other row
static_assert(kThreads == 2 * kKeys, "thread t owns key t % kKeys and row parity t / kKeys");

int smem_bytes(int D) { return (kKeys * (D + 1) + kRowChunk * D + kThreads) * int(sizeof(float)); }

// grid (ceil(Lk / kKeys), B).
template <typename T>
__global__ void __launch_bounds__(kThreads) cross_scores_kernel(const CrossScoresParams p) {
  extern __shared__ float smem_f[];
  const int D = p.D, ldk = D + 1;  // +1: threads of a warp read 32 different keys, 32 banks
  float* sK = smem_f;                     // [kKeys, D + 1] keys of the current kv head
  float* sQ = sK + kKeys * ldk;           // [kRowChunk, D] selected query rows
  float* sPart = sQ + kRowChunk * D;      // [kThreads] per-thread partial sums

  const int j0 = blockIdx.x * kKeys, b = blockIdx.y;
  const int tid = threadIdx.x, c = tid % kKeys, parity = tid / kKeys;
  const int j = j0 + c;
  const int group = p.Hq / p.Hkv, offset = p.Lk - p.Lq;
  const int n_rows = p.n_rows[b];
  const int* rows = p.rows + int64_t(b) * p.Lq;
  const float* w = p.w + int64_t(b) * p.Lq;
  const float bias_j = j < p.Lk ? (p.key_bias ? p.key_bias[b * p.bias_batch_stride + j] : 0.f) : kNegInf;

  float acc = 0.f;
  for (int h = 0; h < p.Hq && n_rows > 0; ++h) {  // n_rows is uniform over the block
    if (h % group == 0) {
      __syncthreads();  // every thread is done reading the previous kv head's keys
      const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + (h / group) * p.k_head_stride;
      for (int idx = tid; idx < kKeys * D; idx += kThreads) {
        const int rr = idx / D, d = idx % D;
        sK[rr * ldk + d] = j0 + rr < p.Lk ? to_float(k[(j0 + rr) * p.k_row_stride + d]) : 0.f;
      }
    }
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const float* lse = p.lse + (int64_t(b) * p.Hq + h) * p.Lq;
    for (int c0 = 0; c0 < n_rows; c0 += kRowChunk) {
      const int nr = min(kRowChunk, n_rows - c0);
      __syncthreads();  // the previous chunk's rows are no longer read (and sK is complete)
      for (int idx = tid; idx < nr * D; idx += kThreads) {
        const int rr = idx / D, d = idx % D;
        sQ[rr * D + d] = to_float(q[int64_t(rows[c0 + rr]) * p.q_row_stride + d]);
      }
      __syncthreads();  // sQ complete
      for (int rr = parity; rr < nr; rr += 2) {
        const int i = rows[c0 + rr];
        const float lse_i = lse[i];
        // A row that saw nothing (lse = -inf) contributes nothing; masked keys have P = 0.
        if (lse_i == kNegInf || j >= p.Lk || (p.causal && j > i + offset)) continue;
        float dot = 0.f;
        for (int d = 0; d < D; ++d) dot += sQ[rr * D + d] * sK[c * ldk + d];
        acc += w[i] * expf(dot * p.scale + bias_j - lse_i);  // bias_j = -inf gives 0
      }
    }
  }
  sPart[tid] = acc;
  __syncthreads();  // both row parities of every key are in sPart
  if (parity == 0 && j < p.Lk) {
    const float norm = p.w_sum[b] > 0.f ? 1.f / (p.w_sum[b] * p.Hq) : 0.f;
    p.s_cross[int64_t(b) * p.Lk + j] = (sPart[c] + sPart[c + kKeys]) * norm;
  }
}

template <typename T>
void run(const CrossScoresParams& p, cudaStream_t stream) {
  const int smem = smem_bytes(p.D);
  // Above 48 KB (D > 136) the dynamic shared memory must be opted into.
  cudaFuncSetAttribute(&cross_scores_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  const dim3 grid((p.Lk + kKeys - 1) / kKeys, p.B);
  cross_scores_kernel<T><<<grid, kThreads, smem, stream>>>(p);
}

}  // namespace

void cross_scores_launch(const CrossScoresParams& p, int dtype, cudaStream_t stream) {
  if (dtype == 0) {
    run<__half>(p, stream);
  } else if (dtype == 1) {
    run<__nv_bfloat16>(p, stream);
  } else {
    run<float>(p, stream);
  }
}

}  // namespace atp::cuda
