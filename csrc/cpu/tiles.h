// Tiling and threading helpers shared by the CPU kernels.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <vector>

namespace atp::cpu {

constexpr int64_t kBlockQ = 128;  // query rows per tile
constexpr int64_t kBlockK = 256;  // keys per tile

// at::parallel_for over `n` independent tasks, grain 1. OpenMP's worker threads do not inherit
// the caller's thread-local state, the below-autograd dispatch guard included, so each chunk
// runs under the caller's before it calls any ATen op.
template <typename F>
void parallel_tasks(int64_t n, const F& f) {
  const at::ThreadLocalState caller;
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard same_state(caller);
    f(begin, end);
  });
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Number of keys in [j0, j0 + nk) that query row i may see. Causal masking is bottom-right
// aligned: row i sees keys j <= i + offset, offset = Lk - Lq.
inline int64_t visible_keys(bool causal, int64_t i, int64_t offset, int64_t j0, int64_t nk) {
  if (!causal) return nk;
  return std::clamp<int64_t>(i + offset + 1 - j0, 0, nk);
}

// Thread-owned scratch for one tile; GEMMs write into nr x nc views of it.
template <typename scalar_t>
struct TileBuffer {
  std::vector<scalar_t> data;
  explicit TileBuffer(int64_t capacity) : data(capacity) {}
  at::Tensor view(int64_t nr, int64_t nc, const at::TensorOptions& opts) {
    TORCH_INTERNAL_ASSERT(nr * nc <= static_cast<int64_t>(data.size()));
    return at::from_blob(data.data(), {nr, nc}, opts);
  }
};

}  // namespace atp::cpu
