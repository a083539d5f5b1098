// CUDA implementations' host glue: validate, guard the device, launch on the current stream.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "checks.h"
#include "cuda/launch.h"
#include "ops.h"
#include "scores_host.h"
#include "soft_mask_host.h"

namespace atp {
namespace {

int dtype_code(const at::Tensor& t) { return t.scalar_type() == at::kDouble ? 1 : 0; }

void check_grid_rows(const char* op, int64_t B) {
  TORCH_CHECK(B <= 65535, op, ": at most 65535 samples per call on CUDA, got B = ", B);
}

at::Tensor soft_mask_fwd_cuda(const at::Tensor& s_red, const at::Tensor& s_spatial,
                              const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature,
                              const c10::optional<at::Tensor>& prev_bias, bool hard) {
  const BelowAutograd below_autograd;
  SoftMaskInputs in = prepare_soft_mask("atp_soft_mask", s_red, s_spatial, theta_r, theta_s,
                                        temperature, prev_bias, c10::nullopt);
  const c10::cuda::CUDAGuard guard(s_red.device());
  check_grid_rows("atp_soft_mask", in.params.B);
  at::Tensor out = at::empty({in.params.B, in.params.N}, s_red.options());
  if (out.numel() == 0) return out;
  in.params.out = out.data_ptr();
  in.params.hard = hard;
  cuda::soft_mask_fwd_launch(in.params, dtype_code(s_red), c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> soft_mask_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& s_red, const at::Tensor& s_spatial,
    const at::Tensor& theta_r, const at::Tensor& theta_s, double temperature) {
  const BelowAutograd below_autograd;
  SoftMaskInputs in = prepare_soft_mask("atp_soft_mask backward", s_red, s_spatial, theta_r, theta_s,
                                        temperature, c10::nullopt, grad);
  const c10::cuda::CUDAGuard guard(s_red.device());
  check_grid_rows("atp_soft_mask backward", in.params.B);
  SoftMaskGrads g = allocate_soft_mask_grads(in);
  if (in.params.B > 0) {
    cuda::soft_mask_bwd_launch(in.params, dtype_code(s_red), c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {g.d_s_red, g.d_s_spatial, g.d_theta_r, g.d_theta_s};
}

// ---------------------------------------------------------------------------------------------
// atp_attention and atp_scores (DESIGN §3.1, §3.2)

cuda::AttnDtype attention_dtype(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              ": on CUDA, q, k and v must be float16 or bfloat16, got ", q.scalar_type(),
              "; for float32/float64 use the CPU implementation (move the tensors to the CPU)");
  return q.scalar_type() == at::kHalf ? cuda::AttnDtype::kFloat16 : cuda::AttnDtype::kBFloat16;
}

void check_attention_cuda_shape(const char* op, const AttentionShape& s) {
  TORCH_CHECK(s.D == 64 || s.D == 96 || s.D == 128, op,
              ": the CUDA kernels support head dim D = 64, 96 or 128, got D = ", s.D);
  TORCH_CHECK(s.B <= 65535 && s.Hq <= 65535, op,
              ": at most 65535 samples and 65535 query heads per call on CUDA, got B = ", s.B,
              ", Hq = ", s.Hq);
  TORCH_CHECK(s.Lq < (int64_t(1) << 30) && s.Lk < (int64_t(1) << 30), op,
              ": sequence lengths must be below 2^30 on CUDA, got Lq = ", s.Lq, ", Lk = ", s.Lk);
}

// What the tile loads need (attention_params.h): a 16-byte aligned base, a contiguous last
// dimension and strides that are multiples of 8 elements (dims of size 1 excepted, their stride
// is never used). A view where that already holds, else a fresh contiguous copy.
at::Tensor as_tile_loadable(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim() && ok; ++d) ok = t.size(d) == 1 || t.stride(d) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

at::Tensor bias_rows(const c10::optional<at::Tensor>& key_bias) {
  if (!key_bias) return at::Tensor();
  return key_bias->stride(1) == 1 || key_bias->size(1) <= 1 ? *key_bias : key_bias->contiguous();
}

void fill_attention_params(cuda::AttentionParams& p, const at::Tensor& q, const at::Tensor& k,
                           const at::Tensor& v, const at::Tensor& kb, const AttentionShape& s,
                           bool causal, double scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.key_bias = kb.defined() ? kb.data_ptr<float>() : nullptr;
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.bias_batch_stride = kb.defined() ? kb.stride(0) : 0;
  p.B = int(s.B), p.Hq = int(s.Hq), p.Hkv = int(s.Hkv), p.Lq = int(s.Lq), p.Lk = int(s.Lk);
  p.D = int(s.D);
  p.scale = float(scale);
  p.causal = causal;
}

// Flash-decoding: with few query rows the grid (one block per kFwdBlockQ rows of a head group)
// leaves most of the GPU idle, so the keys are split across blocks as well, aiming at ~4 blocks
// per SM.
int attention_num_splits(const AttentionShape& s) {
  constexpr int64_t kMaxSplits = 32, kMinKeysPerSplit = 128;
  if (s.Lq > 16 || s.Lk < 2 * kMinKeysPerSplit) return 1;
  // (ATen/cuda/CUDAContext.h would give the properties too, but it pulls in cuSPARSE headers.)
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t blocks = cuda::fwd_blocks(s.B, s.Lq, s.Hq, s.Hkv);
  const int64_t want = (4 * sms + blocks - 1) / blocks;
  return int(std::max<int64_t>(1, std::min({want, s.Lk / kMinKeysPerSplit, kMaxSplits})));
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v,
                                                      const c10::optional<at::Tensor>& key_bias,
                                                      bool causal, double scale) {
  const char* op = "atp_attention";
  const BelowAutograd below_autograd;
  const AttentionShape s = check_attention_inputs(op, q, k, v, key_bias);
  const cuda::AttnDtype dtype = attention_dtype(op, q);
  check_attention_cuda_shape(op, s);
  const c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({s.B, s.Hq, s.Lq, s.D}, q.options());
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};

  const at::Tensor qc = as_tile_loadable(q), kc = as_tile_loadable(k), vc = as_tile_loadable(v);
  const at::Tensor kb = bias_rows(key_bias);
  cuda::AttentionFwdParams p{};
  fill_attention_params(p, qc, kc, vc, kb, s, causal, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.num_splits = attention_num_splits(s);
  p.keys_per_split = std::max<int>(1, p.Lk);
  at::Tensor out_accum, lse_accum;
  if (p.num_splits > 1) {
    const int64_t g = cuda::kSplitKeyGranule;
    const int64_t per_split = (s.Lk + p.num_splits - 1) / p.num_splits;
    p.keys_per_split = int((per_split + g - 1) / g * g);
    p.num_splits = int((s.Lk + p.keys_per_split - 1) / p.keys_per_split);  // no empty split
  }
  if (p.num_splits > 1) {
    const auto f32 = q.options().dtype(at::kFloat);
    out_accum = at::empty({p.num_splits, s.B, s.Hq, s.Lq, s.D}, f32);
    lse_accum = at::empty({p.num_splits, s.B, s.Hq, s.Lq}, f32);
    p.out_accum = out_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  cuda::attention_fwd_launch(p, dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, lse};
}

// The CUDA backward is deterministic whatever `deterministic` says: no atomics, dQ summed over
// per-split slices in a fixed order, per-head dK/dV/d key_bias buffers reduced over the GQA group
// by at::sum (attention_bwd.cuh).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& key_bias,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, bool /*deterministic*/,
    const c10::optional<at::Tensor>& grad_bias) {
  const char* op = "atp_attention backward";
  const BelowAutograd below_autograd;
  const AttentionShape s = check_attention_inputs(op, q, k, v, key_bias);
  if (grad_bias) check_key_bias(op, "grad_bias", *grad_bias, q, s);
  const cuda::AttnDtype dtype = attention_dtype(op, q);
  check_attention_cuda_shape(op, s);
  check_same_shape(op, "grad_out", grad_out, q.sizes(), "(B, Hq, Lq, D)", q);
  check_same_shape(op, "out", out, q.sizes(), "(B, Hq, Lq, D)", q);
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q.scalar_type(), ", got ",
              grad_out.scalar_type(), " and ", out.scalar_type());
  check_lse(op, "lse", lse, q, s);
  if (grad_lse) check_lse(op, "grad_lse", *grad_lse, q, s);
  const c10::cuda::CUDAGuard guard(q.device());

  const auto f32 = q.options().dtype(at::kFloat);
  at::Tensor dq = at::empty({s.B, s.Hq, s.Lq, s.D}, q.options());
  at::Tensor dk_h = at::empty({s.B, s.Hq, s.Lk, s.D}, f32);
  at::Tensor dv_h = at::empty({s.B, s.Hq, s.Lk, s.D}, f32);
  at::Tensor dbias_h = at::empty({s.B, s.Hq, s.Lk}, f32);
  at::Tensor delta = at::empty({s.B, s.Hq, s.Lq}, f32);
  at::Tensor dq_accum;
  if (s.B * s.Hq > 0 && (s.Lq > 0 || s.Lk > 0)) {
    const at::Tensor qc = as_tile_loadable(q), kc = as_tile_loadable(k), vc = as_tile_loadable(v);
    const at::Tensor doc = as_tile_loadable(grad_out), oc = as_tile_loadable(out);
    const at::Tensor kb = bias_rows(key_bias);
    const at::Tensor gb = bias_rows(grad_bias);
    const at::Tensor lsec = lse.contiguous();
    const at::Tensor dlse = grad_lse ? grad_lse->contiguous() : at::Tensor();
    cuda::AttentionBwdParams p{};
    fill_attention_params(p, qc, kc, vc, kb, s, causal, scale);
    p.dout = doc.data_ptr();
    p.out = oc.data_ptr();
    p.dout_batch_stride = doc.stride(0), p.dout_head_stride = doc.stride(1), p.dout_row_stride = doc.stride(2);
    p.out_batch_stride = oc.stride(0), p.out_head_stride = oc.stride(1), p.out_row_stride = oc.stride(2);
    p.lse = lsec.data_ptr<float>();
    p.dlse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
    p.delta = delta.data_ptr<float>();
    p.dq = dq.data_ptr();
    int dev_smem = 0, sms = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&dev_smem, cudaDevAttrMaxSharedMemoryPerMultiprocessor,
                                          c10::cuda::current_device()));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
    const int64_t block_n = cuda::bwd_block_n(int(s.D), dev_smem);
    p.num_splits = cuda::bwd_num_splits(s.B * s.Hq, (s.Lk + block_n - 1) / block_n,
                                        s.B * s.Hq * s.Lq * s.D * int64_t(sizeof(float)), sms);
    dq_accum = at::zeros({p.num_splits, s.B, s.Hq, s.Lq, s.D}, f32);
    p.dq_accum = dq_accum.data_ptr<float>();
    p.dk_accum = dk_h.data_ptr<float>();
    p.dv_accum = dv_h.data_ptr<float>();
    p.dbias_accum = dbias_h.data_ptr<float>();
    p.grad_bias = gb.defined() ? gb.data_ptr<float>() : nullptr;
    p.grad_bias_batch_stride = gb.defined() ? gb.stride(0) : 0;
    cuda::attention_bwd_launch(p, dtype, c10::cuda::getCurrentCUDAStream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t group = s.Hq / s.Hkv;
  at::Tensor dk = group == 1 ? dk_h : dk_h.view({s.B, s.Hkv, group, s.Lk, s.D}).sum(2);
  at::Tensor dv = group == 1 ? dv_h : dv_h.view({s.B, s.Hkv, group, s.Lk, s.D}).sum(2);
  at::Tensor dbias = dbias_h.sum(1);  // float32, key_bias's dtype on CUDA
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type()), dbias};
}

std::tuple<at::Tensor, at::Tensor> scores_cuda(const at::Tensor& q, const at::Tensor& k,
                                               const at::Tensor& lse,
                                               const c10::optional<at::Tensor>& key_bias,
                                               const at::Tensor& w_self, const at::Tensor& w_cross,
                                               bool causal, double scale) {
  const char* op = "atp_scores";
  const BelowAutograd below_autograd;
  const AttentionShape s = check_attention_inputs(op, q, k, k, key_bias);
  check_lse(op, "lse", lse, q, s);
  check_row_weights(op, "w_self", w_self, q, s);
  check_row_weights(op, "w_cross", w_cross, q, s);
  TORCH_CHECK(q.scalar_type() != at::kDouble, op,
              ": on CUDA, q and k must be float16, bfloat16 or float32, got float64; use the CPU "
              "implementation for float64");
  TORCH_CHECK(s.D <= cuda::kCrossScoresMaxHeadDim, op, ": the CUDA kernel supports head dim D <= ",
              cuda::kCrossScoresMaxHeadDim, ", got D = ", s.D);
  TORCH_CHECK(s.B <= 65535, op, ": at most 65535 samples per call on CUDA, got B = ", s.B);
  const c10::cuda::CUDAGuard guard(q.device());

  // Eq. 3: the same ATen composite as the CPU implementation.
  const at::Tensor s_self =
      self_scores(q.to(at::kFloat), k.to(at::kFloat), w_self.to(at::kFloat), scale).to(at::kFloat);

  // Eq. 4: each sample's rows with w_cross > 0, in ascending order, first in its row of `rows`
  // (a stable descending sort of the 0/1 selection), so no host sync sizes the list.
  at::Tensor s_cross = at::zeros({s.B, s.Lk}, q.options().dtype(at::kFloat));
  const at::Tensor wc = w_cross.to(at::kFloat).contiguous();
  const at::Tensor selected = (wc > 0).to(at::kInt);
  const at::Tensor n_rows = at::sum(selected, {1}, /*keepdim=*/false, at::kInt).contiguous();
  if (s.B * s.Lq == 0 || s.Lk == 0) return {s_self, s_cross};
  const at::Tensor rows = std::get<1>(at::sort(selected, /*stable=*/true, /*dim=*/1, /*descending=*/true))
                              .to(at::kInt)
                              .contiguous();
  const at::Tensor w_sum = wc.sum(1).contiguous();
  const int dtype = q.scalar_type() == at::kHalf ? 0 : q.scalar_type() == at::kBFloat16 ? 1 : 2;
  const bool tensor_cores = cuda::cross_scores_on_tensor_cores(dtype, int(s.D));
  const at::Tensor qc = tensor_cores ? as_tile_loadable(q) : q.stride(-1) == 1 ? q : q.contiguous();
  const at::Tensor kc = tensor_cores ? as_tile_loadable(k) : k.stride(-1) == 1 ? k : k.contiguous();
  const at::Tensor kb = bias_rows(key_bias);
  const at::Tensor lsec = lse.contiguous();

  cuda::CrossScoresParams p{};
  p.q = qc.data_ptr();
  p.k = kc.data_ptr();
  p.lse = lsec.data_ptr<float>();
  p.key_bias = kb.defined() ? kb.data_ptr<float>() : nullptr;
  p.w = wc.data_ptr<float>();
  p.rows = rows.data_ptr<int>();
  p.n_rows = n_rows.data_ptr<int>();
  p.w_sum = w_sum.data_ptr<float>();
  p.s_cross = s_cross.data_ptr<float>();
  p.q_batch_stride = qc.stride(0), p.q_head_stride = qc.stride(1), p.q_row_stride = qc.stride(2);
  p.k_batch_stride = kc.stride(0), p.k_head_stride = kc.stride(1), p.k_row_stride = kc.stride(2);
  p.bias_batch_stride = kb.defined() ? kb.stride(0) : 0;
  p.B = int(s.B), p.Hq = int(s.Hq), p.Hkv = int(s.Hkv), p.Lq = int(s.Lq), p.Lk = int(s.Lk);
  p.D = int(s.D);
  p.scale = float(scale);
  p.causal = causal;
  cuda::cross_scores_launch(p, dtype, c10::cuda::getCurrentCUDAStream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {s_self, s_cross};
}

bool current_stream_capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// Loading the CUDA half tells the value checks how to see a graph capture (checks.h).
const bool capture_hook_installed = (cuda_stream_capturing = &current_stream_capturing, true);

}  // namespace
}  // namespace atp

TORCH_LIBRARY_IMPL(atp_ops, CUDA, m) {
  m.impl("soft_mask_fwd", &atp::soft_mask_fwd_cuda);
  m.impl("soft_mask_bwd", &atp::soft_mask_bwd_cuda);
  m.impl("attention_fwd", &atp::attention_fwd_cuda);
  m.impl("attention_bwd", &atp::attention_bwd_cuda);
  m.impl("key_mask_bias", &atp::key_mask_bias);  // ATen ops only: the CPU entry runs on CUDA too
  m.impl("scores", &atp::scores_cuda);
}
