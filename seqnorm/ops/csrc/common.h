// The kernels' shared vocabulary: tensor aliases, the norm configuration (parsed once from the
// string Python passes), masks and valid counts, buffer slots of the steps, per-thread sums, and
// how rows and features are split over ATen's threads.
//
// Names used across the kernels: `steps` is the number of time steps and `t` one of them, `N`
// the batch, `H` the hidden size, `P` the size of h (proj_size, or H), `F` the gate features
// (4H or 3H); `scalar_t` is the floating type. A mask is (steps, N) bool, absent when every
// sample is valid; a sample that is not valid at a step keeps its state, outputs zero and takes
// no part in batch statistics.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

// Vectorize the loop that follows (an OpenMP SIMD hint: -fopenmp-simd, no threads). _Pragma, not
// #pragma, because most loops sit inside the AT_DISPATCH macro's lambda.
#define SEQNORM_SIMD _Pragma("omp simd")

namespace seqnorm {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// The normalizations of DESIGN.md section 2 as the kernels see them: layer norm is group norm
// with one group.
enum class NormKind { none, group, batch };

struct NormConfig {
  NormKind kind;
  int64_t groups;
  double eps;
  bool training;  // batch norm: batch statistics (else running ones)

  // From the module's `norm` ("none", "layer", "group", "batch") and `groups`.
  static NormConfig parse(const std::string& norm, int64_t groups, double eps, bool training) {
    if (norm == "none") return {NormKind::none, 1, eps, training};
    if (norm == "layer") return {NormKind::group, 1, eps, training};
    if (norm == "group") return {NormKind::group, groups, eps, training};
    TORCH_CHECK(norm == "batch", "norm must be 'none', 'layer', 'group' or 'batch', got '", norm,
                "'");
    return {NormKind::batch, 1, eps, training};
  }
  bool normed() const { return kind != NormKind::none; }
  bool batch() const { return kind == NormKind::batch; }
  // Whether step t normalized with its batch statistics (else with running ones).
  bool uses_batch(int64_t count) const { return batch() && training && count >= 2; }
};

inline const bool* mask_ptr(const OptTensor& mask) {
  return mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;
}

template <typename scalar_t>
const scalar_t* ptr_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<scalar_t>() : nullptr;
}

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// The valid samples of every step.
inline std::vector<int64_t> valid_counts(const bool* mask, int64_t steps, int64_t N) {
  std::vector<int64_t> count(steps, N);
  if (mask)
    for (int64_t t = 0; t < steps; ++t)
      count[t] = std::count(mask + t * N, mask + (t + 1) * N, true);
  return count;
}

// Which buffer slots a step uses. Training keeps every step's activations and states for the
// backward; without a backward (keep false) one slot of activations and a ring of two states
// suffice, and stay in cache.
struct StepSlots {
  int64_t kept, states;
  bool keep;
  StepSlots(int64_t steps, bool keep_)
      : kept(keep_ ? steps : 1), states(keep_ ? steps + 1 : 2), keep(keep_) {}
  int64_t act(int64_t t) const { return keep ? t : 0; }        // activations of step t
  int64_t state(int64_t t) const { return keep ? t : t & 1; }  // the state before step t
};

// Runs body(n) for every row (sample) n, split over ATen's threads when there are enough values
// to pay for it: at least 4096 a thread (16384 left the (32, 256) cell-state loops of shape A on
// one thread, and training there took 2-3% longer on 2 threads).
// Inside a parallel region it runs them all on the calling thread (ATen nests no threads).
template <typename Body>
void for_rows(int64_t lo, int64_t hi, int64_t width, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(width, 1));
  at::parallel_for(lo, hi, grain, [&](int64_t from, int64_t to) {
    for (int64_t n = from; n < to; ++n) body(n);
  });
}
template <typename Body>
void for_rows(int64_t N, int64_t width, const Body& body) {
  for_rows(0, N, width, body);
}

// Runs body(lo, hi) over ranges of the F features of a step's N rows, split over ATen's threads
// when there is enough work (batch norm: statistics are per feature): at least 4096 values a
// thread, as for_rows.
template <typename Body>
void for_features(int64_t N, int64_t F, const Body& body) {
  at::parallel_for(0, F, std::max<int64_t>(8, 4096 / std::max<int64_t>(N, 1)), body);
}

// A per-feature sum in double, one copy per thread so that rows can run in parallel (the
// gradients of gains and shifts).
struct Accumulator {
  int64_t F;
  std::vector<double> sums;
  explicit Accumulator(int64_t F_) : F(F_), sums(F_ * at::get_num_threads(), 0.0) {}
  double* mine() { return sums.data() + at::get_thread_num() * F; }
  Tensor total(const at::TensorOptions& o) const {
    Tensor out = at::zeros({F}, o.dtype(at::kDouble));
    double* p = out.data_ptr<double>();
    for (size_t k = 0; k < sums.size(); ++k) p[k % F] += sums[k];
    return out.to(o.dtype());
  }
};

// The backward hands its per-step gradients on a chunk of steps at a time (rows of about 512
// samples), while they are in cache, to the large matrix products of WeightGrad and InputGrad.
inline int64_t chunk_steps(int64_t steps, int64_t N) {
  return std::clamp<int64_t>(512 / std::max<int64_t>(N, 1), 1, std::max<int64_t>(steps, 1));
}

}  // namespace seqnorm
