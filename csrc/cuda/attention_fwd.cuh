// atp_attention forward on CUDA (DESIGN §3.1): FlashAttention-2's algorithm with WMMA tensor
// cores. One block owns kBlockQ query rows of one (batch, query head) and walks the key tiles
// with an online softmax; nothing of size Lq x Lk exists. Included only by the per-(dtype, head
// dim) instantiation files attention_fwd_<dtype>_hdim<D>.cu.
//
// Work split inside a block: each of the 4 warps owns 16 query rows end to end (its slice of
// S, P and O), so after the block-wide K/V load only __syncwarp is needed. Inside a warp, lanes
// 2r and 2r+1 own row r for the softmax and keep its running max m and sum l in registers.
#pragma once
#include <climits>

#include "cuda/attention_common.cuh"
#include "cuda/static_switch.h"

namespace atp::cuda {

template <int kD>
struct FwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockQ = 16 * kWarps;             // 16 query rows per warp
  static constexpr int kBlockK = kD <= 64 ? 64 : 32;      // keeps shared memory < 99 KB (sm_86)
  static constexpr int kLdT = kD + 8;        // Q, K, V tiles (elements); +8 staggers banks
  static constexpr int kLdS = kBlockK + 4;   // S logits (float)
  static constexpr int kLdP = kBlockK + 8;   // P probabilities (16-bit)
  static constexpr int kLdO = kD + 4;        // O accumulator (float)
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + align128(kBlockQ * kLdT * 2);
  static constexpr int kOffV = kOffK + align128(kBlockK * kLdT * 2);
  static constexpr int kOffS = kOffV + align128(kBlockK * kLdT * 2);
  static constexpr int kOffP = kOffS + align128(kBlockQ * kLdS * 4);
  static constexpr int kOffO = kOffP + align128(kBlockQ * kLdP * 2);
  static constexpr int kOffBias = kOffO + align128(kBlockQ * kLdO * 4);
  static constexpr int kOffRow = kOffBias + align128(kBlockK * 4);
  static constexpr int kSmemBytes = kOffRow + align128(kBlockQ * 4);
  static_assert(kD % 16 == 0 && kBlockK % 16 == 0, "WMMA tiles are 16 x 16");
  static_assert(kSmemBytes <= 99 * 1024, "must fit sm_86's 99 KB per block");
};

// grid (ceil(Lq / kBlockQ) * num_splits, Hq, B). Output rows are written only for i < Lq.
template <typename T, int kD, bool kCausal>
__global__ void __launch_bounds__(FwdTraits<kD>::kThreads)
    attention_fwd_kernel(const AttentionFwdParams p) {
  using Tr = FwdTraits<kD>;
  constexpr int kBlockQ = Tr::kBlockQ, kBlockK = Tr::kBlockK, kThreads = Tr::kThreads;
  constexpr int kLdT = Tr::kLdT, kLdS = Tr::kLdS, kLdP = Tr::kLdP, kLdO = Tr::kLdO;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + Tr::kOffQ);            // [kBlockQ, kLdT]
  T* sK = reinterpret_cast<T*>(smem + Tr::kOffK);            // [kBlockK, kLdT]
  T* sV = reinterpret_cast<T*>(smem + Tr::kOffV);            // [kBlockK, kLdT]
  float* sS = reinterpret_cast<float*>(smem + Tr::kOffS);    // [kBlockQ, kLdS]
  T* sP = reinterpret_cast<T*>(smem + Tr::kOffP);            // [kBlockQ, kLdP]
  float* sO = reinterpret_cast<float*>(smem + Tr::kOffO);    // [kBlockQ, kLdO]
  float* sBias = reinterpret_cast<float*>(smem + Tr::kOffBias);  // [kBlockK]
  float* sRow = reinterpret_cast<float*>(smem + Tr::kOffRow);    // [kBlockQ] 1 / l

  const int split = blockIdx.x % p.num_splits;
  const int i0 = (blockIdx.x / p.num_splits) * kBlockQ;
  const int h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);  // GQA: K/V are read in place, never repeated
  const int offset = p.Lk - p.Lq;     // bottom-right causal alignment
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const float* bias = p.key_bias ? p.key_bias + b * p.bias_batch_stride : nullptr;

  // This block's keys: its split's range, cut at the causal horizon of its last row (causal
  // block skipping: tiles wholly above the diagonal are never loaded).
  const int k_begin = split * p.keys_per_split;
  int k_end = min(p.Lk, k_begin + p.keys_per_split);
  if (kCausal) k_end = min(k_end, min(i0 + kBlockQ, p.Lq) + offset);

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  load_tile<T, kBlockQ, kD, kLdT, kThreads>(sQ, q, p.q_row_stride, i0, p.Lq);
  for (int idx = tid; idx < kBlockQ * kLdO; idx += kThreads) sO[idx] = 0.f;
  __syncthreads();  // sQ and sO complete before any warp reads them

  // The warp's Q rows stay in registers for the whole key loop.
  FragA<T> qf[kD / 16];
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) wmma::load_matrix_sync(qf[kk], sQ + warp * 16 * kLdT + kk * 16, kLdT);

  const int r = lane >> 1, half = lane & 1;  // this lane's row within the warp, and column parity
  const int row = warp * 16 + r;
  const int row_limit = kCausal ? i0 + row + offset + 1 : INT_MAX;  // row sees keys j < row_limit
  float* sS_w = sS + warp * 16 * kLdS;
  T* sP_w = sP + warp * 16 * kLdP;
  float* sO_w = sO + warp * 16 * kLdO;
  float m = kNegInf, l = 0.f;  // running max and sum of exp(x - m) of this row

  for (int j0 = k_begin; j0 < k_end; j0 += kBlockK) {
    __syncthreads();  // every warp is done with the previous K, V and bias tiles
    // Rows >= k_end load as zeros and their columns are masked below; zero V rows keep
    // 0 * garbage out of the P V product.
    load_tile<T, kBlockK, kD, kLdT, kThreads>(sK, k, p.k_row_stride, j0, k_end);
    load_tile<T, kBlockK, kD, kLdT, kThreads>(sV, v, p.v_row_stride, j0, k_end);
    for (int c = tid; c < kBlockK; c += kThreads) {
      sBias[c] = j0 + c < k_end ? (bias ? bias[j0 + c] : 0.f) : kNegInf;
    }
    __syncthreads();  // the tiles are complete

    // S = Q K^T for the warp's 16 rows (K read column-major gives K^T).
#pragma unroll
    for (int n = 0; n < kBlockK / 16; ++n) {
      FragC s;
      wmma::fill_fragment(s, 0.f);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        FragBCol<T> kf;
        wmma::load_matrix_sync(kf, sK + n * 16 * kLdT + kk * 16, kLdT);
        wmma::mma_sync(s, qf[kk], kf, s);
      }
      wmma::store_matrix_sync(sS_w + n * 16, s, kLdS, wmma::mem_row_major);
    }
    __syncwarp();  // the fragment stores are visible to the lanes that own each row

    // Online softmax of x = scale * q.k + key_bias (masked: -inf).
    float mx = kNegInf;
    for (int c = half; c < kBlockK; c += 2) {
      float x = sS_w[r * kLdS + c] * p.scale + sBias[c];
      if (kCausal && j0 + c >= row_limit) x = kNegInf;
      sS_w[r * kLdS + c] = x;
      mx = fmaxf(mx, x);
    }
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    const float m_new = fmaxf(m, mx);
    // A row that has seen no finite logit yet has m_new = -inf; shifting by 0 instead keeps
    // exp(-inf - -inf) = NaN out: its p stay 0 and l, O stay 0.
    const float m_use = m_new == kNegInf ? 0.f : m_new;
    const float alpha = __expf(m - m_use);  // 0 when m = -inf
    float sum = 0.f;
    for (int c = half; c < kBlockK; c += 2) {
      const float pr = __expf(sS_w[r * kLdS + c] - m_use);
      sum += pr;
      sP_w[r * kLdP + c] = from_float<T>(pr);
    }
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    l = l * alpha + sum;
    m = m_new;
    for (int d = half; d < kD; d += 2) sO_w[r * kLdO + d] *= alpha;
    __syncwarp();  // P and the rescaled O rows are visible to the whole warp

    // O += P V
#pragma unroll
    for (int n = 0; n < kD / 16; ++n) {
      FragC o;
      wmma::load_matrix_sync(o, sO_w + n * 16, kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBlockK / 16; ++kk) {
        FragA<T> pf;
        FragBRow<T> vf;
        wmma::load_matrix_sync(pf, sP_w + kk * 16, kLdP);
        wmma::load_matrix_sync(vf, sV + kk * 16 * kLdT + n * 16, kLdT);
        wmma::mma_sync(o, pf, vf, o);
      }
      wmma::store_matrix_sync(sO_w + n * 16, o, kLdO, wmma::mem_row_major);
    }
    __syncwarp();  // O stores land before the next tile's rescale reads them
  }

  // l = 0 exactly when the row saw no finite logit: out 0 and lse -inf, never NaN.
  const float row_lse = l > 0.f ? m + logf(l) : kNegInf;
  if (half == 0) sRow[row] = l > 0.f ? 1.f / l : 0.f;
  __syncwarp();  // sRow and the last O stores are visible to every lane of the warp

  const int64_t bh = int64_t(b) * p.Hq + h;
  const int i = i0 + row;
  if (p.num_splits > 1) {
    // Partial result of this key range, normalised by its own l; the combine kernel reweights.
    const int64_t base = (int64_t(split) * p.B * p.Hq + bh) * p.Lq;
    if (half == 0 && i < p.Lq) p.lse_accum[base + i] = row_lse;
    for (int rr = 0; rr < 16; ++rr) {
      const int ii = i0 + warp * 16 + rr;
      if (ii >= p.Lq) break;
      const float inv = sRow[warp * 16 + rr];
      float* dst = p.out_accum + (base + ii) * kD;
      for (int d = lane; d < kD; d += 32) dst[d] = sO_w[rr * kLdO + d] * inv;
    }
  } else {
    if (half == 0 && i < p.Lq) p.lse[bh * p.Lq + i] = row_lse;
    T* out = static_cast<T*>(p.out);
    for (int rr = 0; rr < 16; ++rr) {
      const int ii = i0 + warp * 16 + rr;
      if (ii >= p.Lq) break;
      const float inv = sRow[warp * 16 + rr];
      T* dst = out + (bh * p.Lq + ii) * kD;
      for (int d = lane; d < kD; d += 32) dst[d] = from_float<T>(sO_w[rr * kLdO + d] * inv);
    }
  }
}

// Merges the num_splits partial results of each row (flash-decoding):
// lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) out_s. Splits that saw no key have
// lse_s = -inf and weight 0; a row where all did gets out 0 and lse -inf.
// One warp per row; grid ceil(B * Hq * Lq / 4), 128 threads.
template <typename T, int kD>
__global__ void __launch_bounds__(128) attention_fwd_combine_kernel(const AttentionFwdParams p) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  const int64_t row = int64_t(blockIdx.x) * 4 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  float lse_max = kNegInf;
  for (int s = 0; s < p.num_splits; ++s) lse_max = fmaxf(lse_max, p.lse_accum[s * rows + row]);
  T* out = static_cast<T*>(p.out) + row * kD;
  if (lse_max == kNegInf) {
    if (lane == 0) p.lse[row] = kNegInf;
    for (int d = lane; d < kD; d += 32) out[d] = from_float<T>(0.f);
    return;
  }
  float sum = 0.f;
  for (int s = 0; s < p.num_splits; ++s) sum += __expf(p.lse_accum[s * rows + row] - lse_max);
  const float lse = lse_max + logf(sum);
  if (lane == 0) p.lse[row] = lse;
  for (int d = lane; d < kD; d += 32) {
    float acc = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float w = __expf(p.lse_accum[s * rows + row] - lse);  // exp(-inf) = 0 for empty splits
      acc += w * p.out_accum[(s * rows + row) * kD + d];
    }
    out[d] = from_float<T>(acc);
  }
}

template <typename T, int kD>
void run_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<kD>;
  const int n_qblocks = (p.Lq + Tr::kBlockQ - 1) / Tr::kBlockQ;
  BOOL_SWITCH(p.causal, kCausal, [&] {
    auto kernel = &attention_fwd_kernel<T, kD, kCausal>;
    // Above 48 KB a block's dynamic shared memory must be opted into per kernel.
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    const dim3 grid(n_qblocks * p.num_splits, p.Hq, p.B);
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  });
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
    attention_fwd_combine_kernel<T, kD><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(p);
  }
}

}  // namespace atp::cuda
