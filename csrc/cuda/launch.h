// Kernel launchers of the CUDA ops. Declared with plain types only, so the .cu files that define
// them never include torch headers (nvcc compiles them in seconds, not minutes).
#pragma once
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "cuda/attention_params.h"
#include "cuda/static_switch.h"
#include "soft_mask.h"

namespace atp::cuda {

// dtype: 0 = float32, 1 = float64.
void soft_mask_fwd_launch(const SoftMaskParams& p, int dtype, cudaStream_t stream);
void soft_mask_bwd_launch(const SoftMaskParams& p, int dtype, cudaStream_t stream);

// The 16-bit dtypes the attention kernels are built for.
enum class AttnDtype { kFloat16, kBFloat16 };

// One explicit specialisation per (dtype, head dim) in attention_{fwd,bwd}_<dtype>_hdim<D>.cu,
// so ninja compiles them in parallel. kD is 64, 96 or 128.
template <AttnDtype kDtype, int kD>
void attention_fwd_run(const AttentionFwdParams& p, cudaStream_t stream);
template <AttnDtype kDtype, int kD>
void attention_bwd_run(const AttentionBwdParams& p, cudaStream_t stream);

// The specialisations that exist (declared before the dispatchers below use them).
template <>
void attention_fwd_run<AttnDtype::kFloat16, 64>(const AttentionFwdParams& p, cudaStream_t stream);
template <>
void attention_fwd_run<AttnDtype::kFloat16, 96>(const AttentionFwdParams& p, cudaStream_t stream);
template <>
void attention_fwd_run<AttnDtype::kFloat16, 128>(const AttentionFwdParams& p, cudaStream_t stream);
template <>
void attention_fwd_run<AttnDtype::kBFloat16, 64>(const AttentionFwdParams& p, cudaStream_t stream);
template <>
void attention_fwd_run<AttnDtype::kBFloat16, 96>(const AttentionFwdParams& p, cudaStream_t stream);
template <>
void attention_fwd_run<AttnDtype::kBFloat16, 128>(const AttentionFwdParams& p, cudaStream_t stream);
template <>
void attention_bwd_run<AttnDtype::kFloat16, 64>(const AttentionBwdParams& p, cudaStream_t stream);
template <>
void attention_bwd_run<AttnDtype::kFloat16, 96>(const AttentionBwdParams& p, cudaStream_t stream);
template <>
void attention_bwd_run<AttnDtype::kFloat16, 128>(const AttentionBwdParams& p, cudaStream_t stream);
template <>
void attention_bwd_run<AttnDtype::kBFloat16, 64>(const AttentionBwdParams& p, cudaStream_t stream);
template <>
void attention_bwd_run<AttnDtype::kBFloat16, 96>(const AttentionBwdParams& p, cudaStream_t stream);
template <>
void attention_bwd_run<AttnDtype::kBFloat16, 128>(const AttentionBwdParams& p, cudaStream_t stream);

// Split-K keys are cut at multiples of this, a multiple of every forward key tile.
constexpr int kSplitKeyGranule = 64;
// Query rows per forward block (every head dim).
constexpr int kFwdBlockQ = 128;
// Decoding (Lq <= 16): a forward block packs the rows of the Hq / Hkv query heads that share a KV
// head (one head without GQA), so each K/V tile is read once for all of them, skips the key
// tiles whose keys are all removed, and only the warps that hold real rows compute.
inline bool fwd_decodes(int64_t Lq) { return Lq <= 16; }
// Query-row blocks per (batch, head group); a head group is one KV head's query heads when
// decoding, one query head otherwise.
inline int64_t fwd_row_blocks(int64_t Lq, int64_t Hq, int64_t Hkv) {
  const int64_t rows = fwd_decodes(Lq) ? Hq / Hkv * Lq : Lq;
  return (rows + kFwdBlockQ - 1) / kFwdBlockQ;
}
// Blocks of a forward launch before split-K.
inline int64_t fwd_blocks(int64_t B, int64_t Lq, int64_t Hq, int64_t Hkv) {
  return B * (fwd_decodes(Lq) ? Hkv : Hq) * fwd_row_blocks(Lq, Hq, Hkv);
}

// The backward's tiles (attention_bwd.cuh): a block owns bwd_block_n keys and walks the queries
// bwd_block_m rows at a time; the larger tiles where an SM has sm_80's 164 KB of shared memory.
constexpr bool bwd_large_tiles(int smem_per_sm) { return smem_per_sm >= 164 * 1024; }
constexpr int bwd_block_m(int d, int smem_per_sm) { return d <= 64 && bwd_large_tiles(smem_per_sm) ? 128 : 64; }
constexpr int bwd_block_n(int d, int smem_per_sm) { return d <= 64 || bwd_large_tiles(smem_per_sm) ? 128 : 64; }
// How many blocks share the key blocks of one (batch, head) in the backward (one block per SM):
// the count that minimises waves x key blocks per split, so few heads still fill the GPU, with
// the num_splits dq_accum slices (slice_bytes each) kept under 256 MB unless one is larger.
inline int bwd_num_splits(int64_t heads, int64_t key_blocks, int64_t slice_bytes, int64_t sms) {
  constexpr int64_t kMaxAccumBytes = int64_t(256) << 20;
  const int64_t max_splits = std::max<int64_t>(1, std::min(key_blocks, kMaxAccumBytes / std::max<int64_t>(1, slice_bytes)));
  int64_t best = 1, best_cost = -1;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t cost = (s * heads + sms - 1) / sms * ((key_blocks + s - 1) / s);
    if (best_cost < 0 || cost < best_cost) best = s, best_cost = cost;
  }
  return int(best);
}

inline void attention_fwd_launch(const AttentionFwdParams& p, AttnDtype dtype, cudaStream_t stream) {
  HEADDIM_SWITCH(p.D, kD, [&] {
    if (dtype == AttnDtype::kFloat16) {
      attention_fwd_run<AttnDtype::kFloat16, kD>(p, stream);
    } else {
      attention_fwd_run<AttnDtype::kBFloat16, kD>(p, stream);
    }
  });
}

inline void attention_bwd_launch(const AttentionBwdParams& p, AttnDtype dtype, cudaStream_t stream) {
  HEADDIM_SWITCH(p.D, kD, [&] {
    if (dtype == AttnDtype::kFloat16) {
      attention_bwd_run<AttnDtype::kFloat16, kD>(p, stream);
    } else {
      attention_bwd_run<AttnDtype::kBFloat16, kD>(p, stream);
    }
  });
}

// s_cross of atp_scores (scores.cu). dtype: 0 = float16, 1 = bfloat16, 2 = float32.
// Requires p.D <= kCrossScoresMaxHeadDim; on tensor cores, q and k tile-loadable (as the
// attention kernels need them).
constexpr int kCrossScoresMaxHeadDim = 256;
inline bool cross_scores_on_tensor_cores(int dtype, int D) { return dtype != 2 && (D == 64 || D == 96 || D == 128); }
void cross_scores_launch(const CrossScoresParams& p, int dtype, cudaStream_t stream);

}  // namespace atp::cuda
