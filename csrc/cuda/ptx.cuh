// Every inline-PTX line of the CUDA kernels, and the memory accesses of the register-resident
// kernels that the CPU emulator must see. tests/cuda_emu/shim/ptx.cuh replaces this one file with
// host versions of the same functions that follow the PTX ISA's per-lane semantics (fragment
// layouts, cp.async groups) and check every shared and global access; nothing else in csrc/cuda
// changes for the emulator.
//
// Fragment layouts (PTX ISA, "Matrix fragments for mma.m16n8k16"), lane = 4 * g + t:
//   A (16 x 16, row-major), 4 registers of 2 elements: a0 = (g, 2t..2t+1), a1 = (g + 8, 2t..),
//     a2 = (g, 2t + 8..), a3 = (g + 8, 2t + 8..)
//   B (16 x 8, "col"), 2 registers: b0 = (k 2t..2t+1, n g), b1 = (k 2t + 8.., n g)
//   C/D (16 x 8, fp32), 4 floats: (g, 2t), (g, 2t + 1), (g + 8, 2t), (g + 8, 2t + 1)
// ldmatrix.m8n8.x{1,2,4}: lanes 8i..8i+7 give the row addresses of matrix i; register i of lane l
// holds row l / 4, columns 2 (l % 4)..+1 of matrix i (with .trans: column l / 4, rows 2 (l % 4)..+1).
// stmatrix.m8n8.x4 (sm_90 and later) is its inverse: the same addresses, the same registers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace atp::cuda::ptx {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// ---- cp.async: 16-byte global -> shared copies, completed in commit groups -------------------
// valid = false copies nothing and zero-fills the 16 destination bytes (out-of-range rows).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// ---- ldmatrix ----------------------------------------------------------------------------------
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}
__device__ __forceinline__ void ldmatrix_x1(uint32_t& r, const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n"
               : "=r"(r)
               : "r"(smem_addr(row)));
}

// ---- stmatrix (sm_90 and later) ------------------------------------------------------------------
// Whether the architecture being compiled has stmatrix; without it a kernel stores the same
// registers with one st.shared.b32 each (tiles.cuh's store_c_pair).
__device__ __forceinline__ constexpr bool has_stmatrix() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return true;
#else
  return false;
#endif
}
// Called only where has_stmatrix(); compiles to nothing elsewhere.
__device__ __forceinline__ void stmatrix_x4(void* row, const uint32_t (&r)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("stmatrix.sync.aligned.m8n8.x4.shared.b16 [%0], {%1, %2, %3, %4};\n"
               ::"r"(smem_addr(row)), "r"(r[0]), "r"(r[1]), "r"(r[2]), "r"(r[3])
               : "memory");
#endif
}

// ---- mma.sync.m16n8k16, fp32 accumulate: d += a b ----------------------------------------------
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                  uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to T and packed into one register, `lo` in the low half (fragment order).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&h);
}

// ---- special functions -----------------------------------------------------------------------
// 2^x by the SFU (ex2.approx.ftz: ~2 ulp; results below 2^-126 flush to 0, exp2(-inf) = 0).
__device__ __forceinline__ float exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// ---- warp shuffles -----------------------------------------------------------------------------
__device__ __forceinline__ float shfl_xor(float v, int lane_mask) {
  return __shfl_xor_sync(0xffffffffu, v, lane_mask);
}

// ---- register pressure ---------------------------------------------------------------------------
// x, but opaque to the optimiser: a value derived from it inside a loop is recomputed there (an
// integer op or two) instead of being hoisted out and held in registers across the loop.
__device__ __forceinline__ int opaque(int x) {
  asm volatile("" : "+r"(x));
  return x;
}

// ---- plain accesses, here so that the emulator checks them ------------------------------------
__device__ __forceinline__ float ld_global(const float* p) { return __ldg(p); }
__device__ __forceinline__ int ld_global(const int* p) { return __ldg(p); }
// A coherent load (not through the read-only path): sees this thread's own earlier stores.
__device__ __forceinline__ float2 ld_global_2(const float* p) { return *reinterpret_cast<const float2*>(p); }
__device__ __forceinline__ void st_global(float* p, float v) { *p = v; }
__device__ __forceinline__ void st_global_2(float* p, float x, float y) {
  *reinterpret_cast<float2*>(p) = make_float2(x, y);
}
__device__ __forceinline__ void st_global_16(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }
__device__ __forceinline__ void st_shared_4(void* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }
__device__ __forceinline__ void st_shared_f(float* p, float v) { *p = v; }
__device__ __forceinline__ float ld_shared_f(const float* p) { return *p; }
__device__ __forceinline__ uint4 ld_shared_16(const void* p) { return *reinterpret_cast<const uint4*>(p); }

}  // namespace atp::cuda::ptx
