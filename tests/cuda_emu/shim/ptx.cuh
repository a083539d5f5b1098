// Host replacement of csrc/cuda/ptx.cuh for the emulator: the same functions, with the PTX ISA's
// per-lane semantics. Every lane holds only its own fragment registers; mma.sync and ldmatrix
// exchange them across the warp exactly as the layouts in csrc/cuda/ptx.cuh's header say, so a
// wrong lane mapping in a kernel gives wrong numbers here as on the GPU. cp.async copies land only
// at the cp.async.wait_group that covers their group. Shared and global accesses are checked as
// emu_runtime.h describes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "emu_runtime.h"

namespace atp::cuda::ptx {

namespace detail {
inline float to_f(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  __half h;
  std::memcpy(&h, &bits, 2);
  return __half2float(h);
}
inline uint16_t half_of(uint32_t reg, int which) { return uint16_t(which ? reg >> 16 : reg & 0xFFFFu); }
inline void check_align(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu::fail(what);
}
}  // namespace detail

// ---- cp.async ----------------------------------------------------------------------------------
inline void cp_async_16(void* dst, const void* src, bool valid) {
  detail::check_align(dst, "cp.async: shared destination not 16-byte aligned");
  emu::Copy c{static_cast<unsigned char*>(dst), {}, -1};
  if (valid) {
    detail::check_align(src, "cp.async: global source not 16-byte aligned");
    emu::check_global(src, 16, "cp.async");
    std::memcpy(c.data, src, 16);
  } else {
    std::memset(c.data, 0, 16);  // src-size 0: zero fill
  }
  emu::Shadow* s = emu::shadow_of(dst, 16, "cp.async");
  for (int i = 0; i < 16; ++i) ++s[i].in_flight;
  emu::cur->copies.push_back(c);
}
inline void cp_async_commit() {
  emu::Ctx& t = *emu::cur;
  for (auto& c : t.copies)
    if (c.group < 0) c.group = t.next_group;
  ++t.next_group;
}
// Lands every committed copy except those of the newest kPending groups.
template <int kPending>
inline void cp_async_wait() {
  emu::Ctx& t = *emu::cur;
  const int limit = t.next_group - kPending;  // groups < limit must be complete
  std::vector<emu::Copy> still;
  for (auto& c : t.copies) {
    if (c.group >= 0 && c.group < limit) {
      emu::Shadow* s = emu::shadow_of(c.dst, 16, "cp.async landing");
      for (int i = 0; i < 16; ++i) --s[i].in_flight;
      emu::on_write(c.dst, 16, "cp.async landing", true);
      std::memcpy(c.dst, c.data, 16);
    } else {
      still.push_back(c);
    }
  }
  t.copies.swap(still);
}

// ---- ldmatrix ----------------------------------------------------------------------------------
namespace detail {
// Register i of lane l comes from the row addresses of lanes 8i..8i+7 (x1: i = 0 only, ...); each
// read is checked as a read by lane l.
template <int kN>
inline void ldmatrix(uint32_t* r, const void* row, bool trans) {
  const unsigned char* mine = static_cast<const unsigned char*>(row);
  const int warp0 = int(emu::cur->tid.x) & ~31;
  emu::collective(&mine, sizeof(mine), r, 4 * kN, false, [&](unsigned char (*in)[64], unsigned char (*out)[64]) {
    const unsigned char* addr[32];
    for (int l = 0; l < 8 * kN; ++l) {
      std::memcpy(&addr[l], in[l], sizeof(addr[l]));
      check_align(addr[l], "ldmatrix: row address not 16-byte aligned");
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, t = l % 4;
      uint32_t regs[4];
      for (int i = 0; i < kN; ++i) {
        if (!trans) {  // row g, columns 2t, 2t + 1
          const unsigned char* a = addr[8 * i + g] + 4 * t;
          emu::on_read(a, 4, "ldmatrix", warp0 + l);
          std::memcpy(&regs[i], a, 4);
        } else {  // column g of rows 2t and 2t + 1
          const unsigned char* lo = addr[8 * i + 2 * t] + 2 * g;
          const unsigned char* hi = addr[8 * i + 2 * t + 1] + 2 * g;
          emu::on_read(lo, 2, "ldmatrix.trans", warp0 + l);
          emu::on_read(hi, 2, "ldmatrix.trans", warp0 + l);
          uint16_t a, b;
          std::memcpy(&a, lo, 2);
          std::memcpy(&b, hi, 2);
          regs[i] = uint32_t(a) | (uint32_t(b) << 16);
        }
      }
      std::memcpy(out[l], regs, 4 * kN);
    }
  });
}
}  // namespace detail
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { detail::ldmatrix<4>(r, row, false); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) { detail::ldmatrix<4>(r, row, true); }
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { detail::ldmatrix<2>(r, row, false); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) { detail::ldmatrix<2>(r, row, true); }
inline void ldmatrix_x1(uint32_t& r, const void* row) { detail::ldmatrix<1>(&r, row, false); }

// ---- stmatrix ------------------------------------------------------------------------------------
// The device code's choice follows the emulated architecture (emu_set_arch), so sm_90 runs the
// stmatrix path and sm_80 / sm_86 the st.shared one.
inline bool has_stmatrix() { return emu::g_arch >= 90; }
// Register i of lane l goes to row l / 4, columns 2 (l % 4)..+1 of matrix i, whose row addresses
// lanes 8i..8i+7 give; each write is checked as a write by lane l.
inline void stmatrix_x4(void* row, const uint32_t (&r)[4]) {
  if (!has_stmatrix()) emu::fail("stmatrix on an architecture without it (sm_90 and later only)");
  struct Regs { unsigned char* addr; uint32_t r[4]; } mine{static_cast<unsigned char*>(row), {r[0], r[1], r[2], r[3]}};
  const int warp0 = int(emu::cur->tid.x) & ~31;
  emu::collective(&mine, sizeof(mine), nullptr, 0, false, [&](unsigned char (*in)[64], unsigned char (*)[64]) {
    Regs regs[32];
    for (int l = 0; l < 32; ++l) {
      std::memcpy(&regs[l], in[l], sizeof(Regs));
      detail::check_align(regs[l].addr, "stmatrix: row address not 16-byte aligned");
    }
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 4; ++i) {
        unsigned char* a = regs[8 * i + l / 4].addr + 4 * (l % 4);
        emu::on_write(a, 4, "stmatrix", false, warp0 + l);
        std::memcpy(a, &regs[l].r[i], 4);
      }
  });
}

// ---- mma.sync.m16n8k16 -------------------------------------------------------------------------
template <typename T>
inline void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  static_assert(std::is_same_v<T, __half> || std::is_same_v<T, __nv_bfloat16>, "fp16 / bf16 only");
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  struct Regs { uint32_t a[4], b[2]; float c[4]; } mine{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  emu::collective(&mine, sizeof(mine), d, sizeof(d), false, [](unsigned char (*in)[64], unsigned char (*out)[64]) {
    Regs regs[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&regs[l], in[l], sizeof(Regs));
    float A[16][16], B[16][8];
    for (int r = 0; r < 16; ++r)  // A(r, k): lane 4 (r % 8) + (k % 8) / 2, register r / 8 + 2 (k / 8), half k % 2
      for (int k = 0; k < 16; ++k)
        A[r][k] = detail::to_f(detail::half_of(regs[4 * (r % 8) + (k % 8) / 2].a[r / 8 + 2 * (k / 8)], k % 2), kBf16);
    for (int k = 0; k < 16; ++k)  // B(k, n): lane 4 n + (k % 8) / 2, register k / 8, half k % 2
      for (int n = 0; n < 8; ++n) B[k][n] = detail::to_f(detail::half_of(regs[4 * n + (k % 8) / 2].b[k / 8], k % 2), kBf16);
    for (int l = 0; l < 32; ++l) {  // D(r, n) of lane l: r = l / 4 + 8 (i / 2), n = 2 (l % 4) + i % 2
      float res[4];
      for (int i = 0; i < 4; ++i) {
        const int r = l / 4 + 8 * (i / 2), n = 2 * (l % 4) + i % 2;
        float acc = regs[l].c[i];
        for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][n];  // products exact, fp32 sums
        res[i] = acc;
      }
      std::memcpy(out[l], res, sizeof(res));
    }
  });
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  T a, b;
  if constexpr (std::is_same_v<T, __half>) {
    a = __float2half_rn(lo), b = __float2half_rn(hi);
  } else {
    a = __float2bfloat16_rn(lo), b = __float2bfloat16_rn(hi);
  }
  uint16_t x, y;
  std::memcpy(&x, &a, 2);
  std::memcpy(&y, &b, 2);
  return uint32_t(x) | (uint32_t(y) << 16);
}

inline float shfl_xor(float v, int lane_mask) { return emu::shfl_xor(v, lane_mask); }

inline int opaque(int x) { return x; }

// ex2.approx.ftz.f32: results below the smallest normal flush to +0.
inline float exp2(float x) {
  const float y = exp2f(x);
  return y < 1.17549435e-38f ? 0.f : y;
}

// ---- plain accesses ----------------------------------------------------------------------------
inline float ld_global(const float* p) {
  emu::check_global(p, 4, "ld_global");
  emu::global_loaded(p, 4, "ld_global", false);
  return *p;
}
inline int ld_global(const int* p) {
  emu::check_global(p, 4, "ld_global");
  emu::global_loaded(p, 4, "ld_global", false);
  return *p;
}
inline float2 ld_global_2(const float* p) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) emu::fail("ld_global_2: not 8-byte aligned");
  emu::check_global(p, 8, "ld_global_2");
  emu::global_loaded(p, 8, "ld_global_2", true);
  return make_float2(p[0], p[1]);
}
inline void st_global(float* p, float v) {
  emu::check_global(p, 4, "st_global");
  emu::global_stored(p, 4, "st_global");
  *p = v;
}
inline void st_global_2(float* p, float x, float y) {
  if (reinterpret_cast<uintptr_t>(p) % 8 != 0) emu::fail("st_global_2: not 8-byte aligned");
  emu::check_global(p, 8, "st_global_2");
  emu::global_stored(p, 8, "st_global_2");
  p[0] = x, p[1] = y;
}
inline void st_global_16(void* p, uint4 v) {
  detail::check_align(p, "st_global_16: not 16-byte aligned");
  emu::check_global(p, 16, "st_global_16");
  emu::global_stored(p, 16, "st_global_16");
  std::memcpy(p, &v, 16);
}
inline void st_shared_4(void* p, uint32_t v) {
  if (reinterpret_cast<uintptr_t>(p) % 4 != 0) emu::fail("st_shared_4: not 4-byte aligned");
  emu::on_write(p, 4, "st_shared_4");
  std::memcpy(p, &v, 4);
}
inline void st_shared_f(float* p, float v) {
  emu::on_write(p, 4, "st_shared_f");
  *p = v;
}
inline float ld_shared_f(const float* p) {
  emu::on_read(p, 4, "ld_shared_f");
  return *p;
}
inline uint4 ld_shared_16(const void* p) {
  detail::check_align(p, "ld_shared_16: not 16-byte aligned");
  emu::on_read(p, 16, "ld_shared_16");
  uint4 v;
  std::memcpy(&v, p, 16);
  return v;
}

}  // namespace atp::cuda::ptx
