// s_cross of atp_scores on CUDA (DESIGN §3.2, paper Eq. 4) without any Lq x Lk buffer.
//
// A block owns kKeys keys of one sample and accumulates, over every query head and every row
// with w_cross > 0 (their indices come precomputed from the host), w_i * P_ij with
// P_ij = exp(scale q_i.k_j + key_bias_j - lse_i) recomputed under the causal mask. Each output
// is written by one thread after a fixed-order sum: deterministic.
//
// fp16 / bf16 at head dims 64 and 128 (what atp_attention runs on CUDA) take the tensor-core
// kernel: per KV head the key tile arrives by cp.async, each warp takes (query head, 16 selected
// rows) items, gathers those rows by cp.async into its own tile, and computes the 16 x 64 logits
// with mma.sync (ldmatrix operands), then exp2 and the weighted column sums in registers.
// float32 (and other head dims) take the scalar fp32 kernel: tensor cores would round its inputs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "cuda/attention_common.cuh"
#include "cuda/launch.h"
#include "cuda/ptx.cuh"
#include "cuda/tiles.cuh"

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

template <int kD>
struct CrossTcTraits {
  static constexpr int kWarps = 4, kThreads = 32 * kWarps, kRows = 16;
  static constexpr int kLd = kD + 8;  // tile pitch (elements): conflict-free ldmatrix phases
  static constexpr int kOffK = 0;                                   // [kKeys, kLd]
  static constexpr int kOffQ = kOffK + kKeys * kLd * 2;             // [kWarps][kRows, kLd]
  static constexpr int kOffSum = kOffQ + kWarps * kRows * kLd * 2;  // [kWarps][kKeys] float
  static constexpr int kSmemBytes = kOffSum + kWarps * kKeys * 4;
  static_assert(kThreads == 2 * kKeys, "");
};

// grid (ceil(Lk / kKeys), B).
template <typename T, int kD>
__global__ void __launch_bounds__(CrossTcTraits<kD>::kThreads) cross_scores_tc_kernel(const CrossScoresParams p) {
  using Tr = CrossTcTraits<kD>;
  constexpr int kLd = Tr::kLd, kNT = kKeys / 8, kChunks = kD / 8;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + Tr::kOffK);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t = lane & 3;
  T* sQ = reinterpret_cast<T*>(smem + Tr::kOffQ) + warp * Tr::kRows * kLd;
  float* sSum = reinterpret_cast<float*>(smem + Tr::kOffSum);

  const int j0 = blockIdx.x * kKeys, b = blockIdx.y;
  const int group = p.Hq / p.Hkv, offset = p.Lk - p.Lq;
  const int n_rows = p.n_rows[b];
  const int n_chunks = (n_rows + Tr::kRows - 1) / Tr::kRows;
  const int* rows = p.rows + int64_t(b) * p.Lq;
  const float* w = p.w + int64_t(b) * p.Lq;
  const float scale_log2 = p.scale * kLog2e;
  // key_bias (base 2) of this lane's 2 kNT columns, -inf past Lk.
  float bias2[kNT][2];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int j = j0 + nt * 8 + 2 * t + e;
      bias2[nt][e] = j < p.Lk ? (p.key_bias ? ptx::ld_global(p.key_bias + b * p.bias_batch_stride + j) * kLog2e : 0.f)
                              : kNegInf;
    }
  float acc[kNT][2] = {};  // this lane's weighted column sums over its rows g, g + 8 of every item

  for (int hk = 0; hk < p.Hkv && n_chunks > 0; ++hk) {  // n_chunks is uniform over the block
    __syncthreads();  // every warp is done with the previous KV head's keys
    const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
    for (int idx = threadIdx.x; idx < kKeys * kChunks; idx += Tr::kThreads) {
      const int r = idx / kChunks, c = idx % kChunks;
      const bool valid = j0 + r < p.Lk;
      ptx::cp_async_16(sK + r * kLd + c * 8, k + (valid ? int64_t(j0 + r) * p.k_row_stride : 0) + c * 8, valid);
    }
    ptx::cp_async_commit();
    ptx::cp_async_wait<0>();
    __syncthreads();  // the key tile is complete

    for (int item = warp; item < group * n_chunks; item += Tr::kWarps) {
      const int h = hk * group + item / n_chunks, c0 = (item % n_chunks) * Tr::kRows;
      const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
      __syncwarp();  // every lane's ldmatrix of the previous item's rows is done
      for (int idx = lane; idx < Tr::kRows * kChunks; idx += 32) {
        const int r = idx / kChunks, c = idx % kChunks;
        const bool valid = c0 + r < n_rows;
        const int i = valid ? ptx::ld_global(rows + c0 + r) : 0;
        ptx::cp_async_16(sQ + r * kLd + c * 8, q + int64_t(i) * p.q_row_stride + c * 8, valid);
      }
      ptx::cp_async_commit();
      ptx::cp_async_wait<0>();
      __syncwarp();  // the warp's rows are complete

      float s[kNT][4] = {};
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[4];
        load_a<kLd>(a, sQ, 0, 16 * kk);
#pragma unroll
        for (int np = 0; np < kNT / 2; ++np) {
          uint32_t kb[4];
          load_b<kLd>(kb, sK, 16 * np, 16 * kk);
          ptx::mma_16816<T>(s[2 * np], a, kb[0], kb[1]);
          ptx::mma_16816<T>(s[2 * np + 1], a, kb[2], kb[3]);
        }
      }
      // P = exp2(x - lse log2 e) of rows g and g + 8; rows past n_rows, rows that saw nothing
      // (lse = -inf) and keys past their causal horizon contribute 0.
      const float* lse = p.lse + (int64_t(b) * p.Hq + h) * p.Lq;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = c0 + g + 8 * hf;
        const int i = r < n_rows ? ptx::ld_global(rows + r) : 0;
        const float lse_i = r < n_rows ? ptx::ld_global(lse + i) : kNegInf;
        if (lse_i == kNegInf) continue;
        const float w_i = ptx::ld_global(w + i), lse2 = lse_i * kLog2e;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int j = j0 + nt * 8 + 2 * t + e;
            const float x = fmaf(s[nt][2 * hf + e], scale_log2, bias2[nt][e]) - lse2;
            if (!(p.causal && j > i + offset)) acc[nt][e] += w_i * ptx::exp2(x);  // bias2 = -inf gives 0
          }
      }
    }
  }
  // Column sums: over the 8 row groups of the warp (lanes with equal t), then over the 4 warps.
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float v = acc[nt][e];
      v += ptx::shfl_xor(v, 4);
      v += ptx::shfl_xor(v, 8);
      v += ptx::shfl_xor(v, 16);
      if (g == 0) ptx::st_shared_f(sSum + warp * kKeys + nt * 8 + 2 * t + e, v);
    }
  __syncthreads();  // every warp's sums are in sSum
  const int c = threadIdx.x;
  if (c < kKeys && j0 + c < p.Lk) {
    float total = 0.f;
    for (int wi = 0; wi < Tr::kWarps; ++wi) total += ptx::ld_shared_f(sSum + wi * kKeys + c);
    const float norm = p.w_sum[b] > 0.f ? 1.f / (p.w_sum[b] * p.Hq) : 0.f;
    ptx::st_global(p.s_cross + int64_t(b) * p.Lk + j0 + c, total * norm);
  }
}

template <typename T, int kD>
void run_tc(const CrossScoresParams& p, cudaStream_t stream) {
  using Tr = CrossTcTraits<kD>;
  cudaFuncSetAttribute(&cross_scores_tc_kernel<T, kD>, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
  const dim3 grid((p.Lk + kKeys - 1) / kKeys, p.B);
  cross_scores_tc_kernel<T, kD><<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
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
  if (cross_scores_on_tensor_cores(dtype, p.D)) {
    HEADDIM_SWITCH(p.D, kD, [&] {
      if (dtype == 0) {
        run_tc<__half, kD>(p, stream);
      } else {
        run_tc<__nv_bfloat16, kD>(p, stream);
      }
    });
  } else if (dtype == 0) {
    run<__half>(p, stream);
  } else if (dtype == 1) {
    run<__nv_bfloat16>(p, stream);
  } else {
    run<float>(p, stream);
  }
}

}  // namespace atp::cuda
