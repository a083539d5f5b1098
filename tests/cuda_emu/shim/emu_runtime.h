// Host emulation of the CUDA execution model used by the atp kernels.
//
// Every CUDA thread of a block is a fiber on one host thread (a 6-register stack switch on x86-64,
// ucontext elsewhere); the scheduler resumes them round-robin, and a fiber runs until it reaches a
// barrier or a warp collective, so a run is deterministic. A warp collective (mma, ldmatrix,
// shuffle) is computed once, by the last lane to arrive, from every lane's own registers, and each
// lane takes its own result. Blocks run one after another. Dynamic shared memory is filled with
// NaN bytes before each block.
//
// What is checked (each failure aborts with EMU FAILURE and the reason):
// - barriers: __syncthreads / __syncwarp as real rendezvous (threads that exited count as
//   arrived, as on the hardware); a block whose live threads all wait on barriers that can never
//   complete is a deadlock;
// - warp collectives (mma, ldmatrix, shuffles) need all 32 lanes;
// - shared memory accessed through shim/ptx.cuh: bounds, alignment, and races: a read or write
//   of a byte last written (or read) by another thread is a failure unless a barrier both took
//   part in separates them (__syncthreads, or __syncwarp within a warp); reading or writing a
//   byte an in-flight cp.async will overwrite is a failure; a thread that exits with copies in
//   flight is a failure;
// - global memory accessed through shim/ptx.cuh: inside one of the buffers the caller
//   registered (register_buffer), when any are registered; and no races between blocks, which
//   the hardware runs in no fixed order: within one launch, a word stored by one block may not
//   be stored, loaded (ld_global, ld_global_2) or have been loaded (ld_global_2, the coherent
//   load) by another.
#pragma once
#include <ucontext.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <unordered_map>
#include <utility>
#include <vector>
#include <cuda_runtime.h>

namespace emu {

[[noreturn]] inline void fail(const char* msg) {
  std::fprintf(stderr, "EMU FAILURE: %s\n", msg);
  std::fflush(stderr);
  std::abort();
}

// ---- global buffers the kernels may touch -----------------------------------------------------
inline std::vector<std::pair<uintptr_t, uintptr_t>> g_buffers;
inline void register_buffer(const void* p, size_t bytes) {
  g_buffers.emplace_back(reinterpret_cast<uintptr_t>(p), reinterpret_cast<uintptr_t>(p) + bytes);
}
inline void clear_buffers() { g_buffers.clear(); }
// The blocks of the current launch that stored / loaded each touched 4-byte word of global
// memory (-1: none; reader -2: several).
struct GlobalWord {
  int writer = -1, reader = -1;
};
inline std::unordered_map<uintptr_t, GlobalWord> g_words;
inline int block_id();
[[noreturn]] inline void global_race(const char* what, uintptr_t a, int other) {
  std::fprintf(stderr, "EMU FAILURE: %s: global race between blocks %d and %d at %p (same launch)\n", what, block_id(),
               other, reinterpret_cast<void*>(a));
  std::abort();
}
inline void global_stored(const void* p, size_t bytes, const char* what) {
  const int me = block_id();
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(3); a < reinterpret_cast<uintptr_t>(p) + bytes; a += 4) {
    GlobalWord& w = g_words[a];
    if (w.writer >= 0 && w.writer != me) global_race(what, a, w.writer);
    if (w.reader != -1 && w.reader != me) global_race(what, a, w.reader);
    w.writer = me;
  }
}
// track: remember the reader (coherent loads; the read-only path is only checked).
inline void global_loaded(const void* p, size_t bytes, const char* what, bool track) {
  const int me = block_id();
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(3); a < reinterpret_cast<uintptr_t>(p) + bytes; a += 4) {
    if (!track) {
      const auto it = g_words.find(a);
      if (it != g_words.end() && it->second.writer >= 0 && it->second.writer != me) global_race(what, a, it->second.writer);
      continue;
    }
    GlobalWord& w = g_words[a];
    if (w.writer >= 0 && w.writer != me) global_race(what, a, w.writer);
    w.reader = (w.reader == -1 || w.reader == me) ? me : -2;
  }
}
inline void check_global(const void* p, size_t bytes, const char* what) {
  if (g_buffers.empty()) return;
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (auto& [lo, hi] : g_buffers)
    if (a >= lo && a + bytes <= hi) return;
  std::fprintf(stderr, "EMU FAILURE: %s: global access of %zu bytes at %p is outside every buffer\n", what,
               bytes, p);
  std::abort();
}

// ---- threads, warps, blocks --------------------------------------------------------------------
struct Copy {  // one cp.async in flight
  unsigned char* dst;
  unsigned char data[16];
  int group;  // -1: not committed yet
};

struct Ctx {
  uint3 tid, bid;
  dim3 bdim, gdim;
  struct Block* block;
  void* sp = nullptr;  // saved stack pointer of the fiber (x86-64 switch)
  ucontext_t uc;       // (other hosts)
  bool done = false;
  std::vector<Copy> copies;
  int next_group = 0;
};

// Who touched a shared byte last, and the barrier generations at that moment.
struct Access {
  int tid = -1;
  uint32_t block_gen = 0, warp_gen = 0;
};
struct Shadow {
  Access write, read;
  uint16_t in_flight = 0;  // cp.async copies that will land on this byte
};

struct Warp {
  int arrived = 0;
  uint32_t gen = 0;       // every rendezvous (collectives and __syncwarp)
  uint32_t sync_gen = 0;  // __syncwarp only: the generations that order memory
  int exited = 0;
  unsigned char in[32][64], out[32][64];  // each lane's operands and results of a collective
};

struct Block {
  int n;
  std::vector<Ctx> threads;
  std::vector<Warp> warps;
  int arrived = 0, exited = 0;
  uint32_t gen = 0;
  int vote = 0, vote_result = 0;  // __syncthreads_or: the OR so far, and that of the last barrier
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  std::vector<Shadow> shadow;
  explicit Block(int n_) : n(n_), threads(n_), warps(n_ / 32) {}
};

inline Ctx* cur = nullptr;
inline uint64_t progress = 0;

#if defined(__x86_64__)
// Saves the callee-saved registers on the current stack, stores its pointer in *save, and
// continues on the stack `next` (made by this function or by start_stack below).
extern "C" void emu_switch_stack(void** save, void* next);
asm(R"(
  .text
  .weak emu_switch_stack
  .hidden emu_switch_stack
  .type emu_switch_stack, @function
emu_switch_stack:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
)");
inline void* sched_sp = nullptr;
inline void yield() { emu_switch_stack(&cur->sp, sched_sp); }
inline void resume(Ctx& c) { emu_switch_stack(&sched_sp, c.sp); }
// A fresh stack whose first switch "returns" into entry() with the ABI's alignment.
inline void start_stack(Ctx& c, char* stack, size_t bytes, void (*entry)()) {
  auto* top = reinterpret_cast<uintptr_t*>((reinterpret_cast<uintptr_t>(stack + bytes) & ~uintptr_t(15)));
  *--top = 0;                                   // entry's return address: it never returns
  *--top = reinterpret_cast<uintptr_t>(entry);  // popped by ret
  for (int r = 0; r < 6; ++r) *--top = 0;       // rbp rbx r12-r15
  c.sp = top;
}
[[noreturn]] inline void finish() {
  void* dead;
  emu_switch_stack(&dead, sched_sp);
  __builtin_unreachable();
}
#else
inline ucontext_t sched;
inline void yield() { swapcontext(&cur->uc, &sched); }
inline void resume(Ctx& c) { swapcontext(&sched, &c.uc); }
inline void start_stack(Ctx& c, char* stack, size_t bytes, void (*entry)()) {
  getcontext(&c.uc);
  c.uc.uc_stack.ss_sp = stack;
  c.uc.uc_stack.ss_size = bytes;
  c.uc.uc_link = &sched;
  makecontext(&c.uc, entry, 0);
}
inline void finish() {}  // returning from entry() follows uc_link back to the scheduler
#endif

inline int lane() { return cur->tid.x % 32; }
inline Warp& warp() { return cur->block->warps[cur->tid.x / 32]; }
inline unsigned char* smem() { return cur->block->smem; }

// The block barrier: arrive (OR-ing `vote` in), wait for the generation to move on, return the
// OR of every thread's vote (threads that exited count as arrived, voting 0).
inline void release_block(Block& b) {
  b.arrived = 0, ++b.gen;
  b.vote_result = b.vote, b.vote = 0;
}
inline int block_barrier(int vote = 0) {
  Block& b = *cur->block;
  const uint32_t g = b.gen;
  b.vote |= vote;
  ++b.arrived, ++progress;
  if (b.arrived + b.exited == b.n) release_block(b);
  while (b.gen == g) yield();
  return b.vote_result;
}
// Every lane puts `in_bytes` of operands into its slot; the last lane to arrive runs
// compute(in, out) for the whole warp; then each lane copies its `out_bytes` of results.
template <class Compute>
void collective(const void* mine, size_t in_bytes, void* result, size_t out_bytes, bool orders_memory,
                Compute&& compute) {
  Warp& w = warp();
  if (w.exited) fail("a warp collective or __syncwarp after lanes of the warp exited");
  std::memcpy(w.in[lane()], mine, in_bytes);
  const uint32_t g = w.gen;
  ++progress;
  if (++w.arrived == 32) {
    compute(w.in, w.out);
    w.arrived = 0, ++w.gen;
    if (orders_memory) ++w.sync_gen;
  } else {
    while (w.gen == g) yield();
  }
  std::memcpy(result, w.out[lane()], out_bytes);
}
inline void syncthreads() { block_barrier(); }
inline int syncthreads_or(int pred) { return block_barrier(pred != 0); }
inline void syncwarp() {
  collective(nullptr, 0, nullptr, 0, true, [](auto, auto) {});
}

// ---- shared-memory race detection --------------------------------------------------------------
// Whether access `a` happened before what thread `tid` does now, by a barrier both took part in.
inline bool ordered(const Access& a, int tid) {
  if (a.tid < 0 || a.tid == tid) return true;
  const Block& b = *cur->block;
  if (b.gen > a.block_gen) return true;
  return a.tid / 32 == tid / 32 && b.warps[tid / 32].sync_gen > a.warp_gen;
}
inline Access now(int tid) {
  const Block& b = *cur->block;
  return Access{tid, b.gen, b.warps[tid / 32].sync_gen};
}
inline Shadow* shadow_of(const void* p, size_t bytes, const char* what) {
  Block& b = *cur->block;
  auto* c = static_cast<const unsigned char*>(p);
  if (c < b.smem || c + bytes > b.smem + b.smem_bytes) {
    std::fprintf(stderr, "EMU FAILURE: %s: shared access of %zu bytes at offset %td outside [0, %zu)\n", what,
                 bytes, c - b.smem, b.smem_bytes);
    std::abort();
  }
  return &b.shadow[c - b.smem];
}
[[noreturn]] inline void race(const char* what, const char* kind, const void* p, int tid, const Access& other) {
  std::fprintf(stderr,
               "EMU FAILURE: %s: %s race at shared offset %td: thread %d and thread %d, no barrier between\n",
               what, kind, static_cast<const unsigned char*>(p) - cur->block->smem, tid, other.tid);
  std::abort();
}
// A read (write) of `bytes` at p by thread `tid` (default: the running one).
inline void on_read(const void* p, size_t bytes, const char* what, int tid = -1) {
  if (tid < 0) tid = int(cur->tid.x);
  Shadow* s = shadow_of(p, bytes, what);
  for (size_t i = 0; i < bytes; ++i) {
    if (s[i].in_flight) fail("read of shared memory that an in-flight cp.async will overwrite (missing wait?)");
    if (!ordered(s[i].write, tid)) race(what, "read-after-write", static_cast<const unsigned char*>(p) + i, tid, s[i].write);
    s[i].read = now(tid);
  }
}
inline void on_write(const void* p, size_t bytes, const char* what, bool landing = false, int tid = -1) {
  if (tid < 0) tid = int(cur->tid.x);
  Shadow* s = shadow_of(p, bytes, what);
  for (size_t i = 0; i < bytes; ++i) {
    if (!landing && s[i].in_flight) fail("write to shared memory that an in-flight cp.async will overwrite");
    auto* at = static_cast<const unsigned char*>(p) + i;
    if (!ordered(s[i].write, tid)) race(what, "write-after-write", at, tid, s[i].write);
    if (!ordered(s[i].read, tid)) race(what, "write-after-read", at, tid, s[i].read);
    s[i].write = now(tid);
  }
}
// ---- shuffles -----------------------------------------------------------------------------------
// Lane l receives `v` of lane src(l); a source outside the warp returns the lane's own value.
template <class T>
T shuffle(T v, int src) {
  static_assert(sizeof(T) <= 8, "32- and 64-bit shuffles");
  struct In { T v; int src; } mine{v, src};
  T r;
  collective(&mine, sizeof(mine), &r, sizeof(T), false, [](unsigned char (*in)[64], unsigned char (*out)[64]) {
    for (int l = 0; l < 32; ++l) {
      In x;
      std::memcpy(&x, in[l], sizeof(x));
      std::memcpy(out[l], in[x.src >= 0 && x.src < 32 ? x.src : l], sizeof(T));
    }
  });
  return r;
}
template <class T>
T shfl_xor(T v, int m) { return shuffle(v, lane() ^ m); }
template <class T>
T shfl_down(T v, int off) { return shuffle(v, lane() + off); }

// ---- launches ----------------------------------------------------------------------------------
inline int g_smem_per_sm = 228 * 1024;  // what cudaDeviceGetAttribute reports (sm_90 by default)
inline int g_arch = 90;                 // the __CUDA_ARCH__ / 10 of the emulated device code
inline void device_attribute(int* v, cudaDeviceAttr attr, int) {
  if (attr != cudaDevAttrMaxSharedMemoryPerMultiprocessor) fail("unemulated device attribute");
  *v = g_smem_per_sm;
}
inline void get_device(int* d) { *d = 0; }
template <class K>
void func_set_attribute(K, cudaFuncAttribute, int) {}

constexpr size_t kStackBytes = 512 * 1024;

template <class Kernel, class P>
struct Entry {
  static inline Kernel kernel;
  static inline const P* params;
  static void run() {
    kernel(*params);
    Ctx& c = *cur;
    if (!c.copies.empty()) fail("a thread exited with cp.async copies in flight");
    c.done = true;
    Block& b = *c.block;
    ++b.exited, ++progress;
    if (b.arrived && b.arrived + b.exited == b.n) release_block(b);
    ++b.warps[c.tid.x / 32].exited;
    finish();
  }
};

inline int block_id() { return int((cur->bid.z * cur->gdim.y + cur->bid.y) * cur->gdim.x + cur->bid.x); }

template <class Kernel, class P>
void launch(Kernel kernel, dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t, const P& p) {
  const int n = block.x * block.y * block.z;
  if (n % 32 != 0) fail("block size not a multiple of 32");
  if (block.y != 1 || block.z != 1) fail("only 1-D blocks are emulated");
  std::vector<unsigned char> smem_buf(smem_bytes + 4096 + 128);
  unsigned char* base = smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(smem_buf.data()) % 128);
  std::unique_ptr<char[]> stacks(new char[kStackBytes * n]);
  using E = Entry<Kernel, P>;
  g_words.clear();  // a new launch: blocks of earlier launches are ordered before it
  E::kernel = kernel;
  E::params = &p;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        std::memset(base, 0xFF, smem_bytes + 4096);  // NaN everywhere: uninitialised reads show
        Block blk(n);
        blk.smem = base;
        blk.smem_bytes = smem_bytes;
        blk.shadow.assign(smem_bytes, Shadow{});
        for (int t = 0; t < n; ++t) {
          Ctx& c = blk.threads[t];
          c.tid = make_uint3(t, 0, 0), c.bid = make_uint3(bx, by, bz);
          c.bdim = block, c.gdim = grid, c.block = &blk;
          start_stack(c, stacks.get() + size_t(t) * kStackBytes, kStackBytes, &E::run);
        }
        for (int live = n; live > 0;) {
          const uint64_t before = progress;
          live = 0;
          for (auto& c : blk.threads) {
            if (c.done) continue;
            cur = &c;
            resume(c);
            live += !c.done;
          }
          if (live && progress == before) fail("deadlock: live threads wait on barriers that cannot complete");
        }
        cur = nullptr;
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
#define threadIdx (emu::cur->tid)
#define blockIdx (emu::cur->bid)
#define blockDim (emu::cur->bdim)
#define gridDim (emu::cur->gdim)
#define __syncthreads() emu::syncthreads()
#define __syncthreads_or(pred) emu::syncthreads_or(pred)
#define __syncwarp(...) emu::syncwarp()
#define __shfl_xor_sync(mask, v, m) emu::shfl_xor(v, m)
#define __shfl_down_sync(mask, v, off) emu::shfl_down(v, off)
// A block's static shared arrays: one object shared by its threads (blocks run one at a time).
#undef __shared__
#define __shared__ static
#define __expf(x) expf(x)
using std::max;
using std::min;
