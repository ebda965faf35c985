// The matrix products of the recurrence: the per-step product with a fixed weight (Product),
// the large products before and after the time loop (large_product), and the weight gradient
// summed over every step, one large product per chunk of steps (WeightGrad).
#pragma once

#include "common.h"

#include <ATen/Context.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/native/CPUBlas.h>

#include <array>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <mutex>
#include <type_traits>

#include <unistd.h>

namespace at::native {
// oneDNN's matrix product as ATen runs it (result = beta * result + alpha * mat1 mat2, any
// strides), declared in ATen/native/mkldnn/Matmul.h, a header torch does not install. Weak: a
// torch without it still loads this extension, and large_product then uses at::mm.
__attribute__((weak)) void mkldnn_matmul(const Tensor& mat1, const Tensor& mat2,
                                         const Tensor& result, float beta, float alpha);
}  // namespace at::native

namespace seqnorm {

// Which library runs the float32 products: SEQNORM_CPU_PRODUCT=packed asks for oneDNN, =mm for
// at::mm, =brgemm for oneDNN's small-matrix kernel in the per-step products (Product) and oneDNN
// in the others; unset, each shape times the ways once (timed), except under
// torch.use_deterministic_algorithms(True), where oneDNN's packed product runs them all: a timed
// choice can differ from one run to the next, and the rounding with it.
enum class Library { timed, onednn, aten, brgemm };
inline Library chosen_library() {
  const char* forced = std::getenv("SEQNORM_CPU_PRODUCT");
  if (forced && std::string(forced) == "packed") return Library::onednn;
  if (forced && std::string(forced) == "mm") return Library::aten;
  if (forced && std::string(forced) == "brgemm") return Library::brgemm;
  return at::globalContext().deterministicAlgorithms() ? Library::onednn : Library::timed;
}

// Which of `runs` is fastest: in each of 7 rounds, after one untimed round, every run is timed
// over `calls` calls in turn, and each is judged by its fastest round. A slow spell of the host
// only adds time, and taking turns spreads it over all of them. Another run than `incumbent` is
// taken only if it is at least 5% faster, so that close calls come out the same from one process
// to the next (on the Zen 5 VM brgemm and the packed product of shape C's backward came out
// close in some processes and far apart in others, where bench_products.py reads brgemm a third
// slower; the median of five single calls of each, one way after the other, had once chosen
// brgemm there).
inline size_t fastest_run(const std::vector<std::function<void()>>& runs, size_t incumbent,
                          int calls = 3) {
  std::vector<double> best(runs.size(), std::numeric_limits<double>::infinity());
  for (int round = 0; round < 8; ++round) {
    for (size_t k = 0; k < runs.size(); ++k) {
      const auto start = std::chrono::steady_clock::now();
      for (int c = 0; c < calls; ++c) runs[k]();
      const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
      if (round) best[k] = std::min(best[k], took.count());
    }
  }
  const size_t fastest = std::min_element(best.begin(), best.end()) - best.begin();
  return best[fastest] < 0.95 * best[incumbent] ? fastest : incumbent;
}

// How many products this process has timed (each shape once; for tests).
inline std::atomic<int64_t>& timings() {
  static std::atomic<int64_t> count{0};
  return count;
}

// Remembers, for the process, which way is fastest per key: decide() times them the first time
// a key is asked for.
template <typename Key, typename Value = bool>
class Choices {
 public:
  template <typename Decide>
  Value get(const Key& key, const Decide& decide) {
    std::lock_guard<std::mutex> lock(mutex_);
    const auto found = decided_.find(key);
    if (found != decided_.end()) return found->second;
    ++timings();
    return decided_[key] = decide();
  }

 private:
  std::mutex mutex_;
  std::map<Key, Value> decided_;
};

// y = x W^T with oneDNN's small-matrix kernel (brgemm, through ATen's cpublas) on W^T, one
// block of W^T's columns (output features) after another, the blocks split over ATen's threads:
// no call through the dispatcher and no tensor made per step, which at shape A took 5-20% off
// the per-step product and at batch 1 a third to two thirds. Each block is stored on its own,
// row after row (its rows one block wide): read out of W^T in place, a block's rows lie 4F bytes
// apart, a multiple of 4 KiB at F = 1024, and share a few cache sets (on the Zen 5 VM the
// forward's 100 products at shape A took 4.0 ms so against 3.6-3.7 stored apart). float32, where
// torch's cpublas has a float32 brgemm.
struct BlockProduct {
#ifdef CPUBLAS_BRGEMM_F32F32F32
  static bool available() { return true; }
  Tensor blocks;  // block j: W^T's columns [j width, j width + n) as (K, n), from j width K on
  int64_t F = 0, K = 0, width = 0;
  explicit BlockProduct(const Tensor& w) : F(w.size(0)), K(w.size(1)) {
    TORCH_CHECK(w.scalar_type() == at::kFloat, "BlockProduct: float32 weights, got ",
                w.scalar_type());
    const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
    // blocks at most 256 features wide (and at least 64; a multiple of 16, a vector), as many as
    // a multiple of the threads, so that each thread takes as many (3 blocks of 256 for the GRU's
    // 768 features on 2 threads took as long as 4 of them; 4 of 192, three quarters of that)
    const int64_t count = threads * ((F + threads * 256 - 1) / (threads * 256));
    width = std::max<int64_t>(64, ((F + count - 1) / count + 15) / 16 * 16);
    blocks = at::empty({F * K}, w.options());
    // in tiles of 16 x 16 that stay in cache (a copy_ of each block's transposed view took 9x
    // the time of a plain copy of W at shape A); width is a multiple of 16
    const float* src = w.data_ptr<float>();
    float* dst = blocks.data_ptr<float>();
    const int64_t s0 = w.stride(0), s1 = w.stride(1), tile = 16;
    at::parallel_for(0, (F + tile - 1) / tile, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t f0 = lo * tile; f0 < std::min(F, hi * tile); f0 += tile) {
        const int64_t j = f0 / width, n = std::min(width, F - j * width);
        const int64_t f1 = std::min(F, f0 + tile);
        float* block = dst + j * width * K - j * width;  // block[k n + f] for W's row f
        for (int64_t k0 = 0; k0 < K; k0 += tile)
          for (int64_t k = k0; k < std::min(K, k0 + tile); ++k)
            for (int64_t f = f0; f < f1; ++f) block[k * n + f] = src[f * s0 + k * s1];
      }
    });
  }
  void operator()(const Tensor& x, const Tensor& y) const {
    const Tensor rows = x.stride(1) == 1 ? x : x.contiguous();
    const int64_t M = rows.size(0);
    TORCH_CHECK(rows.size(1) == K && y.is_contiguous() && y.size(0) == M && y.size(1) == F,
                "BlockProduct: x (", M, ", ", K, ") and y contiguous (", M, ", ", F, "), got ",
                rows.sizes(), " and ", y.sizes());
    run(rows.data_ptr<float>(), M, rows.stride(0), y.data_ptr<float>());
  }
  // c (M, F, contiguous) = a (M, K, rows lda apart) W^T
  void run(const float* a, int64_t M, int64_t lda, float* c) const {
    const float* b = blocks.data_ptr<float>();
    at::parallel_for(0, (F + width - 1) / width, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) {
        const int64_t n = std::min(width, F - j * width);
        at::native::cpublas::brgemm(M, n, K, lda, n, F, false, a, b + j * width * K,
                                    c + j * width, false);
      }
      at::native::cpublas::brgemm_release(false);
    });
  }
#else
  Tensor blocks;
  int64_t F = 0, K = 0, width = 0;
  static bool available() { return false; }
  explicit BlockProduct(const Tensor&) { TORCH_CHECK(false, "this torch has no float32 brgemm"); }
  void operator()(const Tensor&, const Tensor&) const {}
  void run(const float*, int64_t, int64_t, float*) const {}
#endif
};

// The per-step product y = x W^T with a fixed W (out, in), in one of three ways: oneDNN's product
// on blocked weights packed once per sequence (the kernels torch.nn.LSTM runs on CPU), at::mm
// with W^T made contiguous once, or BlockProduct on that W^T. Which one is faster depends on the
// CPU and the shape (on an AVX2 machine the packed weights lost 2x at batch 1 and won from batch
// 8 on at 1 MiB; on a Zen 5 VM the block product won at shapes A and B and lost at C), so for
// every float32 weight shape, batch and thread count the ways are timed once on this machine
// (fastest_run) and the fastest is remembered for the process (chosen_library: the
// environment or deterministic algorithms may decide instead). float64 uses at::mm.
struct Product {
  enum class Way { mm, packed, blocks };
  Tensor wt, packed;             // W^T (mm), oneDNN's blocked W (packed)
  std::optional<BlockProduct> blocks;
  Way way = Way::mm;
  Tensor last;  // rows()'s last result when it is not in out (oneDNN's own tensor)
  Product(const Tensor& w, int64_t batch) : Product(w, batch, std::nullopt) {}
  // With `forced`, that way (float32; for tests and benchmarks).
  Product(const Tensor& w, int64_t batch, std::optional<Way> forced) {
    if (forced) {
      TORCH_CHECK(w.scalar_type() == at::kFloat || *forced == Way::mm,
                  "only float32 products run on oneDNN or brgemm");
      TORCH_CHECK(*forced != Way::packed || onednn(), "this torch has no oneDNN");
      TORCH_CHECK(*forced != Way::blocks || BlockProduct::available(),
                  "this torch has no float32 brgemm");
      way = *forced;
    } else if (w.scalar_type() == at::kFloat && w.numel() >= (1 << 16)) {
      way = fastest(w, batch);
    }
    if (way == Way::packed) {
      packed = reorder().call(w.contiguous(), batch);
    } else if (way == Way::blocks) {
      blocks.emplace(w);
    } else {
      wt = w.t().contiguous();
    }
  }
  // x W^T: into out for at::mm and the block product, a new tensor from oneDNN (copying it into
  // out would cost more). x must be row-major (rows may be strided).
  Tensor operator()(const Tensor& x, const Tensor& out) const {
    switch (way) {
      case Way::packed:
        return linear().call(x, packed, std::nullopt, "none",
                             c10::List<std::optional<c10::Scalar>>(), std::nullopt);
      case Way::blocks:
        (*blocks)(x, out);
        return out;
      default:
        return at::mm_out(const_cast<Tensor&>(out), x, wt);
    }
  }
  // x W^T for x (M rows, ldx apart) and out (M, out features, contiguous) given as pointers
  // into larger tensors: the block product reads and writes them in place, with no tensor made
  // per step (a select per operand took 0.5 us, at batch 1 a twentieth of a step); the other ways
  // take the tensors x_rows() and out_rows() make. Returns where the result is: out, or
  // oneDNN's own tensor, kept until the next call.
  template <typename scalar_t, typename XRows, typename OutRows>
  const scalar_t* rows(const scalar_t* x, int64_t M, int64_t ldx, scalar_t* out,
                       const XRows& x_rows, const OutRows& out_rows) {
    if constexpr (std::is_same_v<scalar_t, float>) {
      if (way == Way::blocks) {
        blocks->run(x, M, ldx, out);
        return out;
      }
    }
    last = (*this)(x_rows(), out_rows());
    return last.template data_ptr<scalar_t>();
  }
  // Whether rows_of can run: the block product, which runs on the calling thread inside a
  // parallel region.
  bool rows_apart() const { return way == Way::blocks; }
  // The bytes of W^T the block product reads at every call (0 for the other ways).
  int64_t weight_bytes() const {
    return blocks ? blocks->blocks.numel() * blocks->blocks.element_size() : 0;
  }
  // Rows [lo, hi) of x W^T (x's rows ldx apart) into the same rows of out, on this thread.
  template <typename scalar_t>
  const scalar_t* rows_of(const scalar_t* x, int64_t lo, int64_t hi, int64_t ldx,
                          scalar_t* out) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      blocks->run(x + lo * ldx, hi - lo, ldx, out + lo * blocks->F);
      return out;
    }
    TORCH_CHECK(false, "rows_of: float32 only");
  }
  // The ways by name, as SEQNORM_CPU_PRODUCT spells them.
  static const char* name(Way way) {
    return way == Way::packed ? "packed" : way == Way::blocks ? "brgemm" : "mm";
  }
  static Way named(const std::string& name) {
    for (Way way : {Way::mm, Way::packed, Way::blocks})
      if (name == Product::name(way)) return way;
    TORCH_CHECK(false, "way must be 'packed', 'brgemm' or 'mm', got '", name, "'");
  }

 private:
  using Reorder = Tensor(const Tensor&, std::optional<int64_t>);
  using Linear = Tensor(const Tensor&, const Tensor&, const std::optional<Tensor>&,
                        c10::string_view, c10::List<std::optional<c10::Scalar>>,
                        std::optional<c10::string_view>);
  static c10::OperatorHandle handle(const char* name) {
    return c10::Dispatcher::singleton().findSchemaOrThrow(name, "");
  }
  // The way asked for, or the fastest at this shape, timed once per process and shape.
  static Way fastest(const Tensor& w, int64_t batch) {
    const Library library = chosen_library();
    if (library == Library::aten) return Way::mm;
    if (library == Library::brgemm && BlockProduct::available()) return Way::blocks;
    if (library != Library::timed) return onednn() ? Way::packed : Way::mm;
    static Choices<std::array<int64_t, 4>, Way> choices;
    return choices.get({w.size(0), w.size(1), batch, at::get_num_threads()}, [&] {
      const Tensor x = at::full({batch, w.size(1)}, 0.5, w.options());  // no RNG draw
      Tensor out = at::empty({batch, w.size(0)}, w.options());
      const Tensor wt = w.t().contiguous();
      std::vector<Way> ways{Way::mm};
      std::vector<std::function<void()>> runs{[&] { at::mm_out(out, x, wt); }};
      Tensor blocked;
      if (onednn()) {
        blocked = reorder().call(w.contiguous(), batch);
        ways.push_back(Way::packed);
        runs.push_back([&] {
          (void)linear().call(x, blocked, std::nullopt, "none",
                              c10::List<std::optional<c10::Scalar>>(), std::nullopt);
        });
      }
      std::optional<BlockProduct> block;
      if (BlockProduct::available()) {
        try {
          block.emplace(w);
          (*block)(x, out);
          ways.push_back(Way::blocks);
          runs.push_back([&] { (*block)(x, out); });
        } catch (const std::exception&) {  // a CPU or build without the kernel: not a way here
        }
      }
      return ways[fastest_run(runs, ways.size() > 1 && ways[1] == Way::packed ? 1 : 0)];
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

// How many forward time loops took their rows apart (run_steps; for tests).
inline std::atomic<int64_t>& loops_apart() {
  static std::atomic<int64_t> count{0};
  return count;
}

// The cache of one core that W^T must fit for rows to go apart: the L2 cache as the C library
// reports it (glibc's sysconf), 1 MiB where it does not.
inline int64_t core_cache_bytes() {
  static const int64_t bytes = [] {
#ifdef _SC_LEVEL2_CACHE_SIZE
    const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
    if (l2 > 0) return static_cast<int64_t>(l2);
#endif
    return int64_t(1) << 20;
  }();
  return bytes;
}

// Whether a forward's time loop takes its rows apart (run_steps). It can where no step mixes
// samples (no batch statistics; eval mode's running ones are known ahead), the per-step product
// runs on brgemm (Product::rows_of) and there are two threads or more, each with a row. It does
// where each thread gets 16 rows or more and W^T fits one core's L2 cache. Apart, every thread
// reads all of W^T at every step, not its share of the columns: with few rows that costs more
// than the fork-joins it saves (on the 2-core Zen 5 VM, 1 MiB of L2, LN-LSTM inference at 100
// steps, hidden 512, batch 4 took 7.0-8.5 ms apart against 4.5 together), and where W^T does not
// fit, the reads come from a cache further away at every step (at shape C, W^T 4 MiB, the VM's
// noise hid any difference: 1.11-1.19x torch.nn.LSTM either way), so such loops keep the way
// measured before. SEQNORM_CPU_LOOP=apart or =together decides instead where it can (for tests
// and benchmarks).
inline bool rows_apart(const NormConfig& s, const Product& product, int64_t N) {
  const char* forced = std::getenv("SEQNORM_CPU_LOOP");
  const std::string way = forced ? forced : "";
  TORCH_CHECK(!forced || way == "apart" || way == "together",
              "SEQNORM_CPU_LOOP must be 'apart' or 'together', got '", way, "'");
  const int64_t threads = at::get_num_threads();
  if ((s.batch() && s.training) || !product.rows_apart() || threads < 2 || N < threads)
    return false;
  if (forced) return way == "apart";
  return N >= 16 * threads && product.weight_bytes() <= core_cache_bytes();
}

// Runs step(t, lo, hi) for t = 0, ..., steps - 1. Together: the rows [0, N) at each step, whose
// parts split the rows or features over the threads (a fork-join each: product, rows, ...).
// Apart: each thread takes its own rows [lo, hi) through every step, with no wait for the others
// (on the 2-core Zen 5 VM, inference at shape A: LN-LSTM 8.0-9.6 -> 7.5-8.1 ms, five rounds of
// bench_rnn.py alternating the two builds).
template <typename Step>
void run_steps(int64_t steps, int64_t N, bool apart, const Step& step) {
  if (!apart) {
    for (int64_t t = 0; t < steps; ++t) step(t, 0, N);
    return;
  }
  ++loops_apart();
  const int64_t threads = at::get_num_threads();
  at::parallel_for(0, N, (N + threads - 1) / threads, [&](int64_t lo, int64_t hi) {
    for (int64_t t = 0; t < steps; ++t) step(t, lo, hi);
  });
}

// out = a b, or out += a b (accumulate): the products before and after the time loop (the input
// projection of every step, the weight gradients, dx). at::mm runs the BLAS torch was built with
// (MKL in the x86 wheels), whose float32 product took 2.1-2.4x the time of oneDNN's on a 2-core
// AMD Zen 5 VM (at AVX2's rate there, oneDNN at AVX-512's); which is faster depends on the CPU,
// so, as for Product, each float32 shape and layout times both once (fastest_run: oneDNN
// unless at::mm is 5% faster). out must be contiguous; a and b may be transposed views.
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
    run(possible && library != Library::aten, out, a, b);
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
    return fastest_run({[&] { run(true, y, x, w); }, [&] { run(false, y, x, w); }}, 0, 1) == 0;
  });
  run(onednn, out, a, b);
}

// dW = sum_t dy_t^T x_t, as one matrix product per chunk of steps: the backward writes step t's
// dy (N, out) into at(t) and calls done(t), walking t down from steps - 1. xs (steps + , N, in)
// holds x_t at xs[t]. ring: a (K, N, out) buffer to share (an LSTM without norm, whose
// dL/d(h W_hh^T) is its dL/dgx), else its own. The first chunk (the last steps) writes dW, the
// others add to it: no pass to zero it first (at batch 1, 100 us of a 2.5 ms training step for a
// 1 MiB W_hh).
struct WeightGrad {
  Tensor dw, ring, xs;
  int64_t K, steps, N, out, in;
  WeightGrad(const Tensor& xs_, int64_t steps_, int64_t N_, int64_t out_, const Tensor& shared)
      : xs(xs_), K(chunk_steps(steps_, N_)), steps(steps_), N(N_), out(out_), in(xs_.size(2)) {
    dw = steps ? at::empty({out, in}, xs.options()) : at::zeros({out, in}, xs.options());
    ring = shared.defined() ? shared : at::empty({K, N, out}, xs.options());
  }
  Tensor at(int64_t t) { return ring[t % K]; }
  template <typename scalar_t>
  scalar_t* ptr(int64_t t) {  // at(t)'s data, with no tensor made
    return ring.data_ptr<scalar_t>() + (t % K) * N * out;
  }
  void done(int64_t t) {
    if (t % K) return;
    const int64_t len = std::min(K, steps - t);
    large_product(dw, ring.narrow(0, 0, len).reshape({len * N, out}).t(),
                  xs.narrow(0, t, len).reshape({len * N, in}), t + K < steps);
  }
};

}  // namespace seqnorm
