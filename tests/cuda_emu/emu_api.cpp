// extern "C" entry points of the emulated kernels, called from check.py through ctypes.
#include "cuda/attention_fwd.cuh"
#include "cuda/attention_bwd.cuh"
#include "cuda/scores.cu"

using namespace atp::cuda;

static void fill(AttentionParams& p, int B, int Hq, int Hkv, int Lq, int Lk, int D, const void* q,
                 const int64_t* qs, const void* k, const int64_t* ks, const void* v, const int64_t* vs,
                 const float* bias, int64_t bias_stride, float scale, int causal) {
  p.q = q; p.k = k; p.v = v; p.key_bias = bias;
  p.q_batch_stride = qs[0]; p.q_head_stride = qs[1]; p.q_row_stride = qs[2];
  p.k_batch_stride = ks[0]; p.k_head_stride = ks[1]; p.k_row_stride = ks[2];
  p.v_batch_stride = vs[0]; p.v_head_stride = vs[1]; p.v_row_stride = vs[2];
  p.bias_batch_stride = bias_stride;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D; p.scale = scale; p.causal = causal;
}

extern "C" void emu_fwd(int dtype, int B, int Hq, int Hkv, int Lq, int Lk, int D, const void* q,
                        const int64_t* qs, const void* k, const int64_t* ks, const void* v,
                        const int64_t* vs, const float* bias, int64_t bias_stride, float scale,
                        int causal, void* out, float* lse, int num_splits, int keys_per_split,
                        float* out_accum, float* lse_accum) {
  AttentionFwdParams p{};
  fill(p, B, Hq, Hkv, Lq, Lk, D, q, qs, k, ks, v, vs, bias, bias_stride, scale, causal);
  p.out = out; p.lse = lse; p.num_splits = num_splits; p.keys_per_split = keys_per_split;
  p.out_accum = out_accum; p.lse_accum = lse_accum;
  HEADDIM_SWITCH(D, kD, [&] {
    if (dtype == 0) {
      run_attention_fwd<__half, kD>(p, nullptr);
    } else {
      run_attention_fwd<__nv_bfloat16, kD>(p, nullptr);
    }
  });
}

extern "C" void emu_bwd(int dtype, int B, int Hq, int Hkv, int Lq, int Lk, int D, const void* q,
                        const int64_t* qs, const void* k, const int64_t* ks, const void* v,
                        const int64_t* vs, const float* bias, int64_t bias_stride, float scale,
                        int causal, const void* dout, const int64_t* dos, const void* out,
                        const int64_t* os, const float* lse, const float* dlse, float* delta,
                        void* dq, float* dk, float* dv, float* dbias, const float* grad_bias,
                        int64_t grad_bias_stride, int num_splits, float* dq_accum) {
  AttentionBwdParams p{};
  fill(p, B, Hq, Hkv, Lq, Lk, D, q, qs, k, ks, v, vs, bias, bias_stride, scale, causal);
  p.dout = dout; p.out = out;
  p.dout_batch_stride = dos[0]; p.dout_head_stride = dos[1]; p.dout_row_stride = dos[2];
  p.out_batch_stride = os[0]; p.out_head_stride = os[1]; p.out_row_stride = os[2];
  p.lse = lse; p.dlse = dlse; p.delta = delta; p.dq = dq; p.dk_accum = dk; p.dv_accum = dv;
  p.dbias_accum = dbias;
  p.grad_bias = grad_bias; p.grad_bias_batch_stride = grad_bias_stride;
  p.num_splits = num_splits; p.dq_accum = dq_accum;
  HEADDIM_SWITCH(D, kD, [&] {
    if (dtype == 0) {
      run_attention_bwd<__half, kD>(p, nullptr);
    } else {
      run_attention_bwd<__nv_bfloat16, kD>(p, nullptr);
    }
  });
}

extern "C" void emu_cross(int dtype, int B, int Hq, int Hkv, int Lq, int Lk, int D, const void* q,
                          const int64_t* qs, const void* k, const int64_t* ks, const float* lse,
                          const float* bias, int64_t bias_stride, const float* w, const int* rows,
                          const int* n_rows, const float* w_sum, float scale,
                          int causal, float* s_cross) {
  CrossScoresParams p{};
  p.q = q; p.k = k; p.lse = lse; p.key_bias = bias; p.w = w; p.rows = rows; p.n_rows = n_rows;
  p.w_sum = w_sum; p.s_cross = s_cross;
  p.q_batch_stride = qs[0]; p.q_head_stride = qs[1]; p.q_row_stride = qs[2];
  p.k_batch_stride = ks[0]; p.k_head_stride = ks[1]; p.k_row_stride = ks[2];
  p.bias_batch_stride = bias_stride;
  p.B = B; p.Hq = Hq; p.Hkv = Hkv; p.Lq = Lq; p.Lk = Lk; p.D = D;
  p.scale = scale; p.causal = causal;
  cross_scores_launch(p, dtype, nullptr);
}


// The host's backward policy (launch.h): keys per block, and blocks per (batch, head).
extern "C" int emu_bwd_block_n(int d, int smem_per_sm) { return bwd_block_n(d, smem_per_sm); }
extern "C" int emu_bwd_num_splits(int64_t heads, int64_t key_blocks, int64_t slice_bytes, int64_t sms) {
  return bwd_num_splits(heads, key_blocks, slice_bytes, sms);
}

// The global buffers the next launches may touch (bounds-checked by shim/ptx.cuh's accesses).
extern "C" void emu_register(const void* p, int64_t bytes) { emu::register_buffer(p, size_t(bytes)); }
extern "C" void emu_clear() { emu::clear_buffers(); }
// What cudaDeviceGetAttribute(MaxSharedMemoryPerMultiprocessor) reports: picks the forward's tiles.
extern "C" void emu_set_smem_per_sm(int bytes) { emu::g_smem_per_sm = bytes; }
// The architecture the device code takes its paths for (ptx::has_stmatrix): 80, 86 or 90.
extern "C" void emu_set_arch(int arch) { emu::g_arch = arch; }
