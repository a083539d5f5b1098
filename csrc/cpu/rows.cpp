#include "rows.h"

// The float clamps and selects below are only if-converted into vector blends when the compiler
// may assume floating-point comparisons do not trap; nothing in this file enables FP traps.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif

#include <cmath>
#include <cstring>
#include <limits>

// The float row kernels are compiled for AVX-512, AVX2 and baseline x86-64 and dispatched by the
// loader (GCC function multi-versioning), so one wheel runs everywhere and uses wide vectors
// where the CPU has them.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define ATP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ATP_CPU_CLONES
#endif
#define ATP_INLINE inline __attribute__((always_inline))

namespace atp::cpu {
namespace {

constexpr int kLanes = 16;  // independent partial reductions, so the loops vectorise without -ffast-math

// exp(x) for float in a form the compiler vectorises: x = n ln2 + r with |r| <= ln2 / 2, a
// degree-7 polynomial for exp(r) (Cephes coefficients, ~1 ulp), then 2^n built in the exponent
// bits. Results below FLT_MIN flush to exactly 0, so exp(-inf) = 0 and masked keys drop out exactly.
ATP_INLINE float exp_f32(float x) {
  const float hi = 88.3762626647949f, lo = -87.3365478515625f;
  const bool underflow = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  // n = round(x / ln2) by adding 1.5 * 2^23, which leaves n in t's low mantissa bits (exact for
  // |n| < 2^22); no call to floor, so the loop vectorises on every instruction set.
  const float shifter = 12582912.0f;
  const float t = x * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t t_bits;
  std::memcpy(&t_bits, &t, sizeof(t_bits));
  const int32_t bits = (t_bits - 0x4B400000 + 127) << 23;  // (n + 127) << 23: the float 2^n
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(two_n));
  return underflow ? 0.0f : p * two_n;
}

ATP_INLINE float fast_exp(float x) { return exp_f32(x); }
ATP_INLINE double fast_exp(double x) { return std::exp(x); }

// row[c] <- exp(row[c] - shift) for c < n; returns their sum.
template <typename T>
ATP_INLINE T exp_shift_sum(T* row, int64_t n, T shift) {
  T part[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const T p = fast_exp(row[c + u] - shift);
      row[c + u] = p;
      part[u] += p;
    }
  }
  T sum = 0;
  for (; c < n; ++c) {
    const T p = fast_exp(row[c] - shift);
    row[c] = p;
    sum += p;
  }
  for (int u = 0; u < kLanes; ++u) sum += part[u];
  return sum;
}

// row[c] <- scale * row[c] + bias[c] for c < n; returns the max.
template <typename T, bool kBias>
ATP_INLINE T scale_bias_max(T* row, int64_t n, T scale, const T* bias) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  T part[kLanes];
  for (int u = 0; u < kLanes; ++u) part[u] = kNegInf;
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes) {
    for (int u = 0; u < kLanes; ++u) {
      const T s = kBias ? row[c + u] * scale + bias[c + u] : row[c + u] * scale;
      row[c + u] = s;
      part[u] = s > part[u] ? s : part[u];
    }
  }
  T mx = kNegInf;
  for (; c < n; ++c) {
    const T s = kBias ? row[c] * scale + bias[c] : row[c] * scale;
    row[c] = s;
    mx = s > mx ? s : mx;
  }
  for (int u = 0; u < kLanes; ++u) mx = part[u] > mx ? part[u] : mx;
  return mx;
}

template <typename T>
ATP_INLINE T softmax_tile_row_impl(T* row, int64_t n_valid, int64_t n, T scale, const T* bias, T& m,
                                   T& l) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  const T mx = bias ? scale_bias_max<T, true>(row, n_valid, scale, bias)
                    : scale_bias_max<T, false>(row, n_valid, scale, bias);
  for (int64_t c = n_valid; c < n; ++c) row[c] = 0;
  const T m_new = mx > m ? mx : m;
  if (m_new == kNegInf) {  // nothing visible to this row yet: p = 0, state unchanged
    for (int64_t c = 0; c < n_valid; ++c) row[c] = 0;
    return T(1);
  }
  const T alpha = m == kNegInf ? T(0) : fast_exp(m - m_new);
  const T sum = exp_shift_sum(row, n_valid, m_new);
  l = l * alpha + sum;
  m = m_new;
  return alpha;
}

template <typename T>
ATP_INLINE void prob_row_impl(T* row, int64_t n_valid, int64_t n, T scale, const T* bias, T lse) {
  if (bias) {
    for (int64_t c = 0; c < n_valid; ++c) row[c] = fast_exp(row[c] * scale + bias[c] - lse);
  } else {
    for (int64_t c = 0; c < n_valid; ++c) row[c] = fast_exp(row[c] * scale - lse);
  }
  for (int64_t c = n_valid; c < n; ++c) row[c] = 0;
}

template <typename T>
ATP_INLINE void softmax_bwd_row_impl(const T* p, T* dp, int64_t n, T delta, T* d_bias, const T* p_bias) {
  if (p_bias) {
    for (int64_t c = 0; c < n; ++c) {
      const T g = dp[c] - delta;
      dp[c] = p[c] * g;
      d_bias[c] += p_bias[c] * g;
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) {
    const T ds = p[c] * (dp[c] - delta);
    dp[c] = ds;
    d_bias[c] += ds;
  }
}

template <typename T>
ATP_INLINE T dot(const T* a, const T* b, int64_t D) {
  T part[kLanes] = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int u = 0; u < kLanes; ++u) part[u] += a[d + u] * b[d + u];
  }
  T sum = 0;
  for (; d < D; ++d) sum += a[d] * b[d];
  for (int u = 0; u < kLanes; ++u) sum += part[u];
  return sum;
}

template <typename T>
ATP_INLINE void dot_keys_impl(const T* q, const T* k, int64_t stride, int64_t n, int64_t D, T* s) {
  for (int64_t c = 0; c < n; ++c) s[c] = dot(q, k + c * stride, D);
}

template <typename T>
ATP_INLINE void add_weighted_values_impl(T* acc, const T* p, const T* v, int64_t stride, int64_t n,
                                         int64_t D) {
  for (int64_t c = 0; c < n; ++c) {
    const T w = p[c];
    if (w == T(0)) continue;
    const T* vc = v + c * stride;
    for (int64_t d = 0; d < D; ++d) acc[d] += w * vc[d];
  }
}

template <typename T>
ATP_INLINE bool all_masked_impl(const T* bias, int64_t n) {
  constexpr T kNegInf = -std::numeric_limits<T>::infinity();
  for (int64_t c = 0; c < n; ++c) {
    if (bias[c] != kNegInf) return false;
  }
  return true;
}

}  // namespace

ATP_CPU_CLONES float softmax_tile_row(float* row, int64_t n_valid, int64_t n, float scale,
                                      const float* bias, float& m, float& l) {
  return softmax_tile_row_impl(row, n_valid, n, scale, bias, m, l);
}
double softmax_tile_row(double* row, int64_t n_valid, int64_t n, double scale, const double* bias,
                        double& m, double& l) {
  return softmax_tile_row_impl(row, n_valid, n, scale, bias, m, l);
}

ATP_CPU_CLONES void prob_row(float* row, int64_t n_valid, int64_t n, float scale, const float* bias,
                             float lse) {
  prob_row_impl(row, n_valid, n, scale, bias, lse);
}
void prob_row(double* row, int64_t n_valid, int64_t n, double scale, const double* bias, double lse) {
  prob_row_impl(row, n_valid, n, scale, bias, lse);
}

ATP_CPU_CLONES void softmax_bwd_row(const float* p, float* dp, int64_t n, float delta, float* d_bias,
                                     const float* p_bias) {
  softmax_bwd_row_impl(p, dp, n, delta, d_bias, p_bias);
}
void softmax_bwd_row(const double* p, double* dp, int64_t n, double delta, double* d_bias,
                     const double* p_bias) {
  softmax_bwd_row_impl(p, dp, n, delta, d_bias, p_bias);
}

ATP_CPU_CLONES void dot_keys(const float* q, const float* k, int64_t stride, int64_t n, int64_t D,
                             float* s) {
  dot_keys_impl(q, k, stride, n, D, s);
}
void dot_keys(const double* q, const double* k, int64_t stride, int64_t n, int64_t D, double* s) {
  dot_keys_impl(q, k, stride, n, D, s);
}

ATP_CPU_CLONES void add_weighted_values(float* acc, const float* p, const float* v, int64_t stride,
                                        int64_t n, int64_t D) {
  add_weighted_values_impl(acc, p, v, stride, n, D);
}
void add_weighted_values(double* acc, const double* p, const double* v, int64_t stride, int64_t n,
                         int64_t D) {
  add_weighted_values_impl(acc, p, v, stride, n, D);
}

bool all_masked(const float* bias, int64_t n) { return all_masked_impl(bias, n); }
bool all_masked(const double* bias, int64_t n) { return all_masked_impl(bias, n); }

}  // namespace atp::cpu
