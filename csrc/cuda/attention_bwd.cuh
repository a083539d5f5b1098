// atp_attention backward on CUDA (DESIGN §3.1): FlashAttention-2's backward with WMMA tensor
// cores, deterministic by construction (no atomics, every output element written by exactly
// one thread in a fixed summation order), so the `deterministic` flag holds trivially.
//
//   delta_i = rowsum(dO_i * O_i) - dlse_i                       (attention_bwd_delta_kernel)
//   P_ij    = exp(scale q_i.k_j + key_bias_j - lse_i), 0 where causal-masked
//   dP      = dO V^T,  dS = P * (dP - delta)
//   dV = P^T dO, dK = scale dS^T Q, d key_bias_j = sum_i dS_ij     (attention_bwd_dkdv_kernel)
//   dQ = scale dS K                                                  (attention_bwd_dq_kernel)
//
// With p.grad_bias, d key_bias_j = sum_i exp(scale q_i.k_j + grad_bias_j - lse_i) (dP_ij - delta_i)
// instead (the key mask's gradient, attention_params.h); dQ, dK, dV are unchanged. No key tile
// is skipped for being masked in key_bias (only causal masking skips work), so keys at -inf in
// key_bias but finite in grad_bias get their sums.
//
// dK, dV and d key_bias are produced per query head into float32 buffers and summed over the
// GQA group on the host, as the CPU implementation does. A row with lse = -inf (no finite
// logit) is given lse = +inf here, so its P is exp(x - inf) = 0 and it contributes nothing.
// Included only by the per-(dtype, head dim) files attention_bwd_<dtype>_hdim<D>.cu.
#pragma once
#include <climits>

#include "cuda/attention_common.cuh"
#include "cuda/static_switch.h"

namespace atp::cuda {

template <int kD>
struct BwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kLdT = kD + 8;  // Q, dO, K, V tiles (elements)
  static constexpr int kStageLd = kD + 4;  // float staging of the final dQ / dK / dV rows

  // dK/dV kernel: a block owns kKeysA keys (16 per warp) and walks query tiles of kRowsA.
  static constexpr int kKeysA = 16 * kWarps;
  static constexpr int kRowsA = kD <= 64 ? 64 : 32;
  static constexpr int kLdSA = kRowsA + 4;  // S^T / dP^T (float), [kKeysA, kLdSA]
  static constexpr int kLdPA = kRowsA + 8;  // P^T / dS^T (16-bit), [kKeysA, kLdPA]
  static constexpr int kA_K = 0;
  static constexpr int kA_V = kA_K + align128(kKeysA * kLdT * 2);
  static constexpr int kA_Q = kA_V + align128(kKeysA * kLdT * 2);
  static constexpr int kA_dO = kA_Q + align128(kRowsA * kLdT * 2);
  static constexpr int kA_S = kA_dO + align128(kRowsA * kLdT * 2);
  static constexpr int kA_dP = kA_S + align128(kKeysA * kLdSA * 4);
  static constexpr int kA_P = kA_dP + align128(kKeysA * kLdSA * 4);
  static constexpr int kA_dS = kA_P + align128(kKeysA * kLdPA * 2);
  static constexpr int kA_Lse = kA_dS + align128(kKeysA * kLdPA * 2);
  static constexpr int kA_Delta = kA_Lse + align128(kRowsA * 4);
  static constexpr int kA_Bias = kA_Delta + align128(kRowsA * 4);
  static constexpr int kA_GradBias = kA_Bias + align128(kKeysA * 4);
  static constexpr int kSmemA = kA_GradBias + align128(kKeysA * 4);

  // dQ kernel: a block owns kRowsB query rows (16 per warp) and walks key tiles of kKeysB.
  static constexpr int kRowsB = 16 * kWarps;
  static constexpr int kKeysB = kD <= 64 ? 64 : 32;
  static constexpr int kLdSB = kKeysB + 4;  // S / dP (float), [kRowsB, kLdSB]
  static constexpr int kLdPB = kKeysB + 8;  // dS (16-bit), [kRowsB, kLdPB]
  static constexpr int kB_Q = 0;
  static constexpr int kB_dO = kB_Q + align128(kRowsB * kLdT * 2);
  static constexpr int kB_K = kB_dO + align128(kRowsB * kLdT * 2);
  static constexpr int kB_V = kB_K + align128(kKeysB * kLdT * 2);
  static constexpr int kB_S = kB_V + align128(kKeysB * kLdT * 2);
  static constexpr int kB_dP = kB_S + align128(kRowsB * kLdSB * 4);
  static constexpr int kB_dS = kB_dP + align128(kRowsB * kLdSB * 4);
  static constexpr int kB_Lse = kB_dS + align128(kRowsB * kLdPB * 2);
  static constexpr int kB_Delta = kB_Lse + align128(kRowsB * 4);
  static constexpr int kB_Bias = kB_Delta + align128(kRowsB * 4);
  static constexpr int kSmemB = kB_Bias + align128(kKeysB * 4);

  static_assert(kSmemA <= 99 * 1024 && kSmemB <= 99 * 1024, "must fit sm_86's 99 KB per block");
  static_assert(kWarps * 16 * kStageLd * 4 <= kSmemA && kWarps * 16 * kStageLd * 4 <= kSmemB,
                "the final staging reuses the tiles' shared memory");
};

// delta = rowsum(dO * O) - dlse, one warp per row (b, h, i); grid ceil(B * Hq * Lq / 4).
template <typename T>
__global__ void __launch_bounds__(128) attention_bwd_delta_kernel(const AttentionBwdParams p) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const int i = int(row % p.Lq), h = int((row / p.Lq) % p.Hq), b = int(row / (int64_t(p.Lq) * p.Hq));
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride +
                  i * p.dout_row_stride;
  const T* out = static_cast<const T*>(p.out) + b * p.out_batch_stride + h * p.out_head_stride +
                 i * p.out_row_stride;
  float acc = 0.f;
  for (int d = lane; d < p.D; d += 32) acc += to_float(dout[d]) * to_float(out[d]);
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) p.delta[row] = acc - (p.dlse ? p.dlse[row] : 0.f);
}

// lse as the P recomputation uses it: rows past Lq or with lse = -inf get +inf, so P = 0.
__device__ __forceinline__ float lse_for_p(const float* lse, int i, int Lq) {
  if (i >= Lq) return kPosInf;
  const float x = lse[i];
  return x == kNegInf ? kPosInf : x;
}

// Writes a warp's 16 x kD float accumulators (scaled by `mul`) to rows [row0, row0 + 16) of a
// contiguous [*, kD] matrix, rows >= n_rows skipped. `stage` is the warp's private
// [16, kStageLd] float staging area.
template <typename Out, int kD, int kStageLd>
__device__ __forceinline__ void store_rows(Out* dst, const FragC (&acc)[kD / 16], float* stage,
                                           int row0, int n_rows, float mul) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int n = 0; n < kD / 16; ++n) wmma::store_matrix_sync(stage + n * 16, acc[n], kStageLd, wmma::mem_row_major);
  __syncwarp();  // the fragment stores are visible to all lanes
  for (int rr = 0; rr < 16 && row0 + rr < n_rows; ++rr) {
    for (int d = lane; d < kD; d += 32) {
      dst[int64_t(row0 + rr) * kD + d] = from_float<Out>(stage[rr * kStageLd + d] * mul);
    }
  }
  __syncwarp();  // every lane has read the stage before it is reused
}

// dK, dV and the per-head column sums of dS for kKeysA keys of one (b, query head).
// grid (ceil(Lk / kKeysA), Hq, B). Each warp owns 16 keys: its dK/dV rows live in registers
// (no rescaling is ever needed in the backward), and lanes 2r, 2r+1 own key r's d key_bias sum.
template <typename T, int kD, bool kCausal>
__global__ void __launch_bounds__(BwdTraits<kD>::kThreads)
    attention_bwd_dkdv_kernel(const AttentionBwdParams p) {
  using Tr = BwdTraits<kD>;
  constexpr int kKeys = Tr::kKeysA, kRows = Tr::kRowsA, kThreads = Tr::kThreads;
  constexpr int kLdT = Tr::kLdT, kLdS = Tr::kLdSA, kLdP = Tr::kLdPA;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + Tr::kA_K);              // [kKeys, kLdT]
  T* sV = reinterpret_cast<T*>(smem + Tr::kA_V);              // [kKeys, kLdT]
  T* sQ = reinterpret_cast<T*>(smem + Tr::kA_Q);              // [kRows, kLdT]
  T* sdO = reinterpret_cast<T*>(smem + Tr::kA_dO);            // [kRows, kLdT]
  float* sS = reinterpret_cast<float*>(smem + Tr::kA_S);      // [kKeys, kLdS] S^T
  float* sdP = reinterpret_cast<float*>(smem + Tr::kA_dP);    // [kKeys, kLdS] dP^T
  T* sP = reinterpret_cast<T*>(smem + Tr::kA_P);              // [kKeys, kLdP] P^T
  T* sdS = reinterpret_cast<T*>(smem + Tr::kA_dS);            // [kKeys, kLdP] dS^T
  float* sLse = reinterpret_cast<float*>(smem + Tr::kA_Lse);  // [kRows]
  float* sDelta = reinterpret_cast<float*>(smem + Tr::kA_Delta);  // [kRows]
  float* sBias = reinterpret_cast<float*>(smem + Tr::kA_Bias);    // [kKeys]
  float* sGradBias = reinterpret_cast<float*>(smem + Tr::kA_GradBias);  // [kKeys], with grad_bias

  const int j0 = blockIdx.x * kKeys, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int offset = p.Lk - p.Lq;
  const int64_t bh = int64_t(b) * p.Hq + h;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const float* lse = p.lse + bh * p.Lq;
  const float* delta = p.delta + bh * p.Lq;
  const float* bias = p.key_bias ? p.key_bias + b * p.bias_batch_stride : nullptr;
  const float* grad_bias = p.grad_bias ? p.grad_bias + b * p.grad_bias_batch_stride : nullptr;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  load_tile<T, kKeys, kD, kLdT, kThreads>(sK, k, p.k_row_stride, j0, p.Lk);
  load_tile<T, kKeys, kD, kLdT, kThreads>(sV, v, p.v_row_stride, j0, p.Lk);
  for (int c = tid; c < kKeys; c += kThreads) {
    sBias[c] = j0 + c < p.Lk ? (bias ? bias[j0 + c] : 0.f) : kNegInf;
    if (grad_bias) sGradBias[c] = j0 + c < p.Lk ? grad_bias[j0 + c] : kNegInf;
  }

  FragC dk[kD / 16], dv[kD / 16];
#pragma unroll
  for (int n = 0; n < kD / 16; ++n) {
    wmma::fill_fragment(dk[n], 0.f);
    wmma::fill_fragment(dv[n], 0.f);
  }
  const int r = lane >> 1, half = lane & 1;  // this lane's key within the warp, column parity
  const int kr = warp * 16 + r;              // key within the block
  const int j = j0 + kr;
  float dbias = 0.f;  // this lane's part of sum_i dS_ij (with grad_bias: of its own sums)
  float* sS_w = sS + warp * 16 * kLdS;
  float* sdP_w = sdP + warp * 16 * kLdS;
  T* sP_w = sP + warp * 16 * kLdP;
  T* sdS_w = sdS + warp * 16 * kLdP;
  const T* sK_w = sK + warp * 16 * kLdT;
  const T* sV_w = sV + warp * 16 * kLdT;

  // Causal: the first query row that sees key j0 is j0 - offset; earlier tiles are skipped.
  const int i_first = kCausal ? max(0, j0 - offset) : 0;
  for (int i0 = i_first / kRows * kRows; i0 < p.Lq; i0 += kRows) {
    __syncthreads();  // every warp is done with the previous Q, dO, lse and delta tiles
    load_tile<T, kRows, kD, kLdT, kThreads>(sQ, q, p.q_row_stride, i0, p.Lq);
    load_tile<T, kRows, kD, kLdT, kThreads>(sdO, dout, p.dout_row_stride, i0, p.Lq);
    for (int c = tid; c < kRows; c += kThreads) {
      sLse[c] = lse_for_p(lse, i0 + c, p.Lq);
      sDelta[c] = i0 + c < p.Lq ? delta[i0 + c] : 0.f;
    }
    __syncthreads();  // tiles complete (the first pass also covers sK, sV, sBias)

    // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys (Q, dO read column-major).
    warp_gemm_nt_pair<T, kRows, kD, kLdT, kLdS>(sK_w, sQ, sV_w, sdO, sS_w, sdP_w);
    __syncwarp();  // S^T and dP^T are visible to the lanes owning each key

    // P^T and dS^T = P^T * (dP^T - delta) for key j against query i0 + c.
    for (int c = half; c < kRows; c += 2) {
      const bool visible = !kCausal || j <= i0 + c + offset;
      const float s = sS_w[r * kLdS + c] * p.scale;
      const float pr = visible ? __expf(s + sBias[kr] - sLse[c]) : 0.f;
      const float g = sdP_w[r * kLdS + c] - sDelta[c];
      const float ds = pr * g;
      sP_w[r * kLdP + c] = from_float<T>(pr);
      sdS_w[r * kLdP + c] = from_float<T>(ds);
      if (p.grad_bias) {  // uniform across the grid
        dbias += (visible ? __expf(s + sGradBias[kr] - sLse[c]) : 0.f) * g;
      } else {
        dbias += ds;
      }
    }
    __syncwarp();  // P^T and dS^T are visible to the whole warp

    // dV += P^T dO and dK += dS^T Q (the scale is applied once at the end).
#pragma unroll
    for (int kk = 0; kk < kRows / 16; ++kk) {
      FragA<T> pa, dsa;
      wmma::load_matrix_sync(pa, sP_w + kk * 16, kLdP);
      wmma::load_matrix_sync(dsa, sdS_w + kk * 16, kLdP);
#pragma unroll
      for (int n = 0; n < kD / 16; ++n) {
        FragBRow<T> bm;
        wmma::load_matrix_sync(bm, sdO + kk * 16 * kLdT + n * 16, kLdT);
        wmma::mma_sync(dv[n], pa, bm, dv[n]);
        wmma::load_matrix_sync(bm, sQ + kk * 16 * kLdT + n * 16, kLdT);
        wmma::mma_sync(dk[n], dsa, bm, dk[n]);
      }
    }
  }

  dbias += __shfl_xor_sync(0xffffffffu, dbias, 1);
  if (half == 0 && j < p.Lk) p.dbias_accum[bh * p.Lk + j] = dbias;

  __syncthreads();  // all warps are done with the tiles; their memory becomes staging
  float* stage = reinterpret_cast<float*>(smem) + warp * 16 * Tr::kStageLd;
  store_rows<float, kD, Tr::kStageLd>(p.dk_accum + bh * p.Lk * kD, dk, stage, j0 + warp * 16, p.Lk, p.scale);
  store_rows<float, kD, Tr::kStageLd>(p.dv_accum + bh * p.Lk * kD, dv, stage, j0 + warp * 16, p.Lk, 1.f);
}

// dQ for kRowsB query rows of one (b, query head); grid (ceil(Lq / kRowsB), Hq, B). Each warp
// owns 16 rows and keeps their dQ in registers across the key loop.
template <typename T, int kD, bool kCausal>
__global__ void __launch_bounds__(BwdTraits<kD>::kThreads)
    attention_bwd_dq_kernel(const AttentionBwdParams p) {
  using Tr = BwdTraits<kD>;
  constexpr int kRows = Tr::kRowsB, kKeys = Tr::kKeysB, kThreads = Tr::kThreads;
  constexpr int kLdT = Tr::kLdT, kLdS = Tr::kLdSB, kLdP = Tr::kLdPB;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + Tr::kB_Q);              // [kRows, kLdT]
  T* sdO = reinterpret_cast<T*>(smem + Tr::kB_dO);            // [kRows, kLdT]
  T* sK = reinterpret_cast<T*>(smem + Tr::kB_K);              // [kKeys, kLdT]
  T* sV = reinterpret_cast<T*>(smem + Tr::kB_V);              // [kKeys, kLdT]
  float* sS = reinterpret_cast<float*>(smem + Tr::kB_S);      // [kRows, kLdS]
  float* sdP = reinterpret_cast<float*>(smem + Tr::kB_dP);    // [kRows, kLdS]
  T* sdS = reinterpret_cast<T*>(smem + Tr::kB_dS);            // [kRows, kLdP]
  float* sLse = reinterpret_cast<float*>(smem + Tr::kB_Lse);  // [kRows]
  float* sDelta = reinterpret_cast<float*>(smem + Tr::kB_Delta);  // [kRows]
  float* sBias = reinterpret_cast<float*>(smem + Tr::kB_Bias);    // [kKeys]

  const int i0 = blockIdx.x * kRows, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int offset = p.Lk - p.Lq;
  const int64_t bh = int64_t(b) * p.Hq + h;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const float* bias = p.key_bias ? p.key_bias + b * p.bias_batch_stride : nullptr;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  load_tile<T, kRows, kD, kLdT, kThreads>(sQ, q, p.q_row_stride, i0, p.Lq);
  load_tile<T, kRows, kD, kLdT, kThreads>(sdO, dout, p.dout_row_stride, i0, p.Lq);
  for (int c = tid; c < kRows; c += kThreads) {
    sLse[c] = lse_for_p(p.lse + bh * p.Lq, i0 + c, p.Lq);
    sDelta[c] = i0 + c < p.Lq ? p.delta[bh * p.Lq + i0 + c] : 0.f;
  }

  FragC dq[kD / 16];
#pragma unroll
  for (int n = 0; n < kD / 16; ++n) wmma::fill_fragment(dq[n], 0.f);
  const int r = lane >> 1, half = lane & 1;  // this lane's row within the warp, column parity
  const int row = warp * 16 + r;
  const int row_limit = kCausal ? i0 + row + offset + 1 : INT_MAX;  // row sees keys j < row_limit
  float* sS_w = sS + warp * 16 * kLdS;
  float* sdP_w = sdP + warp * 16 * kLdS;
  T* sdS_w = sdS + warp * 16 * kLdP;
  const T* sQ_w = sQ + warp * 16 * kLdT;
  const T* sdO_w = sdO + warp * 16 * kLdT;

  // Causal: keys past the last row's horizon are never loaded.
  const int k_end = kCausal ? min(p.Lk, min(i0 + kRows, p.Lq) + offset) : p.Lk;
  for (int j0 = 0; j0 < k_end; j0 += kKeys) {
    __syncthreads();  // every warp is done with the previous K, V and bias tiles
    load_tile<T, kKeys, kD, kLdT, kThreads>(sK, k, p.k_row_stride, j0, k_end);
    load_tile<T, kKeys, kD, kLdT, kThreads>(sV, v, p.v_row_stride, j0, k_end);
    for (int c = tid; c < kKeys; c += kThreads) {
      sBias[c] = j0 + c < k_end ? (bias ? bias[j0 + c] : 0.f) : kNegInf;
    }
    __syncthreads();  // tiles complete (the first pass also covers sQ, sdO, sLse, sDelta)

    // S = Q K^T and dP = dO V^T for the warp's 16 rows (K, V read column-major).
    warp_gemm_nt_pair<T, kKeys, kD, kLdT, kLdS>(sQ_w, sK, sdO_w, sV, sS_w, sdP_w);
    __syncwarp();  // S and dP are visible to the lanes owning each row

    for (int c = half; c < kKeys; c += 2) {
      const float x = sS_w[r * kLdS + c] * p.scale + sBias[c];
      const float pr = (!kCausal || j0 + c < row_limit) ? __expf(x - sLse[row]) : 0.f;
      sdS_w[r * kLdP + c] = from_float<T>(pr * (sdP_w[r * kLdS + c] - sDelta[row]));
    }
    __syncwarp();  // dS is visible to the whole warp

    // dQ += dS K (scaled once at the end).
#pragma unroll
    for (int kk = 0; kk < kKeys / 16; ++kk) {
      FragA<T> dsa;
      wmma::load_matrix_sync(dsa, sdS_w + kk * 16, kLdP);
#pragma unroll
      for (int n = 0; n < kD / 16; ++n) {
        FragBRow<T> bk;
        wmma::load_matrix_sync(bk, sK + kk * 16 * kLdT + n * 16, kLdT);
        wmma::mma_sync(dq[n], dsa, bk, dq[n]);
      }
    }
  }

  __syncthreads();  // all warps are done with the tiles; their memory becomes staging
  float* stage = reinterpret_cast<float*>(smem) + warp * 16 * Tr::kStageLd;
  store_rows<T, kD, Tr::kStageLd>(static_cast<T*>(p.dq) + bh * p.Lq * kD, dq, stage, i0 + warp * 16,
                                  p.Lq, p.scale);
}

template <typename T, int kD>
void run_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  using Tr = BwdTraits<kD>;
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  if (rows > 0) attention_bwd_delta_kernel<T><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(p);
  BOOL_SWITCH(p.causal, kCausal, [&] {
    // Above 48 KB a block's dynamic shared memory must be opted into per kernel.
    auto dkdv = &attention_bwd_dkdv_kernel<T, kD, kCausal>;
    cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemA);
    if (p.Lk > 0) {
      const dim3 grid_a((p.Lk + Tr::kKeysA - 1) / Tr::kKeysA, p.Hq, p.B);
      dkdv<<<grid_a, Tr::kThreads, Tr::kSmemA, stream>>>(p);
    }
    auto dq = &attention_bwd_dq_kernel<T, kD, kCausal>;
    cudaFuncSetAttribute(dq, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemB);
    if (p.Lq > 0) {
      const dim3 grid_b((p.Lq + Tr::kRowsB - 1) / Tr::kRowsB, p.Hq, p.B);
      dq<<<grid_b, Tr::kThreads, Tr::kSmemB, stream>>>(p);
    }
  });
}

}  // namespace atp::cuda
