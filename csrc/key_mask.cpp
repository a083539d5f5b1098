// atp_attention's multiplicative key mask (DESIGN §3.1, the paper's M_j exp(s_ij) / sum_k M_k exp(s_ik)):
// the bias the forward runs with. ATen ops only, so one implementation serves every device.
#include <ATen/ATen.h>

#include "checks.h"
#include "ops.h"

namespace atp {

at::Tensor key_mask_bias(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                         const c10::optional<at::Tensor>& key_bias, const at::Tensor& key_mask) {
  const BelowAutograd below_autograd;
  const char* op = "atp_attention";
  // All checks run here, before any kernel. key_bias's values are checked by attention_fwd in
  // the sum: a NaN or +inf in key_bias makes it NaN or +inf (+inf + log 0 is NaN).
  const AttentionShape s = check_attention_inputs(op, q, k, v, c10::nullopt);
  if (key_bias) check_key_vector(op, "key_bias", *key_bias, q, s);
  check_key_mask(op, key_mask, q, s);
  const at::ScalarType ct = compute_dtype(q.scalar_type());
  // Contiguous whatever key_mask's strides (the fake kernel's layout). log 0 = -inf removes the key.
  at::Tensor bias = at::empty({s.B, s.Lk}, key_mask.options().dtype(ct));
  at::log_out(bias, key_mask.to(ct));
  return key_bias ? bias.add_(*key_bias) : bias;
}

}  // namespace atp
