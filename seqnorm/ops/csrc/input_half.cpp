// The input half of the gates, forward (input_forward) and backward (InputGrad): see
// input_half.h. Group norm runs all steps * N rows as one step, rows in parallel; batch norm
// runs N rows per step, steps in parallel and each step's rows in turn (a nested
// at::parallel_for would run inline as thread 0, which would break the per-thread Accumulator).
#include "input_half.h"

#include "buffer_cache.h"
#include "norms.h"
#include "products.h"

namespace seqnorm {
namespace {

// How the (steps, N) rows of the input half are split: per step for batch norm (its statistics
// are per step), all at once otherwise.
struct InputRows {
  int64_t steps, rows;
  bool batch;
  InputRows(const NormConfig& s, int64_t steps_, int64_t N)
      : steps(s.batch() ? steps_ : 1), rows(s.batch() ? N : steps_ * N), batch(s.batch()) {}
  template <typename Body>
  void each_row(int64_t F, const Body& body) const {
    if (!batch) return for_rows(rows, F, body);
    for (int64_t n = 0; n < rows; ++n) body(n);
  }
};

// x W^T (+ bias) for every step at once into a cached buffer (large_product: oneDNN's product
// or ATen's sgemm, whichever is faster here). The bias is added after the product: writing it
// into the buffer first for the product to accumulate onto took 0.5 ms beside the product's 1.9
// at shape A, adding it after 0.1-0.25.
Tensor project(const Tensor& x, const Tensor& w, const OptTensor& bias) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && x.size(2) == w.size(1),
              "x must be (steps, N, I) and w (F, I)");
  const int64_t steps = x.size(0), N = x.size(1), F = w.size(0);
  Tensor out = buffer({steps, N, F}, x.options());
  Tensor rows = out.view({steps * N, F});
  large_product(rows, x.reshape({steps * N, x.size(2)}), w.t(), false);
  if (present(bias)) rows.add_(*bias);
  return out;
}

}  // namespace

std::vector<Tensor> input_forward(const Tensor& x, const Tensor& w_ih, const OptTensor& bias,
                                  const OptTensor& gamma, const OptTensor& running_mean,
                                  const OptTensor& running_var, const OptTensor& mask,
                                  const std::string& norm, int64_t groups, double eps,
                                  bool training, bool keep) {
  const NormConfig s = NormConfig::parse(norm, groups, eps, training);
  const int64_t steps = x.size(0), N = x.size(1), F = w_ih.size(0);
  const bool* m = mask_ptr(mask);
  const std::vector<int64_t> count = valid_counts(m, steps, N);
  Tensor counts = at::tensor(count, x.options().dtype(at::kLong));
  if (!s.normed()) {
    const Tensor y = project(x, w_ih, bias);
    return {y, y, at::empty({0}, x.options()), at::empty({0}, x.options()), counts};
  }
  check_running(s, running_mean, running_var, steps, F, "the input projection");
  // x_hat overwrites the projection, and so does y without a backward.
  const Tensor xhat = project(x, w_ih, std::nullopt);
  Tensor y = keep ? buffer(xhat.sizes(), xhat.options()) : xhat;
  const InputRows ir(s, steps, N);
  NormBuffers nb(s, ir.steps, ir.rows, F, xhat);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqnorm_input_forward", [&] {
    const scalar_t* gam = ptr_or_null<scalar_t>(gamma);
    const scalar_t* shift = ptr_or_null<scalar_t>(bias);
    const RunningRows<scalar_t> run(running_mean, running_var);
    if (s.batch() && !s.training) running_stats_ahead(s, nb, steps, F, run);
    at::parallel_for(0, ir.steps, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t first = t * ir.rows;
        scalar_t* xt = xhat.data_ptr<scalar_t>() + first * F;
        const StepNorm<scalar_t> step_norm(s, nb, t, ir.steps, ir.rows, F, xt,
                                           m ? m + t * N : nullptr, count[t], run);
        ir.each_row(F, [&](int64_t n) {
          scalar_t* xn = xt + n * F;
          scalar_t* yn = y.data_ptr<scalar_t>() + (first + n) * F;
          step_norm.row(n, xn, xn);
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f)
            yn[f] = (gam ? gam[f] * xn[f] : xn[f]) + (shift ? shift[f] : scalar_t(0));
        });
      }
    });
  });
  return {y, xhat, nb.stats, nb.batch_stats, counts};
}

InputGrad::InputGrad(const NormConfig& s, const Tensor& x, const Tensor& w_ih,
                     const OptTensor& gamma, const Tensor& xhat, const Tensor& stats,
                     InputNeeds needs, const bool* mask, const int64_t* count, int64_t steps,
                     int64_t N, int64_t F)
    : dgamma(needs.gamma && s.normed() ? F : 0), dbias(needs.bias ? F : 0), s_(s), mask_(mask),
      count_(count), K_(chunk_steps(steps, N)), steps_(steps), N_(N), F_(F) {
  const auto o = x.options();
  ring_ = at::empty({K_, N, F}, o);
  if (s.normed()) {
    TORCH_CHECK(xhat.defined() && stats.defined(), "a normalized input needs its x_hat and stats");
    xhat_ = xhat;
    stats_ = stats;
    stride_ = steps ? stats.numel() / steps : 0;  // a step's: rstd (N, G), or mean and rstd
  }
  if (present(gamma)) gamma_ = *gamma;
  if (needs.x) {
    w_ih_ = w_ih;
    dx = buffer({steps, N, w_ih.size(1)}, o);
  }
  if (needs.w_ih) {
    x_ = x.contiguous();
    dw = steps ? at::empty_like(w_ih) : at::zeros_like(w_ih);  // the first chunk writes it
  }
}

void InputGrad::done(int64_t t) {
  if (t % K_) return;
  const int64_t len = std::min(K_, steps_ - t);
  const Tensor chunk = ring_.narrow(0, 0, len);
  AT_DISPATCH_FLOATING_TYPES(ring_.scalar_type(), "seqnorm_input_backward", [&] {
    backward<scalar_t>(t, len, chunk.data_ptr<scalar_t>());
  });
  const Tensor rows = chunk.reshape({len * N_, F_});
  if (dw.defined()) {
    large_product(dw, rows.t(), x_.narrow(0, t, len).reshape({len * N_, x_.size(2)}),
                  t + K_ < steps_);
  }
  if (dx.defined()) {
    large_product(dx.narrow(0, t, len).view({len * N_, dx.size(2)}), rows, w_ih_, false);
  }
}

// dy (len, N, F) of steps t0.. into dL/d(x W_ih^T) in place, accumulating dgamma and dbias.
template <typename scalar_t>
void InputGrad::backward(int64_t t0, int64_t len, scalar_t* dy) {
  const bool want_gamma = dgamma.F > 0, want_bias = dbias.F > 0;
  const int64_t F = F_, N = N_;
  if (!s_.normed() && !want_bias) return;
  const scalar_t* gam = gamma_.defined() ? gamma_.data_ptr<scalar_t>() : nullptr;
  const InputRows ir(s_, len, N);  // without a norm all rows in parallel, as for group norm
  at::parallel_for(0, ir.steps, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi; ++k) {
      const int64_t first = k * ir.rows, t = t0 + k;
      scalar_t* dyt = dy + first * F;
      const scalar_t* xht =
          s_.normed() ? xhat_.data_ptr<scalar_t>() + (t0 * N + first) * F : nullptr;
      const scalar_t* stats = s_.normed() ? stats_.data_ptr<scalar_t>() + t * stride_ : nullptr;
      ir.each_row(F, [&](int64_t n) {
        scalar_t* d = dyt + n * F;
        if (want_bias) {
          double* b = dbias.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) b[f] += d[f];
        }
        if (!s_.normed()) return;
        const scalar_t* xh = xht + n * F;
        if (want_gamma) {
          double* g = dgamma.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) g[f] += d[f] * xh[f];
        }
        if (s_.batch()) return;  // all rows at once, below
        if (gam) {
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) d[f] *= gam[f];
        }
        group_norm_backward_row(s_.groups, d, xh, F, stats + n * s_.groups);
      });
      if (s_.batch())  // steps run in parallel here: the sums stay in the row loop above
        batch_norm_backward(dyt, dyt, xht, gam, static_cast<double*>(nullptr),
                            static_cast<double*>(nullptr), N, F, mask_ ? mask_ + t * N : nullptr,
                            stats + F, s_.uses_batch(count_[t]), count_[t]);
    }
  });
}

}  // namespace seqnorm
