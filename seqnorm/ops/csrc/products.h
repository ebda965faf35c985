// The matrix products of the recurrence: the per-step product with a fixed weight (Product),
// the large products before and after the time loop (large_product), and the weight gradient
// summed over every step, one large product per chunk of steps (WeightGrad).
#pragma once

#include "common.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <map>
#include <mutex>

namespace at::native {
// oneDNN's matrix product as ATen runs it (result = beta * result + alpha * mat1 mat2, any
// strides), declared in ATen/native/mkldnn/Matmul.h, a header torch does not install. Weak: a
// torch without it still loads this extension, and large_product then uses at::mm.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2,
                                         const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace seqnorm {

// Which library runs the float32 products: SEQNORM_CPU_PRODUCT=packed asks for oneDNN, =mm for
// at::mm; unset, each shape times both once (timed), except under
// torch.use_deterministic_algorithms(True), where oneDNN runs them all: a timed choice can differ
// from one run to the next, and the rounding with it.
enum class Library { timed, onednn, aten };
inline Library chosen_library() {
  const char* forced = std::getenv("SEQNORM_CPU_PRODUCT");
  if (forced && std::string(forced) == "packed") return Library::onednn;
  if (forced && std::string(forced) == "mm") return Library::aten;
  return at::globalContext().deterministicAlgorithms() ? Library::onednn : Library::timed;
}

// The median of five timed runs, after one untimed.
template <typename Run>
double median_ms(const Run& run) {
  std::vector<double> times;
  for (int k = 0; k < 6; ++k) {
    const auto start = std::chrono::steady_clock::now();
    run();
    const std::chrono::duration<double, std::milli> took = std::chrono::steady_clock::now() - start;
    if (k) times.push_back(took.count());
  }
  std::nth_element(times.begin(), times.begin() + 2, times.end());
  return times[2];
}

// How many products this process has timed (each shape once; for tests).
inline std::atomic<int64_t>& timings() {
  static std::atomic<int64_t> count{0};
  return count;
}

// Remembers, for the process, which of two ways is faster per key: decide() times them the
// first time a key is asked for.
template <typename Key>
class Choices {
 public:
  template <typename Decide>
  bool get(const Key& key, const Decide& decide) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = decided_.find(key);
    if (found != decided_.end()) return found->second;
    ++timings();
    return decided_[key] = decide();
  }

 private:
  std::mutex mutex_;
  std::map<Key, bool> decided_;
};

// The per-step product y = x W^T with a fixed W (out, in), as oneDNN's product on blocked
// weights packed once per sequence (the kernels torch.nn.LSTM runs on CPU) or as at::mm with W^T
// made contiguous once. Which one is faster depends on the CPU (on an AVX2 machine the packed
// weights lost 2x at batch 1 and won from batch 8 on at 1 MiB; on an AVX-512 one they won at
// batch 32 and 256 KiB), so for every float32 weight shape and batch the two are timed once on
// this machine and the faster one is remembered for the process (chosen_library: the
// environment or deterministic algorithms may decide instead). float64 uses at::mm.
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
  // Times both products at this shape once per process and shape, and remembers which was
  // faster.
  static bool packed_is_faster(const Tensor& w, int64_t batch) {
    const Library library = chosen_library();
    if (library != Library::timed) return library == Library::onednn;
    static Choices<std::array<int64_t, 3>> choices;
    return choices.get({w.size(0), w.size(1), batch}, [&] {
      const Tensor x = at::full({batch, w.size(1)}, 0.5, w.options());  // no RNG draw
      Tensor out = at::empty({batch, w.size(0)}, w.options());
      const Tensor wt = w.t().contiguous(), blocked = reorder().call(w.contiguous(), batch);
      const double packed_ms = median_ms([&] {
        (void)linear().call(x, blocked, std::nullopt, "none",
                            c10::List<std::optional<c10::Scalar>>(), std::nullopt);
      });
      return packed_ms < median_ms([&] { at::mm_out(out, x, wt); });
    });
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

// out = a b, or out += a b (accumulate): the products before and after the time loop (the input
// projection of every step, the weight gradients, dx). at::mm runs the BLAS torch was built with
// (MKL in the x86 wheels), whose float32 product took 2.1-2.4x the time of oneDNN's on a 2-core
// AMD Zen 5 VM (at AVX2's rate there, oneDNN at AVX-512's); which is faster depends on the CPU,
// so, as for Product, each float32 shape and layout times both once and keeps the faster. out
// must be contiguous; a and b may be transposed views.
inline void large_product(const Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
  const auto run = [&](bool onednn, const Tensor& y, const Tensor& x, const Tensor& w) {
    if (onednn) {
      at::native::mkldnn_matmul(x, w, y, accumulate ? 1.0f : 0.0f, 1.0f);
    } else if (accumulate) {
      y.addmm_(x, w);
    } else {
      at::mm_out(const_cast<Tensor&>(y), x, w);
    }
  };
  const auto unit = [](const Tensor& t) { return t.stride(1) == 1 || t.stride(0) == 1; };
  const bool possible = &at::native::mkldnn_matmul != nullptr && at::hasMKLDNN() &&
                        out.scalar_type() == at::kFloat && a.scalar_type() == at::kFloat &&
                        b.scalar_type() == at::kFloat && out.numel() > 0 && a.size(1) > 0 &&
                        out.is_contiguous() && unit(a) && unit(b);
  const Library library = chosen_library();
  if (!possible || library != Library::timed) {
    run(possible && library == Library::onednn, out, a, b);
    return;
  }
  // Timed on the shape itself, or within 2^27 multiply-adds: on fewer rows where a is row-major,
  // on less of the inner dimension where a is transposed (a weight gradient's chunk: fewer of its
  // rows made MKL look faster at shape A, where on all of them it took twice oneDNN's time). A
  // row-major a's rows are steps x batch, which change with every sequence length: one timing
  // serves all row counts up to the same power of two.
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  const bool transposed = a.stride(1) != 1;
  const int64_t fit = std::max<int64_t>(64, (int64_t(1) << 27) / ((transposed ? M : K) * N));
  const int64_t m = transposed ? M : std::min(M, fit), k = transposed ? std::min(K, fit) : K;
  int64_t rows = m;  // the key's row count
  if (!transposed) {
    for (rows = 1; rows < m;) rows <<= 1;
  }
  static Choices<std::array<int64_t, 5>> choices;
  const bool onednn = choices.get({rows, k, N, transposed, b.stride(1) != 1}, [&] {
    const Tensor x = a.narrow(0, 0, m).narrow(1, 0, k), w = b.narrow(0, 0, k);
    const Tensor y = at::zeros({m, N}, out.options());
    const double aten_ms = median_ms([&] { run(false, y, x, w); });
    return median_ms([&] { run(true, y, x, w); }) < aten_ms;
  });
  run(onednn, out, a, b);
}

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
    large_product(dw, ring.narrow(0, 0, len).reshape({len * N, out}).t(),
                  xs.narrow(0, t, len).reshape({len * N, in}), true);
  }
};

}  // namespace seqnorm
