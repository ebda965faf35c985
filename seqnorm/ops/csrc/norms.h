// The normalizations of one step's (N, F) values, forward and backward: group norm (layer norm
// is one group) row by row, batch norm per feature over the step's valid rows, with running
// statistics where a step has fewer than two valid samples or in eval mode.
//
// Every norm keeps the statistics it used, per step: group norm rstd (N, G), batch norm mean and
// rstd (2, F). In training, batch norm also writes each step's batch mean and biased variance to
// batch_stats (2, steps, F), from which Python moves the running statistics.
#pragma once

#include "common.h"

#include <cmath>
#include <type_traits>

namespace seqnorm {

// Per-step storage of a norm's statistics over `steps` steps of N rows of F features.
struct NormBuffers {
  Tensor stats, batch_stats;
  int64_t stride;  // a step's share of stats
  NormBuffers(const NormConfig& s, int64_t steps, int64_t N, int64_t F, const Tensor& like) {
    const auto o = like.options();
    stride = s.kind == NormKind::group ? N * s.groups : s.batch() ? 2 * F : 0;
    stats = at::empty({steps * stride}, o);
    // zero where a step keeps the running statistics (fewer than two valid samples); none in
    // eval mode, which moves nothing
    batch_stats = at::zeros({2, s.batch() && s.training ? steps : 0, F}, o);
  }
};

// The features [lo, hi) of batch_stats below, in blocks of at most 64 (sums on the stack).
template <typename scalar_t>
void batch_stats_range(const NormConfig& s, const scalar_t* x, int64_t N, int64_t F, int64_t lo,
                       int64_t hi, const bool* valid, int64_t count, const scalar_t* run_mean,
                       const scalar_t* run_var, scalar_t* mean, scalar_t* rstd,
                       scalar_t* batch_mean, scalar_t* batch_var) {
  // float32 values: sum and sum of squares in one pass, in double, where the difference
  // E[x^2] - mean^2 keeps about 29 bits more than the values have (a squared float32 is exact in
  // double); double values: two passes (mean, then squared deviations).
  constexpr bool one_pass = std::is_same_v<scalar_t, float>;
  if (!s.uses_batch(count)) {
    std::copy(run_mean + lo, run_mean + hi, mean + lo);
    const scalar_t one = 1, eps = static_cast<scalar_t>(s.eps);  // as torch.rsqrt(var + eps)
SEQNORM_SIMD
    for (int64_t f = lo; f < hi; ++f) rstd[f] = one / std::sqrt(run_var[f] + eps);
    return;
  }
  constexpr int64_t block = 64;
  for (int64_t b0 = lo; b0 < hi; b0 += block) {
    const int64_t width = std::min(block, hi - b0);
    double sum[block] = {}, squares[block] = {};
    for (int64_t n = 0; n < N; ++n) {
      if (valid && !valid[n]) continue;
      const scalar_t* p = x + n * F + b0;
SEQNORM_SIMD
      for (int64_t f = 0; f < width; ++f) {
        sum[f] += p[f];
        if constexpr (one_pass) squares[f] += static_cast<double>(p[f]) * p[f];
      }
    }
    for (int64_t f = 0; f < width; ++f) sum[f] /= count;
    for (int64_t n = 0; !one_pass && n < N; ++n) {
      if (valid && !valid[n]) continue;
      const scalar_t* p = x + n * F + b0;
      for (int64_t f = 0; f < width; ++f) squares[f] += (p[f] - sum[f]) * (p[f] - sum[f]);
    }
    for (int64_t f = 0; f < width; ++f) {
      squares[f] = one_pass ? std::max(squares[f] / count - sum[f] * sum[f], 0.0)
                            : squares[f] / count;
      batch_mean[b0 + f] = mean[b0 + f] = static_cast<scalar_t>(sum[f]);
      batch_var[b0 + f] = static_cast<scalar_t>(squares[f]);
      rstd[b0 + f] = static_cast<scalar_t>(1.0 / std::sqrt(squares[f] + s.eps));
    }
  }
}

// Batch statistics of a step, per feature over the valid samples, or the running ones when
// there are fewer than two valid samples or in eval mode. Writes mean and rstd (F); when the
// batch statistics are used, also their mean and biased variance to batch_mean, batch_var.
template <typename scalar_t>
void batch_stats(const NormConfig& s, const scalar_t* x, int64_t N, int64_t F, const bool* valid,
                 int64_t count, const scalar_t* run_mean, const scalar_t* run_var,
                 scalar_t* mean, scalar_t* rstd, scalar_t* batch_mean, scalar_t* batch_var) {
  if (!s.uses_batch(count))
    return batch_stats_range(s, x, N, F, 0, F, valid, count, run_mean, run_var, mean, rstd,
                             batch_mean, batch_var);
  for_features(N, F, [&](int64_t lo, int64_t hi) {
    batch_stats_range(s, x, N, F, lo, hi, valid, count, run_mean, run_var, mean, rstd,
                      batch_mean, batch_var);
  });
}

// Normalizes one group of values with statistics in double precision, as the Python reference
// does, for values whose squares overflow float32. (NaN or infinite values stay NaN.)
template <typename scalar_t>
void normalize_group_in_double(const scalar_t* p, scalar_t* q, int64_t width, double eps,
                               scalar_t* rstd) {
  double sum = 0, squares = 0;
  for (int64_t k = 0; k < width; ++k) sum += p[k];
  const double m = sum / width;
  for (int64_t k = 0; k < width; ++k) squares += (p[k] - m) * (p[k] - m);
  const double r = 1.0 / std::sqrt(squares / width + eps);
  for (int64_t k = 0; k < width; ++k) q[k] = static_cast<scalar_t>((p[k] - m) * r);
  *rstd = static_cast<scalar_t>(r);
}

// Normalizes one row x (F) into xhat (may alias x). Group: statistics per group of F/G
// contiguous features, written to rstd (G); batch: the step's mean_f and rstd_f (F).
template <typename scalar_t>
void normalize_row(const NormConfig& s, const scalar_t* x, scalar_t* xhat, int64_t F,
                   scalar_t* rstd, const scalar_t* mean_f, const scalar_t* rstd_f) {
  if (s.batch()) {
SEQNORM_SIMD
    for (int64_t f = 0; f < F; ++f) xhat[f] = (x[f] - mean_f[f]) * rstd_f[f];
    return;
  }
  const int64_t G = s.groups, width = F / G;
  for (int64_t g = 0; g < G; ++g) {
    const scalar_t* p = x + g * width;
    scalar_t* q = xhat + g * width;
    scalar_t sum = 0, squares = 0;  // the SIMD lanes are separate partial sums, as in ATen's norms
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < width; ++k) sum += p[k];
    const scalar_t m = sum / width;
#pragma omp simd reduction(+ : squares)
    for (int64_t k = 0; k < width; ++k) squares += (p[k] - m) * (p[k] - m);
    if (!std::isfinite(static_cast<double>(squares))) {  // float32 overflowed (|x| ~ 1e19 and
      normalize_group_in_double(p, q, width, s.eps, rstd + g);  // up): the reference's result
      continue;
    }
    const scalar_t r =
        static_cast<scalar_t>(1.0 / std::sqrt(static_cast<double>(squares) / width + s.eps));
SEQNORM_SIMD
    for (int64_t k = 0; k < width; ++k) q[k] = (p[k] - m) * r;
    rstd[g] = r;
  }
}

// The backward of a group normalization of one row: d holds dL/dxhat on entry, dL/dx on exit.
template <typename scalar_t>
void group_norm_backward_row(int64_t G, scalar_t* d, const scalar_t* xhat, int64_t F,
                             const scalar_t* rstd) {
  const int64_t width = F / G;
  for (int64_t g = 0; g < G; ++g) {
    scalar_t* p = d + g * width;
    const scalar_t* xh = xhat + g * width;
    scalar_t m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
    for (int64_t k = 0; k < width; ++k) {
      m1 += p[k];
      m2 += p[k] * xh[k];
    }
    const scalar_t a = static_cast<scalar_t>(m1 / width), b = static_cast<scalar_t>(m2 / width);
    const scalar_t r = rstd[g];
SEQNORM_SIMD
    for (int64_t k = 0; k < width; ++k) p[k] = r * (p[k] - a - xh[k] * b);
  }
}

// The features [lo, hi) of batch_norm_backward below (every argument spans all F features), in
// blocks of at most 64 (sums on the stack). dgamma and dbeta take only these features' sums.
template <typename scalar_t>
void batch_norm_backward_range(const scalar_t* dy, scalar_t* dx, const scalar_t* xhat,
                               const scalar_t* gamma, double* dgamma, double* dbeta, int64_t N,
                               int64_t F, int64_t lo, int64_t hi, const bool* valid,
                               const scalar_t* rstd, bool use_batch, int64_t count) {
  const bool sums = use_batch || dgamma || dbeta;
  constexpr int64_t block = 64;
  for (int64_t b0 = lo; b0 < hi; b0 += block) {
    const int64_t width = std::min(block, hi - b0);
    double m1[block] = {}, m2[block] = {};
    for (int64_t n = 0; sums && n < N; ++n) {  // every row's output used the statistics
      const scalar_t* p = dy + n * F + b0;
      const scalar_t* xh = xhat + n * F + b0;
SEQNORM_SIMD
      for (int64_t f = 0; f < width; ++f) {
        m1[f] += p[f];
        m2[f] += p[f] * xh[f];
      }
    }
    for (int64_t f = 0; dgamma && f < width; ++f) dgamma[b0 + f] += m2[f];
    for (int64_t f = 0; dbeta && f < width; ++f) dbeta[b0 + f] += m1[f];
    // dx = scale * (dy - mean(dy) - x_hat * mean(dy * x_hat)) = scale * dy - a - x_hat * b
    scalar_t scale[block], a[block] = {}, b[block] = {};
    for (int64_t f = 0; f < width; ++f) {
      const double sc = static_cast<double>(rstd[b0 + f]) * (gamma ? gamma[b0 + f] : 1);
      scale[f] = static_cast<scalar_t>(sc);
      if (!use_batch) continue;
      a[f] = static_cast<scalar_t>(sc * m1[f] / count);
      b[f] = static_cast<scalar_t>(sc * m2[f] / count);
    }
    for (int64_t n = 0; n < N; ++n) {
      const scalar_t* p = dy + n * F + b0;
      scalar_t* q = dx + n * F + b0;
      const scalar_t* xh = xhat + n * F + b0;
      if (!use_batch || (valid && !valid[n])) {
SEQNORM_SIMD
        for (int64_t f = 0; f < width; ++f) q[f] = scale[f] * p[f];
        continue;
      }
SEQNORM_SIMD
      for (int64_t f = 0; f < width; ++f) q[f] = scale[f] * p[f] - a[f] - xh[f] * b[f];
    }
  }
}

// The backward of y = gamma * batch_norm(x) + beta over a step, all rows at once: dy (N, F) is
// dL/dy, dx receives dL/dx (it may be dy itself). Adds the sums over the rows of dy * x_hat to
// dgamma and of dy to dbeta (F each; null when not wanted): each feature is summed by one thread,
// so the caller must not run two such calls at once on the same sums. gamma null means a gain of
// 1. Rows of samples that are not valid were normalized but took no part in the statistics:
// their derivative is gamma * rstd times theirs on entry (in the recurrence they are zero on
// entry and stay zero). With running statistics (use_batch false) they are constants.
template <typename scalar_t>
void batch_norm_backward(const scalar_t* dy, scalar_t* dx, const scalar_t* xhat,
                         const scalar_t* gamma, double* dgamma, double* dbeta, int64_t N,
                         int64_t F, const bool* valid, const scalar_t* rstd, bool use_batch,
                         int64_t count) {
  for_features(N, F, [&](int64_t lo, int64_t hi) {
    batch_norm_backward_range(dy, dx, xhat, gamma, dgamma, dbeta, N, F, lo, hi, valid, rstd,
                              use_batch, count);
  });
}

// Batch norm's running mean and variance of every step, (steps, F) each, as the kernels read
// them (null for the other norms).
template <typename scalar_t>
struct RunningRows {
  const scalar_t* mean;
  const scalar_t* var;
  RunningRows(const OptTensor& mean_, const OptTensor& var_)
      : mean(ptr_or_null<scalar_t>(mean_)), var(ptr_or_null<scalar_t>(var_)) {}
};

// Checks what a kernel was given as a site's running statistics (batch norm only).
inline void check_running(const NormConfig& s, const OptTensor& mean, const OptTensor& var,
                          int64_t steps, int64_t F, const char* site) {
  if (!s.batch()) return;
  TORCH_CHECK(present(mean) && present(var), "batch norm needs the running mean and variance of ",
              site);
  for (const Tensor& t : {*mean, *var})
    TORCH_CHECK(t.sizes() == at::IntArrayRef({steps, F}) && t.is_contiguous(), "the running ",
                "statistics of ", site, " must be contiguous (", steps, ", ", F, "), got ",
                t.sizes());
}

// Batch norm in eval mode: the running statistics of every step written to buf ahead of the
// steps, in one parallel pass over them, for StepNorm to read (a loop whose threads take their
// rows through the steps apart could not compute them step by step). Every caller of StepNorm
// calls it first in eval mode.
template <typename scalar_t>
void running_stats_ahead(const NormConfig& s, NormBuffers& buf, int64_t steps, int64_t F,
                         const RunningRows<scalar_t>& run) {
  TORCH_CHECK(s.batch() && !s.training, "running_stats_ahead: batch norm in eval mode only");
  scalar_t* stats = buf.stats.data_ptr<scalar_t>();
  at::parallel_for(0, steps, std::max<int64_t>(1, 4096 / std::max<int64_t>(F, 1)),
                   [&](int64_t lo, int64_t hi) {
                     for (int64_t t = lo; t < hi; ++t) {
                       scalar_t* mean = stats + t * buf.stride;
                       batch_stats_range<scalar_t>(s, nullptr, 0, F, 0, F, nullptr, 0,
                                                   run.mean + t * F, run.var + t * F, mean,
                                                   mean + F, nullptr, nullptr);
                     }
                   });
}

// A norm's view of one step: its statistics (batch statistics in training are computed over all
// rows here, before the rows run; eval mode's running ones were written by running_stats_ahead;
// group statistics come by each row as it is normalized).
template <typename scalar_t>
struct StepNorm {
  const NormConfig& s;
  int64_t F;
  scalar_t* stats;  // group: rstd (N, G); batch: mean (F) and rstd (F)
  // values (N, F) of step t of `steps`.
  StepNorm(const NormConfig& s_, NormBuffers& buf, int64_t t, int64_t steps, int64_t N,
           int64_t F_, const scalar_t* values, const bool* valid, int64_t count,
           const RunningRows<scalar_t>& run)
      : s(s_), F(F_), stats(buf.stats.data_ptr<scalar_t>() + t * buf.stride) {
    if (!s.batch() || !s.training) return;
    scalar_t* batch = buf.batch_stats.data_ptr<scalar_t>();
    batch_stats(s, values, N, F, valid, count, run.mean + t * F, run.var + t * F, stats,
                stats + F, batch + t * F, batch + (steps + t) * F);
  }
  void row(int64_t n, const scalar_t* x, scalar_t* xhat) const {
    normalize_row(s, x, xhat, F, stats + n * s.groups, stats, stats + F);
  }
};

}  // namespace seqnorm
