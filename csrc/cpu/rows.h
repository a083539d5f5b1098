// Vectorised row kernels of the CPU attention: the softmax work between the tile GEMMs.
// Defined in rows.cpp (no torch headers), where the float versions are compiled for several
// instruction sets and picked at load time.
#pragma once
#include <cstdint>

namespace atp::cpu {

// Online-softmax step of one query row against one key tile (FlashAttention-2, forward).
// In: row[0, n) raw q.k products. Columns >= n_valid are masked (causal). On return row holds
// p = exp(scale * s + bias - m_new) (0 where masked) and (m, l) the running max and sum.
// Returns alpha = exp(m_old - m_new), the factor the row's output accumulator must be scaled by.
float softmax_tile_row(float* row, int64_t n_valid, int64_t n, float scale, const float* bias,
                       float& m, float& l);
double softmax_tile_row(double* row, int64_t n_valid, int64_t n, double scale, const double* bias,
                        double& m, double& l);

// Probabilities of one row from its final lse: row[c] = exp(scale * row[c] + bias[c] - lse) for
// c < n_valid, 0 beyond. lse must be finite. bias may be null.
void prob_row(float* row, int64_t n_valid, int64_t n, float scale, const float* bias, float lse);
void prob_row(double* row, int64_t n_valid, int64_t n, double scale, const double* bias, double lse);

// Softmax backward of one row: dp[c] = p[c] * (dp[c] - delta), and d_bias[c] += that dS, or,
// when p_bias is given, d_bias[c] += p_bias[c] * (dp[c] - delta) (the column sums of another
// bias's probabilities: attention_bwd's grad_bias). p_bias may be null.
void softmax_bwd_row(const float* p, float* dp, int64_t n, float delta, float* d_bias,
                     const float* p_bias);
void softmax_bwd_row(const double* p, double* dp, int64_t n, double delta, double* d_bias,
                     const double* p_bias);

// The two products of a short query tile (a few rows: decoding), for which a BLAS call costs more
// than its arithmetic. Rows of k and v are `stride` elements apart, each D contiguous elements.
// dot_keys: s[c] = q . k[c] for c < n.
void dot_keys(const float* q, const float* k, int64_t stride, int64_t n, int64_t D, float* s);
void dot_keys(const double* q, const double* k, int64_t stride, int64_t n, int64_t D, double* s);
// add_weighted_values: acc[0, D) += sum_c p[c] v[c] over c < n, skipping p[c] == 0.
void add_weighted_values(float* acc, const float* p, const float* v, int64_t stride, int64_t n,
                         int64_t D);
void add_weighted_values(double* acc, const double* p, const double* v, int64_t stride, int64_t n,
                         int64_t D);

// True if every bias[c], c < n, is -inf: the keys are masked for every row and can be skipped.
bool all_masked(const float* bias, int64_t n);
bool all_masked(const double* bias, int64_t n);

}  // namespace atp::cpu
