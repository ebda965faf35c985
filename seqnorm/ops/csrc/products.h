// The matrix products of the recurrence: the per-step product with a fixed weight (Product),
// and the weight gradient summed over every step, one large product per chunk of steps
// (WeightGrad).
#pragma once

#include "common.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>

namespace seqnorm {

// The per-step product y = x W^T with a fixed W (out, in), as oneDNN's product on blocked
// weights packed once per sequence (the kernels torch.nn.LSTM runs on CPU) or as at::mm with W^T
// made contiguous once. Which one is faster depends on the CPU (on an AVX2 machine the packed
// weights lost 2x at batch 1 and won from batch 8 on at 1 MiB; on an AVX-512 one they won at
// batch 32 and 256 KiB), so for every float32 weight shape and batch the two are timed once on
// this machine and the faster one is remembered for the process (SEQNORM_CPU_PRODUCT=packed or
// =mm decides instead). float64 uses at::mm.
struct Product {
  Tensor wt, packed;
  Product(const Tensor& w, int64_t batch) {
    if (w.scalar_type() == at::kFloat && w.numel() >= (1 << 16) && onednn() &&
        packed_is_faster(w, batch)) {
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
  // Times both products at this shape (the median of five runs each, after one) once per
  // process and shape, and remembers which was faster.
  static bool packed_is_faster(const Tensor& w, int64_t batch) {
    static std::mutex mutex;
    static std::map<std::array<int64_t, 3>, bool> decided;
    const std::array<int64_t, 3> key{w.size(0), w.size(1), batch};
    std::lock_guard<std::mutex> lock(mutex);
    const auto found = decided.find(key);
    if (found != decided.end()) return found->second;
    const char* forced = std::getenv("SEQNORM_CPU_PRODUCT");  // "packed" or "mm": for tests
    if (forced && std::string(forced) == "packed") return true;
    if (forced && std::string(forced) == "mm") return false;
    const Tensor x = at::full({batch, w.size(1)}, 0.5, w.options());  // no RNG draw
    Tensor out = at::empty({batch, w.size(0)}, w.options());
    const Tensor wt = w.t().contiguous(), blocked = reorder().call(w.contiguous(), batch);
    const auto median_ms = [](const auto& run) {
      std::vector<double> times;
      for (int k = 0; k < 6; ++k) {
        const auto start = std::chrono::steady_clock::now();
        run();
        const std::chrono::duration<double, std::milli> took =
            std::chrono::steady_clock::now() - start;
        if (k) times.push_back(took.count());
      }
      std::nth_element(times.begin(), times.begin() + 2, times.end());
      return times[2];
    };
    const double packed_ms = median_ms([&] {
      (void)linear().call(x, blocked, std::nullopt, "none",
                          c10::List<std::optional<c10::Scalar>>(), std::nullopt);
    });
    const double mm_ms = median_ms([&] { at::mm_out(out, x, wt); });
    return decided[key] = packed_ms < mm_ms;
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
