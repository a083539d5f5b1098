// Host emulation of nvcuda::wmma for checking kernel code on a CPU. Fragments hold the whole
// 16x16 matrix; only lane 0 of a warp does the work (loads, mma, stores), so a missing
// __syncwarp between lanes' shared-memory writes and a fragment load/store can show up.
#pragma once
#include <cassert>
#include <cstdint>
#include <type_traits>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include "emu_runtime.h"

namespace nvcuda { namespace wmma {
struct matrix_a {}; struct matrix_b {}; struct accumulator {};
struct row_major {}; struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <class Use, int M, int N, int K, class T, class Layout = void>
struct fragment { float v[16][16]; };

inline float emu_f(float x) { return x; }
inline float emu_f(__half x) { return __half2float(x); }
inline float emu_f(__nv_bfloat16 x) { return __bfloat162float(x); }

inline void check_ptr(const void* p, unsigned ldm, size_t elt) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu::fail("wmma pointer not 32-byte aligned");
  if ((ldm * elt) % 16 != 0) emu::fail("wmma ldm not a multiple of 16 bytes");
}

template <class Use, class T, class L>
void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  check_ptr(p, ldm, sizeof(T));
  if (emu::lane() != 0) return;
  emu::check_smem(p, sizeof(T) * (15 * ldm + 16));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c)
      f.v[r][c] = std::is_same<L, row_major>::value ? emu_f(p[r * ldm + c]) : emu_f(p[c * ldm + r]);
}
template <class T>
void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const float* p, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, 4);
  if (emu::lane() != 0) return;
  emu::check_smem(p, 4 * (15 * ldm + 16));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r];
}
template <class T>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t l) {
  check_ptr(p, ldm, 4);
  if (emu::lane() != 0) return;
  emu::check_smem(p, 4 * (15 * ldm + 16));
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) (l == mem_row_major ? p[r * ldm + c] : p[c * ldm + r]) = f.v[r][c];
}
template <class Use, class T, class L>
void fill_fragment(fragment<Use, 16, 16, 16, T, L>& f, float x) {
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = x;
}
template <class T, class LA, class LB, class TC>
void mma_sync(fragment<accumulator, 16, 16, 16, TC, void>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
              const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, TC, void>& c) {
  if (emu::lane() != 0) return;
  float out[16][16];
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) {
      float s = c.v[r][n];
      for (int k = 0; k < 16; ++k) s += a.v[r][k] * b.v[k][n];
      out[r][n] = s;
    }
  for (int r = 0; r < 16; ++r)
    for (int n = 0; n < 16; ++n) d.v[r][n] = out[r][n];
}
}}  // namespace nvcuda::wmma
