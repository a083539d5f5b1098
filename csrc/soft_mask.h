// Soft and hard threshold masks (paper Eq. 9-11, DESIGN §3.4): the per-token math, shared by the
// CPU loop and the CUDA kernel. Plain C++: no torch types, usable from .cu files.
#pragma once
#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define ATP_HD __host__ __device__ __forceinline__
#else
#define ATP_HD inline
#endif

namespace atp {

// Rows are contiguous along N; strides are in elements between batch rows. A batch stride of
// 0 broadcasts one row (s_spatial given as (N,)).
struct SoftMaskParams {
  const void* s_red;      // [B, N]
  const void* s_spatial;  // [B, N]
  const void* theta_r;    // [B]
  const void* theta_s;    // [B]
  const void* prev_bias;  // [B, N] log-space bias before this layer, or nullptr (= 0)
  const void* grad;       // [B, N] upstream gradient (backward only)
  void* out;              // forward: new bias [B, N]; backward: d s_red [B, N]
  void* d_s_spatial;      // backward: [B, N]
  void* d_theta_r;        // backward: [B]
  void* d_theta_s;        // backward: [B]
  int64_t s_red_stride, s_spatial_stride, prev_stride, grad_stride;
  int64_t B, N;
  double temperature;
  bool hard;
};

// log(sigmoid(x)) without overflow for either sign.
template <typename T>
ATP_HD T log_sigmoid(T x) {
  using std::exp;
  using std::fabs;
  using std::log1p;
  return (x < T(0) ? x : T(0)) - log1p(exp(-fabs(x)));
}

// sigmoid(-x) = d log_sigmoid(x) / dx.
template <typename T>
ATP_HD T sigmoid_neg(T x) {
  using std::exp;
  return T(1) / (T(1) + exp(x));
}

// Eq. 9-11 in log space: log max(sigmoid(a), sigmoid(b)) = max(log_sigmoid(a), log_sigmoid(b)),
// with a = (s_red - theta_r) T and b = (s_spatial - theta_s) T. Ties go to the redundant branch,
// in the forward and in soft_mask_grad alike.
template <typename T>
ATP_HD T soft_mask_log(T s_red, T s_spatial, T theta_r, T theta_s, T temperature) {
  const T lr = log_sigmoid((s_red - theta_r) * temperature);
  const T ls = log_sigmoid((s_spatial - theta_s) * temperature);
  return lr >= ls ? lr : ls;
}

// Hard mask (inference): keep the token if either score clears its threshold.
template <typename T>
ATP_HD bool hard_mask_keep(T s_red, T s_spatial, T theta_r, T theta_s) {
  return s_red > theta_r || s_spatial > theta_s;
}

// New bias of one token: prev + log M (soft) or prev / -inf (hard). A token removed before
// (prev = -inf) stays removed in both.
template <typename T>
ATP_HD T soft_mask_bias(T s_red, T s_spatial, T theta_r, T theta_s, T temperature, T prev, bool hard) {
  if (hard) return hard_mask_keep(s_red, s_spatial, theta_r, theta_s) ? prev : T(-INFINITY);
  return prev + soft_mask_log(s_red, s_spatial, theta_r, theta_s, temperature);
}

// Gradient of one token's soft bias w.r.t. its two scores; the thresholds get the negatives.
template <typename T>
ATP_HD void soft_mask_grad(T g, T s_red, T s_spatial, T theta_r, T theta_s, T temperature,
                           T& d_s_red, T& d_s_spatial) {
  const T a = (s_red - theta_r) * temperature;
  const T b = (s_spatial - theta_s) * temperature;
  if (log_sigmoid(a) >= log_sigmoid(b)) {
    d_s_red = g * temperature * sigmoid_neg(a);
    d_s_spatial = T(0);
  } else {
    d_s_red = T(0);
    d_s_spatial = g * temperature * sigmoid_neg(b);
  }
}

}  // namespace atp
