// CPU atp_scores (DESIGN §3.2, paper Eq. 3-4), without any Lq x Lk buffer.
#include <ATen/ATen.h>

#include <cstring>
#include <limits>
#include <vector>

#include "checks.h"
#include "cpu/rows.h"
#include "cpu/tiles.h"
#include "ops.h"
#include "scores_host.h"

namespace atp {
namespace {

using cpu::ceil_div;
using cpu::kBlockK;
using cpu::kBlockQ;
using cpu::TileBuffer;
using cpu::visible_keys;

// Eq. 4: the w-weighted column sums of P over the rows with w > 0 only, each recomputed from
// the forward's lse. Tasks own (batch, key tile), so no two write the same output.
template <typename scalar_t>
void cross_scores_kernel(const at::Tensor& q, const at::Tensor& k, const scalar_t* lse,
                         const scalar_t* key_bias, int64_t bias_stride, const at::Tensor& w,
                         at::Tensor& s_cross, bool causal, scalar_t scale) {
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), group = Hq / Hkv, offset = Lk - Lq;
  const auto opts = q.options();
  const int64_t q_row_stride = q.stride(2);
  const scalar_t* w_ptr = w.data_ptr<scalar_t>();  // contiguous [B, Lq]
  float* out = s_cross.data_ptr<float>();          // contiguous [B, Lk]

  std::vector<std::vector<int64_t>> rows(B);
  std::vector<scalar_t> w_sum(B, 0);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t i = 0; i < Lq; ++i) {
      if (w_ptr[b * Lq + i] > 0) rows[b].push_back(i);
      w_sum[b] += w_ptr[b * Lq + i];
    }
  }
  const int64_t n_ktiles = ceil_div(Lk, kBlockK);
  cpu::parallel_tasks(B * n_ktiles, [&](int64_t begin, int64_t end) {
    TileBuffer<scalar_t> q_buf(kBlockQ * D), s_buf(kBlockQ * kBlockK);
    std::vector<scalar_t> acc(kBlockK);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / n_ktiles, j0 = (task % n_ktiles) * kBlockK;
      const int64_t nk = std::min(kBlockK, Lk - j0);
      const scalar_t* bias = key_bias ? key_bias + b * bias_stride + j0 : nullptr;
      std::fill(acc.begin(), acc.begin() + nk, scalar_t(0));
      for (int64_t h = 0; h < Hq && !rows[b].empty(); ++h) {
        const scalar_t* q_bh = q.data_ptr<scalar_t>() + b * q.stride(0) + h * q.stride(1);
        const at::Tensor kj = k[b][h / group].narrow(0, j0, nk);
        const scalar_t* lse_bh = lse + (b * Hq + h) * Lq;
        for (size_t c0 = 0; c0 < rows[b].size(); c0 += kBlockQ) {
          const int64_t nr = std::min<int64_t>(kBlockQ, rows[b].size() - c0);
          // Gather the chosen query rows (contiguous along D) into one tile.
          at::Tensor q_sel = q_buf.view(nr, D, opts);
          for (int64_t r = 0; r < nr; ++r) {
            std::memcpy(q_buf.data.data() + r * D, q_bh + rows[b][c0 + r] * q_row_stride,
                        D * sizeof(scalar_t));
          }
          at::Tensor s = s_buf.view(nr, nk, opts);
          at::mm_out(s, q_sel, kj.t());
          scalar_t* s_ptr = s.data_ptr<scalar_t>();
          for (int64_t r = 0; r < nr; ++r) {
            const int64_t i = rows[b][c0 + r];
            if (lse_bh[i] == kNegInf) continue;  // a row that saw nothing contributes nothing
            scalar_t* row = s_ptr + r * nk;
            cpu::prob_row(row, visible_keys(causal, i, offset, j0, nk), nk, scale, bias, lse_bh[i]);
            const scalar_t wi = w_ptr[b * Lq + i];
            for (int64_t c = 0; c < nk; ++c) acc[c] += wi * row[c];
          }
        }
      }
      const scalar_t norm = w_sum[b] > 0 ? scalar_t(1) / (w_sum[b] * Hq) : scalar_t(0);
      for (int64_t c = 0; c < nk; ++c) out[b * Lk + j0 + c] = static_cast<float>(acc[c] * norm);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> scores_cpu(const at::Tensor& q, const at::Tensor& k,
                                              const at::Tensor& lse,
                                              const c10::optional<at::Tensor>& key_bias,
                                              const at::Tensor& w_self, const at::Tensor& w_cross,
                                              bool causal, double scale) {
  const BelowAutograd below_autograd;
  const char* op = "atp_scores";
  const AttentionShape s = check_attention_inputs(op, q, k, k, key_bias);
  check_lse(op, "lse", lse, q, s);
  check_row_weights(op, "w_self", w_self, q, s);
  check_row_weights(op, "w_cross", w_cross, q, s);
  const at::ScalarType ct = compute_dtype(q.scalar_type());
  const at::Tensor qc = as_compute(q, ct), kc = as_compute(k, ct);
  const at::Tensor kb = key_bias ? as_compute(*key_bias, ct) : at::Tensor();
  const at::Tensor lsec = lse.contiguous();
  const at::Tensor s_self = self_scores(qc, kc, w_self.to(ct), scale).to(at::kFloat);
  at::Tensor s_cross = at::empty({s.B, s.Lk}, q.options().dtype(at::kFloat));
  const at::Tensor wc = w_cross.to(ct).contiguous();
  AT_DISPATCH_FLOATING_TYPES(ct, "atp_scores_cpu", [&] {
    cross_scores_kernel<scalar_t>(qc, kc, lsec.data_ptr<scalar_t>(),
                                  kb.defined() ? kb.data_ptr<scalar_t>() : nullptr,
                                  kb.defined() ? kb.stride(0) : 0, wc, s_cross, causal,
                                  static_cast<scalar_t>(scale));
  });
  return {s_self, s_cross};
}

}  // namespace atp
