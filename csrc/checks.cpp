#include "checks.h"

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <sstream>

namespace atp {

bool (*cuda_stream_capturing)() = nullptr;

namespace {

std::atomic<bool>& validation_flag() {
  static std::atomic<bool> flag([] {
    const char* env = std::getenv("ATP_OPS_VALIDATION");
    return !(env && (!std::strcmp(env, "0") || !std::strcmp(env, "off") || !std::strcmp(env, "false")));
  }());
  return flag;
}

// Whether the value checks of `t` run now (see checks.h).
bool check_values_of(const at::Tensor& t) {
  if (!validation_flag().load(std::memory_order_relaxed)) return false;
  return !(t.is_cuda() && cuda_stream_capturing && cuda_stream_capturing());
}

std::string sizes_str(at::IntArrayRef s) {
  std::ostringstream os;
  os << s;
  return os.str();
}

bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_log_mask(const char* op, const char* name, const at::Tensor& t) {
  if (!check_values_of(t)) return;
  // One reduction and one host sync; NaN or +inf would otherwise flow silently into every row.
  TORCH_CHECK(!(at::isnan(t) | at::isposinf(t)).any().item<bool>(), op, ": ", name,
              " contains NaN or +inf; use -inf to remove a key and finite values (log M <= 0) for soft masks");
}

void check_mask_values(const char* op, const char* name, const at::Tensor& t) {
  if (!check_values_of(t)) return;
  // One reduction and one host sync, as check_log_mask; NaN fails both comparisons.
  TORCH_CHECK(((t >= 0) & (t <= 1)).all().item<bool>(), op, ": ", name,
              " must hold values in [0, 1], no NaN: 1 keeps a key, 0 removes it, values between soft-mask it");
}

}  // namespace

bool validation_enabled() { return validation_flag().load(); }
void set_validation(bool enabled) { validation_flag().store(enabled); }

void check_key_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                      const AttentionShape& s) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == s.B && t.size(1) == s.Lk, op, ": ", name,
              " must have shape (B, Lk) = (", s.B, ", ", s.Lk, "), got ", sizes_str(t.sizes()));
  TORCH_CHECK(t.scalar_type() == at::kFloat ||
                  (t.scalar_type() == at::kDouble && q.scalar_type() == at::kDouble),
              op, ": ", name, " must be float32 (or float64 with float64 q), got ", t.scalar_type());
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(), ", got ",
              t.device());
}

void check_key_bias(const char* op, const char* name, const at::Tensor& t, const at::Tensor& q,
                    const AttentionShape& s) {
  check_key_vector(op, name, t, q, s);
  check_log_mask(op, name, t);
}

void check_key_mask(const char* op, const at::Tensor& key_mask, const at::Tensor& q,
                    const AttentionShape& s) {
  check_key_vector(op, "key_mask", key_mask, q, s);
  check_mask_values(op, "key_mask", key_mask);
}

AttentionShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                      const at::Tensor& v, const c10::optional<at::Tensor>& key_bias) {
  TORCH_CHECK(q.dim() == 4, op, ": q must have shape (B, Hq, Lq, D), got ", sizes_str(q.sizes()));
  TORCH_CHECK(k.dim() == 4, op, ": k must have shape (B, Hkv, Lk, D), got ", sizes_str(k.sizes()));
  TORCH_CHECK(v.dim() == 4, op, ": v must have shape (B, Hkv, Lk, D), got ", sizes_str(v.sizes()));
  TORCH_CHECK(is_float_type(q.scalar_type()), op,
              ": q must be float16, bfloat16, float32 or float64, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k and v must share one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(),
              ", v ", v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op,
              ": q, k and v must be on one device, got q on ", q.device(), ", k on ", k.device(),
              ", v on ", v.device());
  AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.B && v.size(0) == s.B, op, ": q, k and v must have the same batch B = ",
              s.B, ", got k ", sizes_str(k.sizes()), ", v ", sizes_str(v.sizes()));
  TORCH_CHECK(s.Hq > 0 && s.Hkv > 0 && s.Hq % s.Hkv == 0, op,
              ": the query heads Hq must be a positive multiple of the key/value heads Hkv, got Hq = ",
              s.Hq, ", Hkv = ", s.Hkv);
  TORCH_CHECK(v.size(1) == s.Hkv && v.size(2) == s.Lk, op,
              ": v must have shape (B, Hkv, Lk, D) like k = ", sizes_str(k.sizes()), ", got ",
              sizes_str(v.sizes()));
  TORCH_CHECK(k.size(3) == s.D && v.size(3) == s.D, op, ": q, k and v must share the head dim D = ",
              s.D, ", got k ", sizes_str(k.sizes()), ", v ", sizes_str(v.sizes()));
  TORCH_CHECK(s.D > 0, op, ": the head dim D must be positive");
  if (key_bias.has_value()) check_key_bias(op, "key_bias", *key_bias, q, s);
  return s;
}

void check_lse(const char* op, const char* name, const at::Tensor& lse, const at::Tensor& q,
               const AttentionShape& s) {
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == s.B && lse.size(1) == s.Hq && lse.size(2) == s.Lq, op,
              ": ", name, " must have shape (B, Hq, Lq) = (", s.B, ", ", s.Hq, ", ", s.Lq, "), got ",
              sizes_str(lse.sizes()));
  TORCH_CHECK(lse.scalar_type() == compute_dtype(q.scalar_type()), op, ": ", name, " must be ",
              compute_dtype(q.scalar_type()), " for ", q.scalar_type(), " q, got ", lse.scalar_type());
  TORCH_CHECK(lse.device() == q.device(), op, ": ", name, " must be on q's device ", q.device(),
              ", got ", lse.device());
}

void check_same_shape(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                      const char* form, const at::Tensor& like) {
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", form, " = ", sizes_str(sizes),
              ", got ", sizes_str(t.sizes()));
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on device ", like.device(),
              ", got ", t.device());
}

void check_row_weights(const char* op, const char* name, const at::Tensor& w, const at::Tensor& q,
                       const AttentionShape& s) {
  check_same_shape(op, name, w, {s.B, s.Lq}, "(B, Lq)", q);
  TORCH_CHECK(w.scalar_type() == at::kFloat || w.scalar_type() == at::kDouble, op, ": ", name,
              " must be float32 or float64, got ", w.scalar_type());
  if (!check_values_of(w)) return;
  TORCH_CHECK(!(at::isnan(w) | (w < 0) | at::isinf(w)).any().item<bool>(), op, ": ", name,
              " must hold finite weights >= 0 (0 leaves a row out)");
}

std::pair<int64_t, int64_t> check_soft_mask_inputs(const char* op, const at::Tensor& s_red,
                                                   const at::Tensor& s_spatial,
                                                   const at::Tensor& theta_r,
                                                   const at::Tensor& theta_s, double temperature,
                                                   const c10::optional<at::Tensor>& prev_bias) {
  TORCH_CHECK(s_red.dim() == 2, op, ": s_red must have shape (B, N), got ", sizes_str(s_red.sizes()));
  const int64_t B = s_red.size(0), N = s_red.size(1);
  const at::ScalarType dt = s_red.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble, op, ": s_red must be float32 or float64, got ", dt);
  TORCH_CHECK((s_spatial.dim() == 2 && s_spatial.size(0) == B && s_spatial.size(1) == N) ||
                  (s_spatial.dim() == 1 && s_spatial.size(0) == N),
              op, ": s_spatial must have shape (B, N) = (", B, ", ", N, ") or (N,), got ",
              sizes_str(s_spatial.sizes()));
  TORCH_CHECK(theta_r.dim() == 1 && theta_r.size(0) == B, op, ": theta_r must have shape (B,) = (", B,
              ",), got ", sizes_str(theta_r.sizes()));
  TORCH_CHECK(theta_s.dim() == 1 && theta_s.size(0) == B, op, ": theta_s must have shape (B,) = (", B,
              ",), got ", sizes_str(theta_s.sizes()));
  TORCH_CHECK(std::isfinite(temperature) && temperature > 0, op,
              ": temperature must be a finite number > 0, got ", temperature);
  std::initializer_list<std::pair<const char*, const at::Tensor*>> others = {
      {"s_spatial", &s_spatial}, {"theta_r", &theta_r}, {"theta_s", &theta_s}};
  for (const auto& [name, t] : others) {
    TORCH_CHECK(t->scalar_type() == dt, op, ": ", name, " must have s_red's dtype ", dt, ", got ",
                t->scalar_type());
    TORCH_CHECK(t->device() == s_red.device(), op, ": ", name, " must be on s_red's device ",
                s_red.device(), ", got ", t->device());
  }
  if (prev_bias.has_value()) {
    check_same_shape(op, "prev_bias", *prev_bias, {B, N}, "(B, N)", s_red);
    TORCH_CHECK(prev_bias->scalar_type() == dt, op, ": prev_bias must have s_red's dtype ", dt,
                ", got ", prev_bias->scalar_type());
    check_log_mask(op, "prev_bias", *prev_bias);
  }
  return {B, N};
}

}  // namespace atp
