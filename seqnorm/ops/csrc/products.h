// The matrix products of the recurrence: the per-step product with a fixed weight (Product),
// and the weight gradient summed over every step, one large product per chunk of steps
// (WeightGrad).
#pragma once

#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>

namespace seqnorm {

// The per-step product y = x W^T with a fixed W (out, in). For a large float32 W (2 MiB and
// more, an LSTM of hidden 512 and up) oneDNN's blocked weights, packed once per sequence, beat
// sgemm at every batch size on the benchmark machine (they are the kernels torch.nn.LSTM runs on
// CPU); at 1 MiB they win from batch 16 on in the forward product and lose at batch 1.
// Otherwise (and in float64) at::mm runs with W^T made contiguous once.
struct Product {
  Tensor wt, packed;
  Product(const Tensor& w, int64_t batch, bool forward) {
    const bool large = w.numel() >= (1 << 19) || (forward && w.numel() >= (1 << 18) && batch >= 16);
    if (w.scalar_type() == at::kFloat && large && onednn()) {
      packed = reorder().call(w.contiguous(), batch);
    } else {
      wt = w.t().contiguous();
    }
  }
  // x W^T: into out for at::mm, a new tensor from oneDNN (copying it into out would cost more).
  Tensor operator()(const Tensor& x, const Tensor& out) const {
    if (!packed.defined()) return at::mm_out(const_cast<Tensor&>(out), x, wt);
    return linear().call(x, packed, std::nullopt, "none",
                         c10::List<std::optional<c10::Scalar>>(), std::nullopt);
  }

 private:
  using Reorder = Tensor(const Tensor&, std::optional<int64_t>);
  using Linear = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                        c10::string_view, c10::List<std::optional<c10::Scalar>>,
                        std::optional<c10::string_view>);
  static c10::OperatorHandle handle(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  }
  static bool onednn() {  // builds without oneDNN (or with a different schema) use at::mm
    static const bool ok = [] {
      if (!at::hasMKLDNN()) return false;
      try {
        (void)reorder();
        (void)linear();
        return true;
      } catch (const std::exception&) {
        return false;
      }
    }();
    return ok;
  }
  static const c10::TypedOperatorHandle<Reorder>& reorder() {
    static const auto op = handle("mkldnn::_reorder_linear_weight").typed<Reorder>();
    return op;
  }
  static const c10::TypedOperatorHandle<Linear>& linear() {
    static const auto op = handle("mkldnn::_linear_pointwise").typed<Linear>();
    return op;
  }
};

// dW = sum_t dy_t^T x_t, as one matrix product per chunk of steps: the backward writes step t's
// dy (N, out) into at(t) and calls done(t), walking t down from steps - 1. xs (steps + , N, in)
// holds x_t at xs[t]. ring: a (K, N, out) buffer to share (an LSTM without norm, whose
// dL/d(h W_hh^T) is its dL/dgx), else its own.
struct WeightGrad {
  Tensor dw, ring, xs;
  int64_t K, steps, N, out, in;
  WeightGrad(const Tensor& xs_, int64_t steps_, int64_t N_, int64_t out_, const Tensor& shared)
      : xs(xs_), K(chunk_steps(steps_, N_)), steps(steps_), N(N_), out(out_), in(xs_.size(2)) {
    dw = at::zeros({out, in}, xs.options());
    ring = shared.defined() ? shared : at::empty({K, N, out}, xs.options());
  }
  Tensor at(int64_t t) { return ring[t % K]; }
  void done(int64_t t) {
    if (t % K) return;
    const int64_t len = std::min(K, steps - t);
    dw.addmm_(ring.narrow(0, 0, len).reshape({len * N, out}).t(),
              xs.narrow(0, t, len).reshape({len * N, in}));
  }
};

}  // namespace seqnorm
