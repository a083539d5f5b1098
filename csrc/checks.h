// Argument validation shared by the CPU and CUDA implementations of every op.
// Each check runs before any kernel and names the argument and the expected form (DESIGN §5).
#pragma once
#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/util/Optional.h>

namespace atp {

// Every host entry point opens one of these: the ATen calls inside an op are implementation,
// not part of the graph, even when the op is reached with autograd on (ops without an autograd
// formula such as scores, or a backward op under create_graph).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

// The checks that read tensor values (NaN/+inf in key_bias, grad_bias and prev_bias; key_mask in
// [0, 1]; finite row weights) cost one reduction and one host sync each. They run by default;
// ATP_OPS_VALIDATION=0 in the environment at load, or set_validation(false) (Python:
// atp_ops.set_validation(False)), turns them off, and they are skipped while the current CUDA
// stream is being captured into a graph (a sync there would end the capture). Shape, dtype and
// device checks always run: they read no data.
bool validation_enabled();
void set_validation(bool enabled);
// Whether the current CUDA stream is capturing; set by the CUDA half of the library when it is
// built (the CPU half cannot include CUDA headers), else null.
extern bool (*cuda_stream_capturing)();

struct AttentionShape {
  int64_t B, Hq, Hkv, Lq, Lk, D;
};

// q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], key_bias [B, Lk] (float32, or float64 with float64 q).
AttentionShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const c10::optional<at::Tensor>& key_bias);

// A per-key tensor [B, Lk], float32 (or float64 with float64 q), on q's device; `name` is the
// argument the message names. Shapes, dtype and device only: no value is read.
void check_key_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                      const AttentionShape& s);

// An additive key bias (key_bias, grad_bias): check_key_vector, then no NaN and no +inf
// (one reduction and one host sync, when validation is on).
void check_key_bias(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                    const AttentionShape& s);

// A multiplicative key mask (key_mask): check_key_vector, then every value in [0, 1], no NaN
// (one reduction and one host sync, when validation is on).
void check_key_mask(const char* op, const at::Tensor& key_mask, const at::Tensor& q,
                    const AttentionShape& s);

// lse [B, Hq, Lq], float32 (float64 with float64 q).
void check_lse(const char* op, const char* name, const at::Tensor& lse, const at::Tensor& q,
               const AttentionShape& s);

// A tensor of exactly `sizes` on q's device (dtype not checked).
void check_same_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                      const char* form, const at::Tensor& like);

// Row weights w [B, Lq], floating point; finite and >= 0 when validation is on.
void check_row_weights(const char* op, const char* name, const at::Tensor& w, const at::Tensor& q,
                       const AttentionShape& s);

// s_red [B, N]; s_spatial [B, N] or [N]; theta_r, theta_s [B]; prev_bias [B, N]; all float32 or
// all float64, on one device. Returns {B, N}.
std::pair<int64_t, int64_t> check_soft_mask_inputs(const char* op, const at::Tensor& s_red,
                                                   const at::Tensor& s_spatial,
                                                   const at::Tensor& theta_r,
                                                   const at::Tensor& theta_s, double temperature,
                                                   const c10::optional<at::Tensor>& prev_bias);

// The dtype kernels compute in: float64 stays float64, everything else runs in float32.
inline at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// `t` in dtype `dt` with a contiguous last dimension; a view where that already holds.
inline at::Tensor as_compute(const at::Tensor& t, at::ScalarType dt) {
  at::Tensor r = t.scalar_type() == dt ? t : t.to(dt);
  return r.stride(-1) == 1 ? r : r.contiguous();
}

}  // namespace atp
