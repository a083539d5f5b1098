// Host emulation of the CUDA execution model used by the atp kernels: one std::thread per CUDA
// thread, blocks run one after another, __syncthreads / __syncwarp as std::barrier, shuffles
// through a per-warp exchange buffer. Dynamic shared memory is filled with NaN bytes before each
// block.
#pragma once
#include <barrier>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <climits>
#include <algorithm>
#include <memory>
#include <thread>
#include <vector>
#include <cuda_runtime.h>

namespace emu {
inline void fail(const char* msg) { std::fprintf(stderr, "EMU FAILURE: %s\n", msg); std::abort(); }
struct Warp { std::barrier<> bar{32}; double xchg[32]; };
struct Block {
  std::barrier<> bar;
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem; size_t smem_bytes;
  explicit Block(int n) : bar(n) { for (int w = 0; w < n / 32; ++w) warps.emplace_back(new Warp); }
};
struct Ctx { uint3 tid, bid; dim3 bdim, gdim; Block* block; };
inline thread_local Ctx ctx;
inline int lane() { return ctx.tid.x % 32; }
inline unsigned char* smem() { return ctx.block->smem; }
inline void check_smem(const void* p, size_t bytes) {
  auto* c = static_cast<const unsigned char*>(p);
  auto* s = ctx.block->smem;
  if (c >= s && c < s + ctx.block->smem_bytes + 4096 && c + bytes > s + ctx.block->smem_bytes) fail("shared memory overrun");
}
inline void syncthreads() { ctx.block->bar.arrive_and_wait(); }
inline void syncwarp() { ctx.block->warps[ctx.tid.x / 32]->bar.arrive_and_wait(); }
template <class T> T shfl_xor(T v, int m) {
  Warp& w = *ctx.block->warps[ctx.tid.x / 32];
  w.xchg[lane()] = double(v);
  w.bar.arrive_and_wait();
  T r = T(w.xchg[lane() ^ m]);
  w.bar.arrive_and_wait();
  return r;
}
template <class T> T shfl_down(T v, int off) {
  Warp& w = *ctx.block->warps[ctx.tid.x / 32];
  w.xchg[lane()] = double(v);
  w.bar.arrive_and_wait();
  T r = lane() + off < 32 ? T(w.xchg[lane() + off]) : v;
  w.bar.arrive_and_wait();
  return r;
}
template <class K> void func_set_attribute(K, cudaFuncAttribute, int) {}
template <class Kernel, class P>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, const P& p) {
  const int n = block.x * block.y * block.z;
  if (n % 32 != 0) fail("block size not a multiple of 32");
  std::vector<unsigned char> smem_buf(smem_bytes + 4096 + 128);
  unsigned char* base = smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(smem_buf.data()) % 128);
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(base, 0xFF, smem_bytes + 4096);  // NaN everywhere: uninitialised reads show
        Block blk(n);
        blk.smem = base; blk.smem_bytes = smem_bytes;
        std::vector<std::thread> ts;
        for (int t = 0; t < n; ++t)
          ts.emplace_back([&, t] {
            ctx.tid = make_uint3(t, 0, 0); ctx.bid = make_uint3(bx, by, bz);
            ctx.bdim = block; ctx.gdim = grid; ctx.block = &blk;
            kernel(p);
          });
        for (auto& th : ts) th.join();
      }
}
}  // namespace emu

#undef __global__
#undef __device__
#undef __host__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define threadIdx (emu::ctx.tid)
#define blockIdx (emu::ctx.bid)
#define blockDim (emu::ctx.bdim)
#define gridDim (emu::ctx.gdim)
#define __syncthreads() emu::syncthreads()
#define __syncwarp(...) emu::syncwarp()
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor(v, m)
#define __shfl_down_sync(mask, v, off) emu::shfl_down(v, off)
// A block's static shared arrays: one object shared by its threads (blocks run one at a time).
#undef __shared__
#define __shared__ static
#define __expf(x) expf(x)
using std::min;
using std::max;
