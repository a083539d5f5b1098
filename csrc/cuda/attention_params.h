// Plain-data parameters of the CUDA attention kernels (DESIGN §3.1). No torch types, so the .cu
// files that read them never include torch headers.
//
// Every tensor's last dimension is contiguous; the other strides are in elements. The host
// (ops_cuda.cpp) guarantees 16-byte aligned base pointers and strides that are multiples of 8
// elements on every dimension of size > 1, so tiles load as 16-byte vectors.
#pragma once
#include <cstdint>

namespace atp::cuda {

struct AttentionParams {
  const void* q;         // [B, Hq, Lq, D]  float16 / bfloat16
  const void* k;         // [B, Hkv, Lk, D] q's dtype
  const void* v;         // [B, Hkv, Lk, D] q's dtype
  const float* key_bias; // [B, Lk] float32 (row stride bias_batch_stride), or nullptr (= 0)
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  int64_t bias_batch_stride;
  int B, Hq, Hkv, Lq, Lk, D;
  float scale;  // multiplies q.k before key_bias is added
  bool causal;  // bottom-right aligned: row i sees keys j <= i + Lk - Lq
};

struct AttentionFwdParams : AttentionParams {
  void* out;   // [B, Hq, Lq, D] contiguous, q's dtype
  float* lse;  // [B, Hq, Lq] contiguous
  // Split-K (flash-decoding): the keys are cut into num_splits ranges of keys_per_split keys
  // (a multiple of the kernel's key tile); each range writes a partial result that
  // attention_fwd_combine merges. num_splits == 1 writes out/lse directly.
  int num_splits;
  int keys_per_split;
  float* out_accum;  // [num_splits, B, Hq, Lq, D] contiguous, normalised partial outputs
  float* lse_accum;  // [num_splits, B, Hq, Lq] contiguous, partial lse (-inf: saw no key)
};

struct AttentionBwdParams : AttentionParams {
  const void* dout;    // [B, Hq, Lq, D] q's dtype (same stride rules as q)
  const void* out;     // [B, Hq, Lq, D] q's dtype
  const float* lse;    // [B, Hq, Lq] contiguous, from the forward
  const float* dlse;   // [B, Hq, Lq] contiguous gradient of lse, or nullptr (= 0)
  int64_t dout_batch_stride, dout_head_stride, dout_row_stride;
  int64_t out_batch_stride, out_head_stride, out_row_stride;
  float* delta;        // [B, Hq, Lq] contiguous scratch: rowsum(dO * O) - dlse
  void* dq;            // [B, Hq, Lq, D] contiguous, q's dtype
  // Deterministic dQ (attention_bwd.cuh): the key blocks of each (batch, head) are dealt to
  // num_splits blocks, each summing its share into its own zero-initialised float slice.
  int num_splits;
  float* dq_accum;     // [num_splits, B, Hq, Lq, D] contiguous, zeroed by the caller
  float* dk_accum;     // [B, Hq, Lk, D] contiguous, dK per query head (summed over GQA on host)
  float* dv_accum;     // [B, Hq, Lk, D] contiguous, dV per query head
  float* dbias_accum;  // [B, Hq, Lk] contiguous, column sums of dS per query head
  // [B, Lk] float32 (row stride grad_bias_batch_stride), or nullptr. When given, dbias_accum
  // sums exp(s_ij + grad_bias_j - lse_i) (dP_ij - delta_i) instead of dS_ij: the gradient with
  // respect to a key mask M when key_bias = grad_bias + log M (defined at M = 0 too).
  const float* grad_bias;
  int64_t grad_bias_batch_stride;
};

// atp_scores' s_cross (DESIGN §3.2, Eq. 4).
struct CrossScoresParams {
  const void* q;          // [B, Hq, Lq, D] float16 / bfloat16 / float32, last dim contiguous
  const void* k;          // [B, Hkv, Lk, D] q's dtype, last dim contiguous
  const float* lse;       // [B, Hq, Lq] contiguous, from the forward
  const float* key_bias;  // [B, Lk] (row stride bias_batch_stride), or nullptr
  const float* w;         // [B, Lq] contiguous row weights w_cross
  const int* rows;        // [B, Lq] contiguous: each sample's rows with w > 0 first, ascending
  const int* n_rows;      // [B] how many entries of `rows` are valid per sample
  const float* w_sum;     // [B] sum of w over each sample's rows
  float* s_cross;         // [B, Lk] contiguous output
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t bias_batch_stride;
  int B, Hq, Hkv, Lq, Lk, D;
  float scale;
  bool causal;
};

}  // namespace atp::cuda
