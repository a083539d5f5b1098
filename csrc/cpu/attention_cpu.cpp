// CPU atp_attention, forward and backward (DESIGN §3.1).
//
// FlashAttention-2's algorithm on the CPU: query tiles against key tiles, online softmax, and
// nothing of size Lq x Lk ever allocated; each thread holds one tile of logits. The tile GEMMs go
// to ATen's BLAS on strided views (so (B, L, H, D)-transposed inputs need no copy), except for
// short query tiles (decoding); the softmax work between them runs in the vectorised row kernels
// of rows.cpp.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>

#include "checks.h"
#include "cpu/rows.h"
#include "cpu/tiles.h"
#include "ops.h"

namespace atp {
namespace {

using cpu::ceil_div;
using cpu::kBlockK;
using cpu::kBlockQ;
using cpu::TileBuffer;
using cpu::visible_keys;

// A query tile of at most kShortQ rows (decoding: Lq = 1 against the cache) takes its two
// products from the row kernels instead: at that size a BLAS call costs more than its arithmetic.
constexpr int64_t kShortQ = 8;

template <typename scalar_t>
void attention_fwd_kernel(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          const scalar_t* key_bias, int64_t bias_stride, at::Tensor& out,
                          at::Tensor& lse, bool causal, scalar_t scale) {
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), group = Hq / Hkv, offset = Lk - Lq;
  const int64_t n_qtiles = ceil_div(Lq, kBlockQ);
  const bool direct = Lq <= kShortQ;  // rows of q, k, v have a contiguous last dim (as_compute)
  const auto opts = q.options();
  const scalar_t* q_data = q.data_ptr<scalar_t>();
  const scalar_t* k_data = k.data_ptr<scalar_t>();
  const scalar_t* v_data = v.data_ptr<scalar_t>();
  scalar_t* out_data = out.data_ptr<scalar_t>();  // [B, Hq, Lq, D] contiguous
  scalar_t* lse_ptr = lse.data_ptr<scalar_t>();   // [B, Hq, Lq] contiguous

  cpu::parallel_tasks(B * Hq * n_qtiles, [&](int64_t begin, int64_t end) {
    TileBuffer<scalar_t> s_buf(kBlockQ * kBlockK), acc_buf(kBlockQ * D);
    scalar_t* s_ptr = s_buf.data.data();
    scalar_t* acc_ptr = acc_buf.data.data();
    scalar_t m[kBlockQ], l[kBlockQ];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (Hq * n_qtiles), h = (task / n_qtiles) % Hq;
      const int64_t i0 = (task % n_qtiles) * kBlockQ, nq = std::min(kBlockQ, Lq - i0);
      const scalar_t* q_tile = q_data + b * q.stride(0) + h * q.stride(1) + i0 * q.stride(2);
      const scalar_t* k_bh = k_data + b * k.stride(0) + (h / group) * k.stride(1);
      const scalar_t* v_bh = v_data + b * v.stride(0) + (h / group) * v.stride(1);
      const scalar_t* bias_b = key_bias ? key_bias + b * bias_stride : nullptr;
      // Keys past the last row's causal horizon are never loaded.
      const int64_t k_end = causal ? std::clamp<int64_t>(i0 + nq + offset, 0, Lk) : Lk;
      // The BLAS path's views of the same memory.
      at::Tensor qi, kbh, vbh, acc;
      if (!direct) {
        qi = q[b][h].narrow(0, i0, nq);
        kbh = k[b][h / group];
        vbh = v[b][h / group];
        acc = acc_buf.view(nq, D, opts);
      }

      std::fill(acc_ptr, acc_ptr + nq * D, scalar_t(0));
      std::fill(m, m + nq, kNegInf);
      std::fill(l, l + nq, scalar_t(0));
      for (int64_t j0 = 0; j0 < k_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, k_end - j0);
        // A tile of keys masked for every row (empty slots of a ragged batch) changes nothing.
        if (bias_b && cpu::all_masked(bias_b + j0, nk)) continue;
        if (direct) {
          for (int64_t r = 0; r < nq; ++r) {
            cpu::dot_keys(q_tile + r * q.stride(2), k_bh + j0 * k.stride(2), k.stride(2), nk, D,
                          s_ptr + r * nk);
          }
        } else {
          at::Tensor s = s_buf.view(nq, nk, opts);
          at::mm_out(s, qi, kbh.narrow(0, j0, nk).t());
        }
        for (int64_t r = 0; r < nq; ++r) {
          const scalar_t alpha = cpu::softmax_tile_row(
              s_ptr + r * nk, visible_keys(causal, i0 + r, offset, j0, nk), nk, scale,
              bias_b ? bias_b + j0 : nullptr, m[r], l[r]);
          if (alpha != scalar_t(1)) {
            for (int64_t d = 0; d < D; ++d) acc_ptr[r * D + d] *= alpha;
          }
        }
        if (direct) {
          for (int64_t r = 0; r < nq; ++r) {
            cpu::add_weighted_values(acc_ptr + r * D, s_ptr + r * nk, v_bh + j0 * v.stride(2),
                                     v.stride(2), nk, D);
          }
        } else {
          acc.addmm_(s_buf.view(nq, nk, opts), vbh.narrow(0, j0, nk));
        }
      }

      scalar_t* o_ptr = out_data + ((b * Hq + h) * Lq + i0) * D;
      for (int64_t r = 0; r < nq; ++r) {
        // A row with no finite logit (l = 0) gives 0 and lse = -inf, never NaN.
        const scalar_t inv = l[r] > 0 ? scalar_t(1) / l[r] : scalar_t(0);
        for (int64_t d = 0; d < D; ++d) o_ptr[r * D + d] = acc_ptr[r * D + d] * inv;
        lse_ptr[(b * Hq + h) * Lq + i0 + r] = l[r] > 0 ? m[r] + std::log(l[r]) : kNegInf;
      }
    }
  });
}

// FlashAttention-2 backward, one (batch, query head) per task, key tiles outer and query tiles
// inner. dK, dV and d(key_bias) are kept per query head and summed over the GQA group after the
// loop, so no two tasks write the same memory and the result is deterministic.
// With grad_bias, d(key_bias) sums exp(s + grad_bias - lse) (dP - delta) instead of dS (the key
// mask's gradient, ops.h). Every key tile is visited (only causal masking skips work), so keys
// at -inf in key_bias but finite in grad_bias get their sums.
template <typename scalar_t>
void attention_bwd_kernel(const at::Tensor& dout, const scalar_t* dlse, const at::Tensor& q,
                          const at::Tensor& k, const at::Tensor& v, const scalar_t* key_bias,
                          int64_t bias_stride, const scalar_t* grad_bias, int64_t grad_bias_stride,
                          const at::Tensor& out, const at::Tensor& lse, at::Tensor& dq,
                          at::Tensor& dk_h, at::Tensor& dv_h, at::Tensor& dbias_h, bool causal,
                          scalar_t scale) {
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Lk = k.size(2), group = Hq / Hkv, offset = Lk - Lq;
  const auto opts = q.options();
  const scalar_t* lse_ptr = lse.data_ptr<scalar_t>();  // contiguous [B, Hq, Lq]

  cpu::parallel_tasks(B * Hq, [&](int64_t begin, int64_t end) {
    TileBuffer<scalar_t> p_buf(kBlockQ * kBlockK), ds_buf(kBlockQ * kBlockK);
    TileBuffer<scalar_t> pg_buf(grad_bias ? kBlockQ * kBlockK : 0);  // grad_bias's probabilities
    scalar_t* pg_ptr = pg_buf.data.data();
    std::vector<scalar_t> delta(Lq);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hq, h = task % Hq;
      const at::Tensor qbh = q[b][h], dobh = dout[b][h];
      const at::Tensor kbh = k[b][h / group], vbh = v[b][h / group];
      at::Tensor dqbh = dq[b][h], dkbh = dk_h[b][h], dvbh = dv_h[b][h];
      scalar_t* dbias = dbias_h[b][h].data_ptr<scalar_t>();
      const scalar_t* bias_b = key_bias ? key_bias + b * bias_stride : nullptr;
      const scalar_t* gbias_b = grad_bias ? grad_bias + b * grad_bias_stride : nullptr;
      const scalar_t* lse_bh = lse_ptr + task * Lq;

      // delta_i = sum_d dO_i O_i, less the lse gradient (d lse_i / d s_ij = P_ij).
      at::Tensor delta_t = (dobh * out[b][h]).sum(-1);
      const scalar_t* delta_src = delta_t.data_ptr<scalar_t>();
      for (int64_t i = 0; i < Lq; ++i) delta[i] = delta_src[i] - (dlse ? dlse[task * Lq + i] : 0);

      for (int64_t j0 = 0; j0 < Lk; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, Lk - j0);
        const at::Tensor kj = kbh.narrow(0, j0, nk), vj = vbh.narrow(0, j0, nk);
        at::Tensor dkj = dkbh.narrow(0, j0, nk), dvj = dvbh.narrow(0, j0, nk);
        // The first query row that can see key j0.
        const int64_t i_start = causal ? std::max<int64_t>(0, j0 - offset) : 0;
        for (int64_t i0 = i_start; i0 < Lq; i0 += kBlockQ) {
          const int64_t nq = std::min(kBlockQ, Lq - i0);
          const at::Tensor qi = qbh.narrow(0, i0, nq), doi = dobh.narrow(0, i0, nq);
          at::Tensor p = p_buf.view(nq, nk, opts);
          at::mm_out(p, qi, kj.t());
          scalar_t* p_ptr = p.data_ptr<scalar_t>();
          for (int64_t r = 0; r < nq; ++r) {
            scalar_t* row = p_ptr + r * nk;
            scalar_t* g_row = pg_ptr + r * nk;
            const scalar_t lse_r = lse_bh[i0 + r];
            if (lse_r == kNegInf) {  // fully masked row: P = 0, no gradient
              std::fill(row, row + nk, scalar_t(0));
              if (gbias_b) std::fill(g_row, g_row + nk, scalar_t(0));
              continue;
            }
            const int64_t n_valid = visible_keys(causal, i0 + r, offset, j0, nk);
            if (gbias_b) {  // from the raw products, before prob_row overwrites them
              std::copy(row, row + nk, g_row);
              cpu::prob_row(g_row, n_valid, nk, scale, gbias_b + j0, lse_r);
            }
            cpu::prob_row(row, n_valid, nk, scale, bias_b ? bias_b + j0 : nullptr, lse_r);
          }
          dvj.addmm_(p.t(), doi);  // dV += P^T dO
          at::Tensor ds = ds_buf.view(nq, nk, opts);
          at::mm_out(ds, doi, vj.t());  // dP = dO V^T
          scalar_t* ds_ptr = ds.data_ptr<scalar_t>();
          for (int64_t r = 0; r < nq; ++r) {
            cpu::softmax_bwd_row(p_ptr + r * nk, ds_ptr + r * nk, nk, delta[i0 + r], dbias + j0,
                                 gbias_b ? pg_ptr + r * nk : nullptr);
          }
          dqbh.narrow(0, i0, nq).addmm_(ds, kj, 1, scale);  // dQ += scale dS K
          dkj.addmm_(ds.t(), qi, 1, scale);                  // dK += scale dS^T Q
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                     const at::Tensor& v,
                                                     const c10::optional<at::Tensor>& key_bias,
                                                     bool causal, double scale) {
  const BelowAutograd below_autograd;
  const AttentionShape s = check_attention_inputs("atp_attention", q, k, v, key_bias);
  const at::ScalarType ct = compute_dtype(q.scalar_type());
  const at::Tensor qc = as_compute(q, ct), kc = as_compute(k, ct), vc = as_compute(v, ct);
  const at::Tensor kb = key_bias ? as_compute(*key_bias, ct) : at::Tensor();
  at::Tensor out = at::empty({s.B, s.Hq, s.Lq, s.D}, q.options().dtype(ct));
  at::Tensor lse = at::empty({s.B, s.Hq, s.Lq}, q.options().dtype(ct));
  AT_DISPATCH_FLOATING_TYPES(ct, "atp_attention_fwd_cpu", [&] {
    attention_fwd_kernel<scalar_t>(qc, kc, vc, kb.defined() ? kb.data_ptr<scalar_t>() : nullptr,
                                   kb.defined() ? kb.stride(0) : 0, out, lse, causal,
                                   static_cast<scalar_t>(scale));
  });
  return {out.to(q.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const c10::optional<at::Tensor>& grad_lse, const at::Tensor& q,
    const at::Tensor& k, const at::Tensor& v, const c10::optional<at::Tensor>& key_bias,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale, bool /*deterministic*/,
    const c10::optional<at::Tensor>& grad_bias) {
  const BelowAutograd below_autograd;
  // The CPU backward is always deterministic (see attention_bwd_kernel).
  const char* op = "atp_attention backward";
  const AttentionShape s = check_attention_inputs(op, q, k, v, key_bias);
  if (grad_bias) check_key_bias(op, "grad_bias", *grad_bias, q, s);
  check_same_shape(op, "grad_out", grad_out, q.sizes(), "(B, Hq, Lq, D)", q);
  check_same_shape(op, "out", out, q.sizes(), "(B, Hq, Lq, D)", q);
  check_lse(op, "lse", lse, q, s);
  if (grad_lse) check_lse(op, "grad_lse", *grad_lse, q, s);
  const at::ScalarType ct = compute_dtype(q.scalar_type());
  const at::Tensor qc = as_compute(q, ct), kc = as_compute(k, ct), vc = as_compute(v, ct);
  const at::Tensor doc = as_compute(grad_out, ct), oc = as_compute(out, ct);
  const at::Tensor lsec = lse.contiguous();
  const at::Tensor dlse = grad_lse ? grad_lse->contiguous() : at::Tensor();
  const at::Tensor kb = key_bias ? as_compute(*key_bias, ct) : at::Tensor();
  const at::Tensor gb = grad_bias ? as_compute(*grad_bias, ct) : at::Tensor();
  const auto opts = q.options().dtype(ct);
  at::Tensor dq = at::zeros({s.B, s.Hq, s.Lq, s.D}, opts);
  at::Tensor dk_h = at::zeros({s.B, s.Hq, s.Lk, s.D}, opts);
  at::Tensor dv_h = at::zeros({s.B, s.Hq, s.Lk, s.D}, opts);
  at::Tensor dbias_h = at::zeros({s.B, s.Hq, s.Lk}, opts);
  AT_DISPATCH_FLOATING_TYPES(ct, "atp_attention_bwd_cpu", [&] {
    attention_bwd_kernel<scalar_t>(doc, dlse.defined() ? dlse.data_ptr<scalar_t>() : nullptr, qc, kc,
                                   vc, kb.defined() ? kb.data_ptr<scalar_t>() : nullptr,
                                   kb.defined() ? kb.stride(0) : 0,
                                   gb.defined() ? gb.data_ptr<scalar_t>() : nullptr,
                                   gb.defined() ? gb.stride(0) : 0, oc, lsec, dq, dk_h, dv_h, dbias_h,
                                   causal, static_cast<scalar_t>(scale));
  });
  const int64_t group = s.Hq / s.Hkv;
  at::Tensor dk = group == 1 ? dk_h : dk_h.view({s.B, s.Hkv, group, s.Lk, s.D}).sum(2);
  at::Tensor dv = group == 1 ? dv_h : dv_h.view({s.B, s.Hkv, group, s.Lk, s.D}).sum(2);
  at::Tensor dbias = dbias_h.sum(1);
  if (key_bias) dbias = dbias.to(key_bias->scalar_type());
  return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()), dbias};
}

}  // namespace atp
