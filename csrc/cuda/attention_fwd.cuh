// atp_attention forward on CUDA (DESIGN §3.1): FlashAttention-2's algorithm on mma.sync tensor
// cores with S, P and O in registers. One block owns kBlockQ query rows of one (batch, query head)
// and walks the key tiles with an online softmax; nothing of size Lq x Lk exists. Included only by
// the per-(dtype, head dim) instantiation files attention_fwd_<dtype>_hdim<D>.cu.
//
// Work split: each of the 4 warps owns 32 query rows (two m16 tiles) end to end. Per key tile a
// warp computes S = Q K^T into mma accumulators, applies scale, key_bias and the causal horizon,
// updates its rows' running max and sum with quad shuffles, turns the accumulators into the A
// operand of O += P V without leaving registers, and reads K (ldmatrix) and V (ldmatrix.trans)
// from shared memory. Tiles arrive by cp.async, K and V double-buffered: the copy of tile t + 1
// runs while tile t is computed, and one barrier per tile separates them. Shared tiles have rows
// of kD + 8 elements: the 8 rows an ldmatrix phase reads start 16 bytes apart modulo 128, so they
// hit 32 distinct banks, and every k-step's address is the previous one plus an immediate (an
// XOR swizzle saves the padding but its per-lane addresses cost the registers that O needs at
// D = 128: measured, 40-56 bytes of spills).
//
// Rows: a block's rows are rows [i0, i0 + kBlockQ) of the (head, query) sequence of its head
// group, row r being query r % Lq of head head0 + r / Lq. In prefill the group is one query head
// (grid.y = Hq); in decode (kDecode, Lq <= 16) it is the Hq / Hkv query heads of one KV head
// (grid.y = Hkv; one head when Hq = Hkv), so their K/V tiles are read once for all of them.
// Either way output row r sits at (b Hq + head0) Lq + r of out and lse. A warp whose rows are all
// past the group's (decode: every warp but the first when the group has <= 32 rows; the last row
// block of a prefill) copies tiles and takes the barriers but computes nothing.
//
// Decode skips the key tiles whose keys are all removed (-inf key_bias: a ragged batch's padding,
// a pruned cache): neither loaded nor computed. Each tile barrier also ORs, over the block,
// whether the next tile has a live key. (Prefill does not: at D = 128 the registers it takes
// make ptxas spill, and there compute, not reading K/V, is the cost.)
//
// Key tiles per architecture: kBlockK = 64 where two blocks fit in an SM's shared memory (sm_90:
// 2 x 102 KB at D = 128, 2 x 78 KB at D = 96, which sm_80 fits too), else 32 (D = 128 on sm_80:
// two blocks of 68 KB; sm_86: one). D = 64 always uses 64; decode at D = 128 always 32
// (fwd_block_k_for).
#pragma once
#include "cuda/attention_common.cuh"
#include "cuda/launch.h"
#include "cuda/ptx.cuh"
#include "cuda/static_switch.h"
#include "cuda/tiles.cuh"

namespace atp::cuda {

template <int kD, int kBlockK_ = 64>
struct FwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kMTiles = 2;                       // m16 tiles per warp: 32 rows
  static constexpr int kBlockQ = 16 * kMTiles * kWarps;   // 128
  static constexpr int kBlockK = kBlockK_;                // divides kSplitKeyGranule
  static constexpr int kLd = kD + 8;                      // row pitch of every tile (elements)
  static constexpr bool kQInRegs = kD <= 64;               // at 128, O and S leave no room for Q
  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + kBlockQ * kLd * 2;    // 2 stages
  static constexpr int kOffV = kOffK + 2 * kBlockK * kLd * 2;  // 2 stages
  static constexpr int kSmemBytes = kOffV + 2 * kBlockK * kLd * 2;
  static_assert(kD % 16 == 0 && kBlockK % 16 == 0, "mma k-steps are 16 wide");
};

// grid (ceil(Lq / kBlockQ) * num_splits, Hq, B). Output rows are written only for i < Lq.
template <typename T, int kD, int kBlockK_, bool kCausal, bool kDecode>
__global__ void __launch_bounds__(FwdTraits<kD, kBlockK_>::kThreads)
    attention_fwd_kernel(const AttentionFwdParams p) {
  using Tr = FwdTraits<kD, kBlockK_>;
  constexpr int kBlockQ = Tr::kBlockQ, kBlockK = Tr::kBlockK, kThreads = Tr::kThreads;
  constexpr int kMT = Tr::kMTiles, kNT = kBlockK / 8, kDT = kD / 8, kLd = Tr::kLd;
  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem + Tr::kOffQ);  // [kBlockQ, kLd]; the output stage at the end
  T* sK = reinterpret_cast<T*>(smem + Tr::kOffK);  // [2][kBlockK, kLd]
  T* sV = reinterpret_cast<T*>(smem + Tr::kOffV);  // [2][kBlockK, kLd]

  const int group = p.Hq / p.Hkv;
  const int split = blockIdx.x % p.num_splits;
  const int i0 = (blockIdx.x / p.num_splits) * kBlockQ;
  const int b = blockIdx.z;
  const int head0 = kDecode ? blockIdx.y * group : blockIdx.y;  // the block's first query head
  const int hk = kDecode ? blockIdx.y : blockIdx.y / group;     // GQA: K/V read in place
  const int n_rows = kDecode ? group * p.Lq : p.Lq;             // rows of the head group
  const int offset = p.Lk - p.Lq;                               // bottom-right causal alignment
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + head0 * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  // This block's keys: its split's range, cut at the causal horizon of its last query (causal
  // block skipping: tiles wholly above the diagonal are never loaded).
  const int k_begin = split * p.keys_per_split;
  int k_end = min(p.Lk, k_begin + p.keys_per_split);
  const int last_query = kDecode ? p.Lq - 1 : min(i0 + kBlockQ, p.Lq) - 1;
  if (kCausal) k_end = min(k_end, last_query + 1 + offset);
  const int n_tiles = k_end > k_begin ? (k_end - k_begin + kBlockK - 1) / kBlockK : 0;
  // Decode: whether tile `it` has a key that is not removed (threads tid < kBlockK look at one
  // key each; the caller ORs over the block). Prefill: every tile < n_tiles counts as live.
  auto tile_is_live = [&](int it) {
    if constexpr (kDecode) {
      const int j = k_begin + it * kBlockK + int(threadIdx.x);
      return it < n_tiles && int(threadIdx.x) < kBlockK && j < k_end &&
             (!p.key_bias || ptx::ld_global(p.key_bias + b * p.bias_batch_stride + j) != kNegInf);
    } else {
      return it < n_tiles;
    }
  };

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;  // fragment row group and column pair
  const float scale_log2 = p.scale * kLog2e;
  const int wrow = warp * 16 * kMT;       // the warp's first row within the block
  const bool warp_has_rows = i0 + wrow < n_rows;
  // The causal horizon of this lane's row (mi, hf): it sees keys j <= horizon(mi, hf). Prefill:
  // an affine function of the row, computed where it is used (the tiles that cross the diagonal)
  // instead of held in registers; decode: row r's query is r % Lq, computed once (a division).
  int decode_horizon[kDecode ? kMT : 1][2];
  if constexpr (kDecode) {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        decode_horizon[mi][hf] = (i0 + wrow + mi * 16 + g + 8 * hf) % p.Lq + offset;
      }
  }
  auto horizon = [&](int mi, int hf) {
    if constexpr (kDecode) {
      return decode_horizon[mi][hf];
    } else {
      return ptx::opaque(i0 + wrow + g + offset) + mi * 16 + 8 * hf;  // (opaque: not held across the loop)
    }
  };

  {  // Q rows by cp.async, each row from its own (head, query); rows past the group zero-filled
    constexpr int kChunks = kD / 8;
    static_assert(kBlockQ * kChunks % kThreads == 0, "whole rounds of 16-byte copies");
#pragma unroll
    for (int it = 0; it < kBlockQ * kChunks / kThreads; ++it) {
      const int idx = it * kThreads + int(threadIdx.x), rr = idx / kChunks, c = idx % kChunks;
      const int r = i0 + rr;
      const bool valid = r < n_rows;
      const int hq = kDecode ? r / p.Lq : 0, i = kDecode ? r % p.Lq : r;
      const T* src = q + (valid ? hq * p.q_head_stride + int64_t(i) * p.q_row_stride : 0) + c * 8;
      ptx::cp_async_16(sQ + tile_offset<kD>(rr, c), src, valid);
    }
  }
  ptx::cp_async_commit();
  bool live = kDecode ? __syncthreads_or(tile_is_live(0)) : tile_is_live(0);
  if (live) {
    cp_async_tile<T, kBlockK, kD, kThreads>(sK, k, p.k_row_stride, k_begin, k_end);
    cp_async_tile<T, kBlockK, kD, kThreads>(sV, v, p.v_row_stride, k_begin, k_end);
  }
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();  // Q has landed (tile 0 may still be in flight)
  __syncthreads();          // ... for every thread's copies

  // A operand of Q row tile mi, k-step kk, read by ldmatrix.x4.
  auto load_q = [&](uint32_t (&a)[4], int mi, int kk) {
    load_a<kLd>(a, sQ, wrow + mi * 16, 16 * kk);
  };
  uint32_t qf[Tr::kQInRegs ? kMT : 1][Tr::kQInRegs ? kD / 16 : 1][4];
  if constexpr (Tr::kQInRegs) {
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk) load_q(qf[mi][kk], mi, kk);
  }

  float o[kMT][kDT][4];
  zero_fragments(o);
  // Running max and this lane's part of the running sum of rows g and g + 8 of each m tile (the
  // four lanes of a quad are summed once, at the end).
  float m[kMT][2], l[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) m[mi][0] = m[mi][1] = kNegInf, l[mi][0] = l[mi][1] = 0.f;

  for (int it = 0; it < n_tiles; ++it) {
    const int j0 = k_begin + it * kBlockK;
    const T* tK = sK + (it & 1) * kBlockK * kLd;
    const T* tV = sV + (it & 1) * kBlockK * kLd;
    ptx::cp_async_wait<0>();  // this thread's copies of tile it have landed
    // Everyone's have; every warp is done with tile it - 1; (decode) whether tile it + 1 is live.
    bool next_live;
    if constexpr (kDecode) {
      next_live = __syncthreads_or(tile_is_live(it + 1));
    } else {
      __syncthreads();
      next_live = tile_is_live(it + 1);
    }
    if (next_live) {  // tile it + 1 into the buffers tile it - 1 used
      // K and V of this (batch, KV head), rebuilt per tile from the parameters: registers are
      // what O needs at D = 128.
      const int bo = ptx::opaque(b), ho = ptx::opaque(hk);
      const T* kt = static_cast<const T*>(p.k) + bo * p.k_batch_stride + ho * p.k_head_stride;
      const T* vt = static_cast<const T*>(p.v) + bo * p.v_batch_stride + ho * p.v_head_stride;
      cp_async_tile<T, kBlockK, kD, kThreads>(sK + ((it + 1) & 1) * kBlockK * kLd, kt, p.k_row_stride,
                                              j0 + kBlockK, k_end);
      cp_async_tile<T, kBlockK, kD, kThreads>(sV + ((it + 1) & 1) * kBlockK * kLd, vt, p.v_row_stride,
                                              j0 + kBlockK, k_end);
    }
    ptx::cp_async_commit();
    const bool compute = live;  // a tile of removed keys changes nothing: skipping it is exact
    live = next_live;
    if (!compute || !warp_has_rows) continue;

    // S = Q K^T. ldmatrix.x4 of K gives the B operands of two key n-tiles.
    float s[kMT][kNT][4];
    zero_fragments(s);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      uint32_t a[kMT][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
        if constexpr (Tr::kQInRegs) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[mi][e] = qf[mi][kk][e];
        } else {
          load_q(a[mi], mi, kk);
        }
      }
#pragma unroll
      for (int np = 0; np < kNT / 2; ++np) {
        uint32_t kb[4];
        load_b<kLd>(kb, tK, 16 * np, 16 * kk);
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          ptx::mma_16816<T>(s[mi][2 * np], a[mi], kb[0], kb[1]);
          ptx::mma_16816<T>(s[mi][2 * np + 1], a[mi], kb[2], kb[3]);
        }
      }
    }

    // x = (scale * q.k + key_bias) log2(e), -inf past k_end and past each row's causal horizon:
    // the softmax runs in base 2 (one FFMA, one FADD and one ex2.approx per element; lse goes
    // back to base e at the end). The bias of this lane's 2 * kNT columns is read once per tile
    // and shared by its rows.
    const bool causal_tile = kCausal && j0 + kBlockK - 1 > (kDecode ? 0 : i0) + offset;
    // This sample's key_bias row, rebuilt per tile from the parameters (held across the loop it
    // is the 64-bit value ptxas spills at D = 128).
    const float* bias_row = p.key_bias ? p.key_bias + ptx::opaque(b) * p.bias_batch_stride : nullptr;
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int j = j0 + nt * 8 + 2 * t + e;
        const float bj = j < k_end ? (bias_row ? ptx::ld_global(bias_row + j) * kLog2e : 0.f) : kNegInf;
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            float x = fmaf(s[mi][nt][2 * hf + e], scale_log2, bj);
            if (causal_tile && j > horizon(mi, hf)) x = kNegInf;
            s[mi][nt][2 * hf + e] = x;
          }
        }
      }
    }

    // Online softmax, row by row: new max over the quad, rescale O and l, P = exp(x - max).
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = m[mi][hf];
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) mx = fmaxf(mx, fmaxf(s[mi][nt][2 * hf], s[mi][nt][2 * hf + 1]));
        mx = fmaxf(mx, ptx::shfl_xor(mx, 1));
        mx = fmaxf(mx, ptx::shfl_xor(mx, 2));
        // A row that has seen no finite logit yet has mx = -inf; shifting by 0 instead keeps
        // exp(-inf - -inf) = NaN out: its p stay 0 and l, O stay 0.
        const float m_use = mx == kNegInf ? 0.f : mx;
        const float alpha = ptx::exp2(m[mi][hf] - m_use);  // 0 when the old max is -inf
        m[mi][hf] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float pr = ptx::exp2(s[mi][nt][2 * hf + e] - m_use);
            s[mi][nt][2 * hf + e] = pr;
            sum += pr;
          }
        }
        l[mi][hf] = l[mi][hf] * alpha + sum;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) o[mi][dt][2 * hf] *= alpha, o[mi][dt][2 * hf + 1] *= alpha;
      }
    }

    // O += P V: accumulators of key n-tiles 2kk and 2kk + 1 are the A operand of k-step kk;
    // ldmatrix.x4.trans of V gives the B operands of two head-dim n-tiles.
#pragma unroll
    for (int kk = 0; kk < kBlockK / 16; ++kk) {
      uint32_t pa[kMT][4];
#pragma unroll
      for (int mi = 0; mi < kMT; ++mi) {
        pa[mi][0] = ptx::pack2<T>(s[mi][2 * kk][0], s[mi][2 * kk][1]);
        pa[mi][1] = ptx::pack2<T>(s[mi][2 * kk][2], s[mi][2 * kk][3]);
        pa[mi][2] = ptx::pack2<T>(s[mi][2 * kk + 1][0], s[mi][2 * kk + 1][1]);
        pa[mi][3] = ptx::pack2<T>(s[mi][2 * kk + 1][2], s[mi][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < kDT / 2; ++dp) {
        uint32_t vb[4];
        load_b_trans<kLd>(vb, tV, 16 * dp, 16 * kk);
#pragma unroll
        for (int mi = 0; mi < kMT; ++mi) {
          ptx::mma_16816<T>(o[mi][2 * dp], pa[mi], vb[0], vb[1]);
          ptx::mma_16816<T>(o[mi][2 * dp + 1], pa[mi], vb[2], vb[3]);
        }
      }
    }
  }
  ptx::cp_async_wait<0>();  // nothing may land in shared memory after this point

  // l = 0 exactly when the row saw no finite logit: out 0 and lse -inf, never NaN.
  // Row r of the head group is row row0 + r of lse ([B Hq Lq]) and of out ([B Hq Lq, D]).
  const int64_t row0 = (int64_t(b) * p.Hq + head0) * p.Lq;
  const int64_t split0 = int64_t(split) * p.B * p.Hq * p.Lq;  // this split's partial results
  float inv[kMT][2];
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi) {
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float sum = l[mi][hf];
      sum += ptx::shfl_xor(sum, 1);
      sum += ptx::shfl_xor(sum, 2);
      inv[mi][hf] = sum > 0.f ? 1.f / sum : 0.f;
      const int r = i0 + wrow + mi * 16 + g + 8 * hf;
      const float row_lse = sum > 0.f ? m[mi][hf] * kLn2 + logf(sum) : kNegInf;
      if (t == 0 && r < n_rows) {
        ptx::st_global(p.num_splits > 1 ? p.lse_accum + split0 + row0 + r : p.lse + row0 + r, row_lse);
      }
    }
  }

  if (p.num_splits > 1) {
    // Partial result of this key range, normalised by its own l; the combine kernel reweights.
#pragma unroll
    for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int r = i0 + wrow + mi * 16 + g + 8 * hf;
        if (r >= n_rows) continue;
        float* dst = p.out_accum + (split0 + row0 + r) * kD + 2 * t;
#pragma unroll
        for (int dt = 0; dt < kDT; ++dt) {
          ptx::st_global_2(dst + dt * 8, o[mi][dt][2 * hf] * inv[mi][hf],
                           o[mi][dt][2 * hf + 1] * inv[mi][hf]);
        }
      }
    return;
  }

  // The warp's own Q rows become its output stage: fragments in, 16-byte rows out.
  __syncwarp();  // every lane's last ldmatrix of these rows is done
#pragma unroll
  for (int mi = 0; mi < kMT; ++mi)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int dt = 0; dt < kDT; ++dt) {
        ptx::st_shared_4(sQ + tile_offset<kD>(wrow + mi * 16 + g + 8 * hf, dt) + 2 * t,
                         ptx::pack2<T>(o[mi][dt][2 * hf] * inv[mi][hf], o[mi][dt][2 * hf + 1] * inv[mi][hf]));
      }
  __syncwarp();  // the stage is complete before any lane reads another lane's part
  T* out = static_cast<T*>(p.out) + row0 * kD;
#pragma unroll
  for (int it = 0; it < 16 * kMT * kDT / 32; ++it) {
    const int idx = it * 32 + lane;
    const int r = idx / kDT, c = idx % kDT;
    if (i0 + wrow + r < n_rows) {
      ptx::st_global_16(out + int64_t(i0 + wrow + r) * kD + c * 8,
                        ptx::ld_shared_16(sQ + tile_offset<kD>(wrow + r, c)));
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

// The key tile at head dim kD, in decode or prefill, on a device with `smem_per_sm` bytes of
// shared memory per SM: 64 where two blocks of that size fit in an SM, else 32; decode at
// D = 128 always takes 32 (it is bound by reading K/V, and the 64-key tile spills there).
// bench/kernel_profile.py asks it too.
template <int kD>
constexpr int fwd_block_k_for(bool decode, int smem_per_sm) {
  constexpr int kReservedPerBlock = 1024;  // the driver's per-block reservation (sm_80+)
  if (kD <= 64) return 64;
  return !(decode && kD == 128) && 2 * (FwdTraits<kD, 64>::kSmemBytes + kReservedPerBlock) <= smem_per_sm ? 64 : 32;
}

template <typename T, int kD, int kBlockK, bool kDecode>
void run_attention_fwd_tiles(const AttentionFwdParams& p, cudaStream_t stream) {
  using Tr = FwdTraits<kD, kBlockK>;
  static_assert(Tr::kBlockQ == kFwdBlockQ && kSplitKeyGranule % Tr::kBlockK == 0, "launch.h's constants");
  const int n_qblocks = int(fwd_row_blocks(p.Lq, p.Hq, p.Hkv));
  BOOL_SWITCH(p.causal, kCausal, [&] {
    auto kernel = &attention_fwd_kernel<T, kD, kBlockK, kCausal, kDecode>;
    // Above 48 KB a block's dynamic shared memory must be opted into per kernel.
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    const dim3 grid(n_qblocks * p.num_splits, kDecode ? p.Hkv : p.Hq, p.B);
    kernel<<<grid, Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  });
  if (p.num_splits > 1) {
    const int64_t rows = int64_t(p.B) * p.Hq * p.Lq;
    attention_fwd_combine_kernel<T, kD><<<unsigned((rows + 3) / 4), 128, 0, stream>>>(p);
  }
}

template <typename T, int kD>
void run_attention_fwd(const AttentionFwdParams& p, cudaStream_t stream) {
  int dev = 0, smem_per_sm = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev);
  const bool decode = fwd_decodes(p.Lq);
  const int block_k = fwd_block_k_for<kD>(decode, smem_per_sm);
  BOOL_SWITCH(decode, kDecode, [&] {
    if constexpr (kD <= 64) {
      run_attention_fwd_tiles<T, kD, 64, kDecode>(p, stream);
    } else if constexpr (kDecode && kD == 128) {
      run_attention_fwd_tiles<T, kD, 32, kDecode>(p, stream);
    } else if (block_k == 64) {
      run_attention_fwd_tiles<T, kD, 64, kDecode>(p, stream);
    } else {
      run_attention_fwd_tiles<T, kD, 32, kDecode>(p, stream);
    }
  });
}

}  // namespace atp::cuda
