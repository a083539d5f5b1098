// Shared-memory tiles and mma.sync operand fragments, shared by the attention forward and
// backward: cp.async tile copies, the four ways a kernel reads an m16n8k16 operand out of a
// row-major tile with ldmatrix, and accumulators stored back as a tile (cuda/ptx.cuh's header
// gives the fragment layouts).
//
// Every tile is row-major with a pitch of (columns + 8) elements: the 8 rows one ldmatrix phase
// reads start 16 bytes apart modulo 128, so they hit 32 distinct banks.
#pragma once
#include <cstdint>

#include "cuda/ptx.cuh"

namespace atp::cuda {

// Element offset of 16-byte chunk `chunk` of row `row` in a tile of kD columns (pitch kD + 8).
template <int kD>
__device__ __forceinline__ int tile_offset(int row, int chunk) {
  return row * (kD + 8) + chunk * 8;
}

// Sets every accumulator of a [m tiles][n tiles] array of mma C fragments to 0.
template <int kM, int kN>
__device__ __forceinline__ void zero_fragments(float (&c)[kM][kN][4]) {
#pragma unroll
  for (int mi = 0; mi < kM; ++mi)
#pragma unroll
    for (int ni = 0; ni < kN; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) c[mi][ni][e] = 0.f;
}

// Issues the cp.async copies of rows [row0, row0 + kRows) of a (n_rows x kD) matrix (row stride
// `row_stride` elements) into a tile of pitch kD + 8; rows >= n_rows are zero-filled, so they add
// exactly 0 to every product. All kThreads threads call it; the caller commits and waits.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void cp_async_tile(T* tile, const T* src, int64_t row_stride, int row0,
                                              int n_rows) {
  // Thread i copies chunk i % kChunks of rows i / kChunks + kRowStep r, round r. Where kChunks
  // does not divide kThreads (D = 96: 12 chunks a row), the last kThreads % kChunks threads idle
  // and the rows run out within a round.
  constexpr int kChunks = kD / 8;
  constexpr int kRowStep = kThreads / kChunks;  // rows per round
  constexpr int kRounds = (kRows + kRowStep - 1) / kRowStep;
  constexpr bool kWhole = kThreads % kChunks == 0 && kRows % kRowStep == 0;
  const int r0 = threadIdx.x / kChunks, c = threadIdx.x % kChunks;
  T* dst = tile + tile_offset<kD>(r0, c);
  const T* from = src + int64_t(row0 + r0) * row_stride + c * 8;
  const int64_t step = kRowStep * row_stride;  // one pointer bump per round: no hoisted offsets
  const int left = n_rows - row0 - r0;         // rows of this thread's phase still in range
#pragma unroll
  for (int it = 0; it < kRounds; ++it, from += step) {
    if (!kWhole && (r0 >= kRowStep || r0 + it * kRowStep >= kRows)) continue;
    const bool valid = it * kRowStep < left;
    ptx::cp_async_16(dst + it * kRowStep * (kD + 8), valid ? from : src, valid);
  }
}

// ---- operand fragments (tiles of pitch kLd elements) -------------------------------------------
// The A operand (16 x 16) at rows m0.., columns k0.. of a tile stored as A itself, [M][K].
template <int kLd, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  ptx::ldmatrix_x4(a, tile + (m0 + (lane & 15)) * kLd + k0 + ((lane >> 4) << 3));
}

// The A operand at rows m0.., columns k0.. of A = X^T, X stored [K][M] (the backward's P^T, dS^T).
template <int kLd, typename T>
__device__ __forceinline__ void load_a_trans(uint32_t (&a)[4], const T* tile, int m0, int k0) {
  const int lane = threadIdx.x % 32;
  ptx::ldmatrix_x4_trans(a, tile + (k0 + (lane & 7) + ((lane >> 4) << 3)) * kLd + m0 + (((lane >> 3) & 1) << 3));
}

// The B operands (16 x 8) of n-tiles n0 and n0 + 8 at k-step k0 (b[0], b[1] and b[2], b[3]) of
// B = X^T, X stored [N][K]: the keys of Q K^T, the values of dO V^T.
template <int kLd, typename T>
__device__ __forceinline__ void load_b(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ptx::ldmatrix_x4(b, tile + (n0 + (lane & 7) + ((lane >> 4) << 3)) * kLd + k0 + (((lane >> 3) & 1) << 3));
}

// The same two n-tiles of B stored as itself, [K][N]: V in P V; dO, Q and K in the backward.
template <int kLd, typename T>
__device__ __forceinline__ void load_b_trans(uint32_t (&b)[4], const T* tile, int n0, int k0) {
  const int lane = threadIdx.x % 32;
  ptx::ldmatrix_x4_trans(b, tile + (k0 + (lane & 7) + (((lane >> 3) & 1) << 3)) * kLd + n0 + ((lane >> 4) << 3));
}

// ---- accumulators to a tile ----------------------------------------------------------------------
// The C fragments c0, c1 of n-tiles n0 and n0 + 8 (rows m0..m0 + 15), rounded to T, into a
// row-major tile of pitch kLd: one stmatrix.x4 on sm_90 (matrix i = n-tile i / 2, rows
// 8 (i % 2)..), four st.shared.b32 elsewhere. The same bytes either way.
template <int kLd, typename T>
__device__ __forceinline__ void store_c_pair(T* tile, int m0, int n0, const float (&c0)[4], const float (&c1)[4]) {
  const uint32_t r[4] = {ptx::pack2<T>(c0[0], c0[1]), ptx::pack2<T>(c0[2], c0[3]), ptx::pack2<T>(c1[0], c1[1]),
                         ptx::pack2<T>(c1[2], c1[3])};
  const int lane = threadIdx.x % 32;
  if (ptx::has_stmatrix()) {
    // Lane l addresses row l % 16, columns 8 (l / 16).. (load_a's addresses); written as the
    // (m0, n0) corner plus the lane's offset, which ptxas allocates without spilling at D = 128.
    ptx::stmatrix_x4(tile + m0 * kLd + n0 + ((lane & 15) * kLd + ((lane >> 4) << 3)), r);
  } else {
    const int g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < 4; ++i) ptx::st_shared_4(tile + (m0 + g + 8 * (i & 1)) * kLd + n0 + 8 * (i >> 1) + 2 * t, r[i]);
  }
}

}  // namespace atp::cuda
