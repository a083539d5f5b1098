// atp_attention backward on CUDA (DESIGN §3.1): FlashAttention-2's backward on mma.sync tensor
// cores, five matmuls per (query block, key block), deterministic (no atomics, a fixed summation
// order for every output element). Included only by attention_bwd_<dtype>_hdim<D>.cu.
//
//   delta_i = rowsum(dO_i * O_i) - dlse_i                        (attention_bwd_delta_kernel)
//   P_ij    = exp(scale q_i.k_j + key_bias_j - lse_i), 0 where causal-masked
//   dP = dO V^T,  dS = P * (dP - delta)
//   dV = P^T dO,  dK = scale dS^T Q,  d key_bias_j = sum_i dS_ij,  dQ = scale dS K
//
// One block owns kBlockN keys of one (batch, query head) and walks the query blocks of kBlockM
// rows (attention_bwd_kernel). Per query block its 8 warps compute S = Q K^T and dP = dO V^T
// once, as mma accumulators (warps 2 x 4 over rows x keys), turn them into P and dS in
// registers, and store those two (16-bit) to shared memory: the only shared stores of the loop
// (stmatrix on sm_90, a quarter of the store instructions of st.shared for the same bytes).
// dV += P^T dO and dK += dS^T Q read P^T and dS^T by ldmatrix.trans and accumulate in
// registers across the whole walk (warps 4 x 2 over keys x head dim); dQ's share, dS K, is added
// to a float32 accumulator in global memory. Q, dO, K and V arrive by cp.async (Q double-buffered
// where shared memory allows, so the next block's Q loads during this block's work; dO loads
// while dQ and the next S are computed).
//
// Determinism without atomics: the key blocks of a (batch, head) are dealt to num_splits blocks
// (split s takes key blocks s, s + num_splits, ...), and each split adds into its own dq_accum
// slice, every element always by the same thread in key-block order; attention_bwd_dq_kernel
// then sums the slices in split order. (FlashAttention-2's deterministic mode does the same; its
// default adds with float atomics.)
//
// With p.grad_bias, d key_bias_j = sum_i exp(scale q_i.k_j + grad_bias_j - lse_i) (dP_ij - delta_i)
// instead (the key mask's gradient, attention_params.h); dQ, dK, dV are unchanged. No key block
// is skipped for being masked in key_bias (only causal masking skips work), so keys at -inf in
// key_bias but finite in grad_bias get their sums. A row with lse = -inf (no finite logit) is
// given lse = +inf, so its P is exp(x - inf) = 0 and it contributes nothing.
//
// dK, dV and d key_bias are produced per query head into float32 buffers and summed over the
// GQA group on the host, as the CPU implementation does.
#pragma once
#include "cuda/attention_common.cuh"
#include "cuda/launch.h"
#include "cuda/ptx.cuh"
#include "cuda/static_switch.h"
#include "cuda/tiles.cuh"

namespace atp::cuda {

template <int kD, int kBlockM_, int kBlockN_, int kQStages_>
struct BwdTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = kBlockM_;  // query rows per iteration
  static constexpr int kBlockN = kBlockN_;  // keys per block
  static constexpr int kLd = kD + 8;        // pitch of the Q, dO, K, V tiles
  static constexpr int kLdP = kBlockN + 8;  // pitch of the P and dS tiles ([kBlockM, kBlockN])
  // S and dP: warps 2 (rows) x 4 (keys), kSM m tiles x kSN n tiles each.
  static constexpr int kSM = kBlockM / 2 / 16, kSN = kBlockN / 4 / 8;
  // dK and dV: warps 4 (keys) x 2 (head dim), kKM x kKN tiles each.
  static constexpr int kKM = kBlockN / 4 / 16, kKN = kD / 2 / 8;
  // dQ: warps kQWarpsM (rows, 16 kQM each) x kQWarpsD (head dim), kQM x kQN tiles each: 32 rows
  // a warp where the head dim splits into an even number of n tiles per warp, else (D = 96) 16.
  static constexpr int kQM = kD % 64 == 0 ? 2 : 1;
  static constexpr int kQWarpsM = kBlockM / 16 / kQM, kQWarpsD = kWarps / kQWarpsM, kQN = kD / kQWarpsD / 8;
  static constexpr int kTileQ = kBlockM * kLd, kTileK = kBlockN * kLd, kTileP = kBlockM * kLdP;
  static constexpr int kQStages = kQStages_;  // 2: the next Q loads while this block computes
  static constexpr int kOffK = 0;
  static constexpr int kOffV = kOffK + kTileK * 2;
  static constexpr int kOffQ = kOffV + kTileK * 2;
  static constexpr int kOffdO = kOffQ + kQStages * kTileQ * 2;
  static constexpr int kOffP = kOffdO + kTileQ * 2;
  static constexpr int kOffdS = kOffP + kTileP * 2;
  static constexpr int kSmemBytes = kOffdS + kTileP * 2;
  static_assert(kSM >= 1 && kKM >= 1 && kSN % 2 == 0 && kKN % 2 == 0 && kQN % 2 == 0,
                "ldmatrix.x4 reads the B operands of two n tiles");
  static_assert(2 * kBlockN * 4 <= kTileP * 2, "the d key_bias reduction reuses the P tile");
};

// The tiles per head dim: large where an SM has 164 KB of shared memory (sm_80, sm_90), small for
// sm_86's 99 KB per block (launch.h's bwd_block_m / bwd_block_n say the same to the host).
template <int kD, bool kLarge>
using BwdTiles = BwdTraits<kD, kLarge && kD <= 64 ? 128 : 64, kLarge || kD <= 64 ? 128 : 64, kLarge || kD <= 64 ? 2 : 1>;
static_assert(BwdTiles<128, true>::kSmemBytes + 1024 <= 164 * 1024 && BwdTiles<96, true>::kSmemBytes + 1024 <= 164 * 1024 &&
                  BwdTiles<64, true>::kSmemBytes + 1024 <= 164 * 1024,
              "the large tiles fit sm_80's 164 KB per SM");
static_assert(BwdTiles<128, false>::kSmemBytes <= 99 * 1024 && BwdTiles<96, false>::kSmemBytes <= 99 * 1024 &&
                  BwdTiles<64, false>::kSmemBytes <= 99 * 1024,
              "the small tiles fit sm_86's 99 KB per block");

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

// Column sums of a warp's mma accumulators, reduced and scattered in one pass: v holds this
// lane's kN = 2 kSN column values (index 2 nt + e: column 8 nt + 2 t + e); the result, on lane
// (g, t), is the sum over the 8 lanes of its t of value column_of<kN>(g). Halving the set at each
// shuffle costs kN - 1 shuffles and leaves one register per lane, not kN.
template <int kN>
__device__ __forceinline__ int column_of(int g) { return kN == 8 ? g : g >> 1; }
template <int kN>
__device__ __forceinline__ float column_sums(const float (&v)[kN], int g) {
  static_assert(kN == 8 || kN == 4, "2 or 4 key n tiles per warp");
  constexpr int kHalf = kN / 2;
  float a[kHalf];
  const bool up2 = g & 4;
#pragma unroll
  for (int j = 0; j < kHalf; ++j) a[j] = (up2 ? v[j + kHalf] : v[j]) + ptx::shfl_xor(up2 ? v[j] : v[j + kHalf], 16);
  const bool up1 = g & 2;
  if constexpr (kN == 8) {
    float b[2];
#pragma unroll
    for (int j = 0; j < 2; ++j) b[j] = (up1 ? a[j + 2] : a[j]) + ptx::shfl_xor(up1 ? a[j] : a[j + 2], 8);
    const bool up0 = g & 1;
    return (up0 ? b[1] : b[0]) + ptx::shfl_xor(up0 ? b[0] : b[1], 4);
  } else {
    const float b = (up1 ? a[1] : a[0]) + ptx::shfl_xor(up1 ? a[0] : a[1], 8);
    return b + ptx::shfl_xor(b, 4);
  }
}

// grid (num_splits, Hq, B), kThreads threads.
template <typename T, int kD, bool kLarge, bool kCausal>
__global__ void __launch_bounds__(BwdTiles<kD, kLarge>::kThreads, 1)
    attention_bwd_kernel(const AttentionBwdParams p) {
  using Tr = BwdTiles<kD, kLarge>;
  constexpr int kBlockM = Tr::kBlockM, kBlockN = Tr::kBlockN;
  constexpr int kThreads = Tr::kThreads, kLd = Tr::kLd, kLdP = Tr::kLdP;
  constexpr int kSM = Tr::kSM, kSN = Tr::kSN, kKM = Tr::kKM, kKN = Tr::kKN, kQM = Tr::kQM, kQN = Tr::kQN;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem + Tr::kOffK);    // [kBlockN, kLd]
  T* sV = reinterpret_cast<T*>(smem + Tr::kOffV);    // [kBlockN, kLd]
  T* sQ = reinterpret_cast<T*>(smem + Tr::kOffQ);    // [kQStages][kBlockM, kLd]
  T* sdO = reinterpret_cast<T*>(smem + Tr::kOffdO);  // [kBlockM, kLd]
  T* sP = reinterpret_cast<T*>(smem + Tr::kOffP);    // [kBlockM, kLdP]
  T* sdS = reinterpret_cast<T*>(smem + Tr::kOffdS);  // [kBlockM, kLdP]

  const int split = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (p.Hq / p.Hkv);
  const int offset = p.Lk - p.Lq;  // bottom-right causal alignment
  const int64_t bh = int64_t(b) * p.Hq + h;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* dout = static_cast<const T*>(p.dout) + b * p.dout_batch_stride + h * p.dout_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const int n_qblocks = (p.Lq + kBlockM - 1) / kBlockM;
  const int n_kblocks = (p.Lk + kBlockN - 1) / kBlockN;
  const float scale_log2 = p.scale * kLog2e;
  float* dq_slice = p.dq_accum + (int64_t(split) * p.B * p.Hq + bh) * p.Lq * kD;

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;  // fragment row group and column pair
  const int s_row0 = (warp % 2) * (kBlockM / 2), s_key0 = (warp / 2) * (kBlockN / 4);  // S, dP
  const int kv_key0 = (warp % 4) * (kBlockN / 4), kv_d0 = (warp / 4) * (kD / 2);      // dK, dV
  const int dq_row0 = (warp % Tr::kQWarpsM) * 16 * kQM, dq_d0 = (warp / Tr::kQWarpsM) * (kD / Tr::kQWarpsD);

  for (int nb = split; nb < n_kblocks; nb += p.num_splits) {
    const int j0 = nb * kBlockN;
    // Causal: the first query row that sees key j0 is j0 - offset; earlier blocks are skipped.
    const int m_begin = kCausal ? max(0, j0 - offset) / kBlockM : 0;
    __syncthreads();  // the previous key block's last reads of every tile are done
    cp_async_tile<T, kBlockN, kD, kThreads>(sK, k, p.k_row_stride, j0, p.Lk);
    cp_async_tile<T, kBlockN, kD, kThreads>(sV, v, p.v_row_stride, j0, p.Lk);
    if (m_begin < n_qblocks) {
      cp_async_tile<T, kBlockM, kD, kThreads>(sQ, q, p.q_row_stride, m_begin * kBlockM, p.Lq);
      cp_async_tile<T, kBlockM, kD, kThreads>(sdO, dout, p.dout_row_stride, m_begin * kBlockM, p.Lq);
    }
    ptx::cp_async_commit();

    float dk[kKM][kKN][4], dv[kKM][kKN][4];
    zero_fragments(dk);
    zero_fragments(dv);
    float dbias = 0.f;  // sum_i dS_ij of this lane's column (column_sums) over the warp's rows

    for (int mb = m_begin; mb < n_qblocks; ++mb) {
      const int i0 = mb * kBlockM;
      const T* tQ = sQ + (Tr::kQStages == 2 ? (mb - m_begin) & 1 : 0) * Tr::kTileQ;
      // lse (base 2, +inf for rows past Lq or with no finite logit) and delta of this lane's rows.
      const float* lse = p.lse + bh * p.Lq;
      const float* delta = p.delta + bh * p.Lq;
      float lse2[kSM][2], dlt[kSM][2];
#pragma unroll
      for (int mi = 0; mi < kSM; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = i0 + s_row0 + mi * 16 + g + 8 * hf;
          const float x = i < p.Lq ? ptx::ld_global(lse + i) : kPosInf;
          lse2[mi][hf] = x == kNegInf ? kPosInf : x * kLog2e;
          dlt[mi][hf] = i < p.Lq ? ptx::ld_global(delta + i) : 0.f;
        }

      ptx::cp_async_wait<0>();
      __syncthreads();  // the tiles have landed; every warp is done with the previous block's dS
      if (Tr::kQStages == 2 && mb + 1 < n_qblocks) {  // the next Q into the other stage (free now)
        cp_async_tile<T, kBlockM, kD, kThreads>(sQ + ((mb + 1 - m_begin) & 1) * Tr::kTileQ, q,
                                                p.q_row_stride, i0 + kBlockM, p.Lq);
      }
      ptx::cp_async_commit();

      // S = Q K^T and dP = dO V^T for the warp's 16 kSM rows x 8 kSN keys. (This loop and the
      // dV/dK and dQ ones are written out: through one shared helper, ptxas spilled 8-44 bytes.)
      float s[kSM][kSN][4], dp[kSM][kSN][4];
      zero_fragments(s);
      zero_fragments(dp);
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[kSM][4];
#pragma unroll
        for (int mi = 0; mi < kSM; ++mi) load_a<kLd>(a[mi], tQ, s_row0 + 16 * mi, 16 * kk);
#pragma unroll
        for (int np = 0; np < kSN / 2; ++np) {
          uint32_t kb[4];
          load_b<kLd>(kb, sK, s_key0 + 16 * np, 16 * kk);
#pragma unroll
          for (int mi = 0; mi < kSM; ++mi) {
            ptx::mma_16816<T>(s[mi][2 * np], a[mi], kb[0], kb[1]);
            ptx::mma_16816<T>(s[mi][2 * np + 1], a[mi], kb[2], kb[3]);
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) {
        uint32_t a[kSM][4];
#pragma unroll
        for (int mi = 0; mi < kSM; ++mi) load_a<kLd>(a[mi], sdO, s_row0 + 16 * mi, 16 * kk);
#pragma unroll
        for (int np = 0; np < kSN / 2; ++np) {
          uint32_t vb[4];
          load_b<kLd>(vb, sV, s_key0 + 16 * np, 16 * kk);
#pragma unroll
          for (int mi = 0; mi < kSM; ++mi) {
            ptx::mma_16816<T>(dp[mi][2 * np], a[mi], vb[0], vb[1]);
            ptx::mma_16816<T>(dp[mi][2 * np + 1], a[mi], vb[2], vb[3]);
          }
        }
      }

      // P = exp2(scale log2(e) s + key_bias log2(e) - lse log2(e)), 0 past the causal horizon and
      // for keys >= Lk; dS = P (dP - delta); the column sums of dS (or of the grad_bias weights).
      const bool causal_block = kCausal && j0 + kBlockN - 1 > i0 + offset;
      const float* bias_row = p.key_bias ? p.key_bias + ptx::opaque(b) * p.bias_batch_stride : nullptr;
      const float* gbias_row = p.grad_bias ? p.grad_bias + ptx::opaque(b) * p.grad_bias_batch_stride : nullptr;
      float colsum[2 * kSN];
#pragma unroll
      for (int c = 0; c < 2 * kSN; ++c) colsum[c] = 0.f;
#pragma unroll
      for (int nt = 0; nt < kSN; ++nt) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int j = j0 + s_key0 + nt * 8 + 2 * t + e;
          const bool key_ok = j < p.Lk;
          const float kb2 = key_ok ? (bias_row ? ptx::ld_global(bias_row + j) * kLog2e : 0.f) : kNegInf;
#pragma unroll
          for (int mi = 0; mi < kSM; ++mi) {
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              const int i = i0 + s_row0 + mi * 16 + g + 8 * hf;
              const bool visible = !causal_block || j <= i + offset;
              const float x = s[mi][nt][2 * hf + e];
              const float pr = visible ? ptx::exp2(fmaf(x, scale_log2, kb2) - lse2[mi][hf]) : 0.f;
              const float gd = dp[mi][nt][2 * hf + e] - dlt[mi][hf];
              const float ds = pr * gd;
              if (gbias_row) {  // uniform across the grid
                const float gb2 = key_ok ? ptx::ld_global(gbias_row + j) * kLog2e : kNegInf;
                colsum[2 * nt + e] += (visible ? ptx::exp2(fmaf(x, scale_log2, gb2) - lse2[mi][hf]) : 0.f) * gd;
              } else {
                colsum[2 * nt + e] += ds;
              }
              s[mi][nt][2 * hf + e] = pr;
              dp[mi][nt][2 * hf + e] = ds;
            }
          }
        }
      }
      dbias += column_sums(colsum, g);
#pragma unroll
      for (int mi = 0; mi < kSM; ++mi)
#pragma unroll
        for (int np = 0; np < kSN / 2; ++np) {
          store_c_pair<kLdP>(sP, s_row0 + 16 * mi, s_key0 + 16 * np, s[mi][2 * np], s[mi][2 * np + 1]);
          store_c_pair<kLdP>(sdS, s_row0 + 16 * mi, s_key0 + 16 * np, dp[mi][2 * np], dp[mi][2 * np + 1]);
        }

      __syncthreads();  // P and dS are complete

      // dV += P^T dO, then dK += dS^T Q (dK's scale is applied once, at the end).
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        uint32_t pa[kKM][4];
#pragma unroll
        for (int mi = 0; mi < kKM; ++mi) load_a_trans<kLdP>(pa[mi], sP, kv_key0 + 16 * mi, 16 * kk);
#pragma unroll
        for (int np = 0; np < kKN / 2; ++np) {
          uint32_t bm[4];
          load_b_trans<kLd>(bm, sdO, kv_d0 + 16 * np, 16 * kk);
#pragma unroll
          for (int mi = 0; mi < kKM; ++mi) {
            ptx::mma_16816<T>(dv[mi][2 * np], pa[mi], bm[0], bm[1]);
            ptx::mma_16816<T>(dv[mi][2 * np + 1], pa[mi], bm[2], bm[3]);
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < kBlockM / 16; ++kk) {
        uint32_t dsa[kKM][4];
#pragma unroll
        for (int mi = 0; mi < kKM; ++mi) load_a_trans<kLdP>(dsa[mi], sdS, kv_key0 + 16 * mi, 16 * kk);
#pragma unroll
        for (int np = 0; np < kKN / 2; ++np) {
          uint32_t bm[4];
          load_b_trans<kLd>(bm, tQ, kv_d0 + 16 * np, 16 * kk);
#pragma unroll
          for (int mi = 0; mi < kKM; ++mi) {
            ptx::mma_16816<T>(dk[mi][2 * np], dsa[mi], bm[0], bm[1]);
            ptx::mma_16816<T>(dk[mi][2 * np + 1], dsa[mi], bm[2], bm[3]);
          }
        }
      }
      __syncthreads();  // every warp is done with dO (and with this Q stage)
      if (mb + 1 < n_qblocks) {
        cp_async_tile<T, kBlockM, kD, kThreads>(sdO, dout, p.dout_row_stride, i0 + kBlockM, p.Lq);
        if (Tr::kQStages == 1) cp_async_tile<T, kBlockM, kD, kThreads>(sQ, q, p.q_row_stride, i0 + kBlockM, p.Lq);
      }
      ptx::cp_async_commit();

      // dQ so far (this split's slice) for the warp's dQ rows, the accumulators' start: loaded
      // once the next tiles' copies are issued.
      float dq[kQM][kQN][4];
#pragma unroll
      for (int mi = 0; mi < kQM; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = i0 + dq_row0 + mi * 16 + g + 8 * hf;
#pragma unroll
          for (int nt = 0; nt < kQN; ++nt) {
            const float2 x = i < p.Lq ? ptx::ld_global_2(dq_slice + int64_t(i) * kD + dq_d0 + nt * 8 + 2 * t)
                                      : make_float2(0.f, 0.f);
            dq[mi][nt][2 * hf] = x.x, dq[mi][nt][2 * hf + 1] = x.y;
          }
        }
      // dQ += dS K (scaled once, by the final sum).
#pragma unroll
      for (int kk = 0; kk < kBlockN / 16; ++kk) {
        uint32_t a[kQM][4];
#pragma unroll
        for (int mi = 0; mi < kQM; ++mi) load_a<kLdP>(a[mi], sdS, dq_row0 + 16 * mi, 16 * kk);
#pragma unroll
        for (int np = 0; np < kQN / 2; ++np) {
          uint32_t kb[4];
          load_b_trans<kLd>(kb, sK, dq_d0 + 16 * np, 16 * kk);
#pragma unroll
          for (int mi = 0; mi < kQM; ++mi) {
            ptx::mma_16816<T>(dq[mi][2 * np], a[mi], kb[0], kb[1]);
            ptx::mma_16816<T>(dq[mi][2 * np + 1], a[mi], kb[2], kb[3]);
          }
        }
      }
#pragma unroll
      for (int mi = 0; mi < kQM; ++mi)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int i = i0 + dq_row0 + mi * 16 + g + 8 * hf;
          if (i >= p.Lq) continue;
#pragma unroll
          for (int nt = 0; nt < kQN; ++nt) {
            ptx::st_global_2(dq_slice + int64_t(i) * kD + dq_d0 + nt * 8 + 2 * t, dq[mi][nt][2 * hf],
                             dq[mi][nt][2 * hf + 1]);
          }
        }
    }
    ptx::cp_async_wait<0>();  // nothing may land in shared memory after this point

    // d key_bias: the two row warps of each key range summed through shared memory (the P tile,
    // free now), in a fixed order.
    float* sRed = reinterpret_cast<float*>(sP);  // [2][kBlockN]
    __syncthreads();  // every warp is done reading sP and sdS
    if (kSN == 4 || (g & 1) == 0) {
      const int c = column_of<2 * kSN>(g);
      ptx::st_shared_f(sRed + (warp % 2) * kBlockN + s_key0 + (c >> 1) * 8 + 2 * t + (c & 1), dbias);
    }
    __syncthreads();  // both halves are in
    for (int c = threadIdx.x; c < kBlockN; c += kThreads) {
      if (j0 + c < p.Lk) {
        ptx::st_global(p.dbias_accum + (int64_t(ptx::opaque(b)) * p.Hq + h) * p.Lk + j0 + c, ptx::ld_shared_f(sRed + c) + ptx::ld_shared_f(sRed + kBlockN + c));
      }
    }

    // dK, dV rows of this key block (float, per query head).
    const int64_t key_row0 = (int64_t(ptx::opaque(b)) * p.Hq + h) * p.Lk;
    float* dk_rows = p.dk_accum + key_row0 * kD;
    float* dv_rows = p.dv_accum + key_row0 * kD;
#pragma unroll
    for (int mi = 0; mi < kKM; ++mi)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int j = j0 + kv_key0 + mi * 16 + g + 8 * hf;
        if (j >= p.Lk) continue;
#pragma unroll
        for (int nt = 0; nt < kKN; ++nt) {
          const int64_t at = int64_t(j) * kD + kv_d0 + nt * 8 + 2 * t;
          ptx::st_global_2(dk_rows + at, dk[mi][nt][2 * hf] * p.scale, dk[mi][nt][2 * hf + 1] * p.scale);
          ptx::st_global_2(dv_rows + at, dv[mi][nt][2 * hf], dv[mi][nt][2 * hf + 1]);
        }
      }
  }
}

// dq = scale * (the sum of the num_splits dq_accum slices, in split order), 4 elements per thread.
template <typename T>
__global__ void __launch_bounds__(256) attention_bwd_dq_kernel(const AttentionBwdParams p) {
  const int64_t n = int64_t(p.B) * p.Hq * p.Lq * p.D / 4;
  const int64_t idx = int64_t(blockIdx.x) * 256 + threadIdx.x;
  if (idx >= n) return;
  float4 acc = reinterpret_cast<const float4*>(p.dq_accum)[idx];
  for (int s = 1; s < p.num_splits; ++s) {
    const float4 x = reinterpret_cast<const float4*>(p.dq_accum)[s * n + idx];
    acc.x += x.x, acc.y += x.y, acc.z += x.z, acc.w += x.w;
  }
  T* dq = static_cast<T*>(p.dq) + idx * 4;
  dq[0] = from_float<T>(acc.x * p.scale);
  dq[1] = from_float<T>(acc.y * p.scale);
  dq[2] = from_float<T>(acc.z * p.scale);
  dq[3] = from_float<T>(acc.w * p.scale);
}

template <typename T, int kD, bool kLarge>
void run_attention_bwd_tiles(const AttentionBwdParams& p, cudaStream_t stream) {
  using Tr = BwdTiles<kD, kLarge>;
  BOOL_SWITCH(p.causal, kCausal, [&] {
    auto kernel = &attention_bwd_kernel<T, kD, kLarge, kCausal>;
    // Above 48 KB a block's dynamic shared memory must be opted into per kernel.
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    kernel<<<dim3(p.num_splits, p.Hq, p.B), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  });
}

// Requires p.num_splits >= 1 and p.dq_accum zeroed, of num_splits x B x Hq x Lq x D floats.
template <typename T, int kD>
void run_attention_bwd(const AttentionBwdParams& p, cudaStream_t stream) {
  const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
  if (rows > 0) attention_bwd_delta_kernel<T><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(p);
  if (p.Lk > 0) {
    int dev = 0, smem_per_sm = 0;
    cudaGetDevice(&dev);
    cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
    BOOL_SWITCH(bwd_large_tiles(smem_per_sm), kLarge, [&] { run_attention_bwd_tiles<T, kD, kLarge>(p, stream); });
  }
  const int64_t quads = rows * kD / 4;
  if (quads > 0) attention_bwd_dq_kernel<T><<<unsigned((quads + 255) / 256), 256, 0, stream>>>(p);
}

}  // namespace atp::cuda
