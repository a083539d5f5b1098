// Device helpers shared by the attention forward, backward and score kernels: element
// conversions and -inf; and, for the backward (the one kernel pair not yet on cuda/ptx.cuh's
// mma.sync fragments), bounded 16-byte tile loads and the WMMA fragment types (16x16x16,
// fp16/bf16 in, fp32 accumulate), whose opaque layouts make every matrix go through shared memory.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

#include "cuda/attention_params.h"

namespace atp::cuda {

namespace wmma = nvcuda::wmma;

constexpr float kNegInf = -__builtin_huge_valf();
constexpr float kPosInf = __builtin_huge_valf();

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Fragments of one 16x16x16 tensor-core step.
template <typename T>
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBRow = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major>;
template <typename T>
using FragBCol = wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

// Two products of one warp's 16 rows against kN rows of shared tiles, both "A times B
// transposed": out1 = A1 B1^T and out2 = A2 B2^T, A row-major [16, kD] and B row-major [kN, kD]
// (read as column-major fragments, i.e. transposed), outputs float row-major [16, kN], leading
// dims kLdT (inputs) and kLdOut (outputs). The backward's S/dP and S^T/dP^T are both this.
template <typename T, int kN, int kD, int kLdT, int kLdOut>
__device__ __forceinline__ void warp_gemm_nt_pair(const T* a1, const T* b1, const T* a2, const T* b2,
                                                  float* out1, float* out2) {
#pragma unroll
  for (int n = 0; n < kN / 16; ++n) {
    FragC c1, c2;
    wmma::fill_fragment(c1, 0.f);
    wmma::fill_fragment(c2, 0.f);
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk) {
      FragA<T> a;
      FragBCol<T> b;
      wmma::load_matrix_sync(a, a1 + kk * 16, kLdT);
      wmma::load_matrix_sync(b, b1 + n * 16 * kLdT + kk * 16, kLdT);
      wmma::mma_sync(c1, a, b, c1);
      wmma::load_matrix_sync(a, a2 + kk * 16, kLdT);
      wmma::load_matrix_sync(b, b2 + n * 16 * kLdT + kk * 16, kLdT);
      wmma::mma_sync(c2, a, b, c2);
    }
    wmma::store_matrix_sync(out1 + n * 16, c1, kLdOut, wmma::mem_row_major);
    wmma::store_matrix_sync(out2 + n * 16, c2, kLdOut, wmma::mem_row_major);
  }
}

// Copies rows [row0, row0 + kRows) of a (n_rows x kD) matrix (row stride `row_stride` elements,
// last dim contiguous) into shared memory with leading dimension kLd. Rows >= n_rows are
// zero-filled, so padded rows contribute exactly 0 to every product. All kThreads threads of
// the block call this; the caller puts the barrier after it.
// Requires: src 16-byte aligned, row_stride % 8 == 0, kD % 8 == 0, kLd % 8 == 0.
template <typename T, int kRows, int kD, int kLd, int kThreads>
__device__ __forceinline__ void load_tile(T* smem, const T* src, int64_t row_stride, int row0,
                                          int n_rows) {
  static_assert(sizeof(T) == 2, "16-bit element types only");
  constexpr int kVecPerRow = kD / 8;  // 8 elements per 16-byte vector
  for (int idx = threadIdx.x; idx < kRows * kVecPerRow; idx += kThreads) {
    const int r = idx / kVecPerRow, c = (idx % kVecPerRow) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (row0 + r < n_rows) {
      val = *reinterpret_cast<const uint4*>(src + (row0 + r) * row_stride + c);
    }
    *reinterpret_cast<uint4*>(smem + r * kLd + c) = val;
  }
}

// Rounds a byte offset up to 128 so every shared-memory buffer meets WMMA's 32-byte alignment.
__host__ __device__ constexpr int align128(int bytes) { return (bytes + 127) / 128 * 128; }

}  // namespace atp::cuda
