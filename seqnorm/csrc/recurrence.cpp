// The fused CPU recurrence of seqnorm's LSTM and GRU: forward and hand-written backward through
// time for the recurrent half of the cells (DESIGN.md section 2), with layer/group or per-step
// batch normalization of the recurrent projection (and, for the LSTM, of the cell state).
//
// Per step the forward runs one matrix product (h W_hh^T) and then, one sample (row) at a time
// while the row is in cache, the normalization with its statistics, the gate nonlinearities and
// the state update. The backward walks the steps in reverse the same way with one matrix product
// for dh, and hands its gradients on a chunk of steps at a time, while they are in cache, to
// large matrix products: dW_hh (WeightGrad), and through the input norm's backward dW_ih and dx
// (InputGrad); so the backward stores no (T, N, F) gradient. Rows run in parallel over ATen's
// threads when they are wide enough; float32 uses vectorizable polynomial sigmoid/tanh. Without
// a backward (keep false) the forward stores no step's activations. project and
// input_norm_forward compute the input half of the gates (x W_ih^T, all steps at once), normalize
// it and add the cell's biases in one pass. Buffers of every step come from BufferCache.
//
// The readable Python path (seqnorm.functional.lstm_step / gru_step in seqnorm.rnn) is the
// reference; tests/test_fused.py checks this file against it, outputs and every gradient.
//
// Layout: gx (T, N, F) with F = gates*H, states (N, H), w_hh (F, H), mask (T, N) bool (absent:
// every sample valid). A sample that is not valid at a step keeps its state, outputs zero, and
// takes no part in batch statistics.

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <optional>
#include <unordered_map>
#include <vector>

// Vectorize the loop that follows (an OpenMP SIMD hint: -fopenmp-simd, no threads). _Pragma, not
// #pragma, because most loops sit inside the AT_DISPATCH macro's lambda.
#define SEQNORM_SIMD _Pragma("omp simd")

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---------------------------------------------------------------------------------------------
// The buffers of every step (states, outputs, x_hat, the input half of the gates: 100 MB each for
// the gates at shape C of benchmarks/bench_rnn.py) come from a cache that keeps them, once freed,
// for the next sequence. glibc maps every buffer over 32 MB afresh and unmaps it on free, so
// without the cache each training step page-faults and clears all of them again: at shape C an
// LN-LSTM step faulted 96k-104k times and spent 200-280 ms of CPU time in the system (of 3.9 s),
// and the cache made the step 2-7% faster in interleaved A/B runs on the benchmark machine. Buffers
// under kMinBytes, and all of them with a limit of 0, go to PyTorch's CPU allocator. A buffer is
// handed out again for a request of at least half its size; freed buffers are kept up to `limit`
// bytes, the oldest released first. In-use buffers are reported to PyTorch's memory profiler as its
// own CPU allocator reports them (free cached memory is not, as with CUDA's caching allocator).
class BufferCache final : public c10::Allocator {
 public:
  static constexpr size_t kMinBytes = size_t(1) << 20;

  static BufferCache& get() {  // never destroyed: tensors may be freed after static destructors
    static BufferCache* cache = new BufferCache();
    return *cache;
  }

  c10::DataPtr allocate(size_t n) override {
    if (n < kMinBytes || limit() == 0) return c10::GetDefaultCPUAllocator()->allocate(n);
    void* ptr = nullptr;
    size_t size = n;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->size >= n && it->size / 2 <= n && (best == free_.end() || it->size < best->size))
          best = it;
      if (best != free_.end()) {
        ptr = best->ptr;
        size = best->size;
        cached_ -= size;
        free_.erase(best);
      }
    }
    if (!ptr) {
      try {
        ptr = c10::alloc_cpu(n);
      } catch (const c10::Error&) {  // out of memory: give back what is cached, and try again
        empty();
        ptr = c10::alloc_cpu(n);
      }
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      used_[ptr] = size;
    }
    c10::profiledCPUMemoryReporter().New(ptr, size);
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

  size_t limit() const { return limit_.load(); }
  void set_limit(size_t bytes) {
    limit_ = bytes;
    std::lock_guard<std::mutex> lock(mutex_);
    trim(bytes);
  }
  // cached (free) bytes, bytes in use, the limit
  std::vector<int64_t> info() {
    std::lock_guard<std::mutex> lock(mutex_);
    size_t in_use = 0;
    for (const auto& block : used_) in_use += block.second;
    return {int64_t(cached_), int64_t(in_use), int64_t(limit())};
  }
  void empty() {
    std::lock_guard<std::mutex> lock(mutex_);
    trim(0);
  }

 private:
  struct Block {
    void* ptr;
    size_t size;
  };
  std::mutex mutex_;
  std::vector<Block> free_;  // oldest first
  std::unordered_map<void*, size_t> used_;  // in use: sizes
  size_t cached_ = 0;                        // the sum of free_'s sizes
  std::atomic<size_t> limit_{size_t(1) << 30};

  static void release(void* ptr) {
    c10::profiledCPUMemoryReporter().Delete(ptr);
    BufferCache& c = get();
    std::lock_guard<std::mutex> lock(c.mutex_);
    const auto it = c.used_.find(ptr);
    const size_t size = it->second;
    c.used_.erase(it);
    c.free_.push_back({ptr, size});
    c.cached_ += size;
    c.trim(c.limit());
  }
  void trim(size_t bytes) {  // with mutex_ held
    size_t k = 0;
    for (; k < free_.size() && cached_ > bytes; ++k) {
      c10::free_cpu(free_[k].ptr);
      cached_ -= free_[k].size;
    }
    free_.erase(free_.begin(), free_.begin() + k);
  }
};

// An uninitialized tensor from the cache.
Tensor buffer(at::IntArrayRef size, const at::TensorOptions& o) {
  return at::detail::empty_generic(size, &BufferCache::get(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   o.dtype().toScalarType(), std::nullopt);
}

// ---------------------------------------------------------------------------------------------
// Nonlinearities. float32 uses branch-free polynomial forms (Cephes' expf and tanhf, within a
// few ulp) that the compiler vectorizes; float64 uses the C library, for gradcheck-grade results.

inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float magic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float shifted = x * 1.44269504088896341f + magic;
  const float n = shifted - magic;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const float p = (((((1.9875691500e-4f * r + 1.3981999507e-3f) * r + 8.3334519073e-3f) * r +
                     4.1665795894e-2f) * r + 1.6666665459e-1f) * r + 5.0000001201e-1f) * r * r +
                  r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &shifted, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // the integer n, as the exponent of 2^n
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

inline float tanh_(float x) {
  const float z = x * x;
  const float small =
      ((((-5.70498872745e-3f * z + 2.06390887954e-2f) * z - 5.37397155531e-2f) * z +
        1.33314422036e-1f) * z - 3.33332819422e-1f) * z * x + x;
  const float large = 1.0f - 2.0f / (exp_approx(2.0f * std::fabs(x)) + 1.0f);
  return std::fabs(x) < 0.625f ? small : std::copysign(large, x);
}
inline double tanh_(double x) { return std::tanh(x); }

// ---------------------------------------------------------------------------------------------
// Normalizations of one step's (N, F) values.

enum NormKind : int64_t { kNone = 0, kGroup = 1, kBatch = 2 };

struct Norm {
  int64_t kind, groups;
  double eps;
  bool training;
};

// Runs body(lo, hi) over ranges of the F features of a step's N rows, split over ATen's threads
// when there is enough work (batch norm: statistics are per feature).
template <typename Body>
void for_features(int64_t N, int64_t F, const Body& body) {
  at::parallel_for(0, F, std::max<int64_t>(8, 8192 / std::max<int64_t>(N, 1)), body);
}

// Batch statistics of a step, per feature over the valid samples, or the running ones when
// there are fewer than two valid samples or in eval mode. Writes mean and rstd (F); when the
// batch statistics are used, also the batch mean and biased variance to bstats (2, T, F) at t.
template <typename T>
bool batch_stats(const Norm& s, const T* x, int64_t N, int64_t F, const bool* valid,
                 int64_t count, const T* run_mean, const T* run_var, T* mean, T* rstd,
                 T* bmean, T* bvar) {
  const bool use = s.training && count >= 2;
  if (!use) {
    std::copy(run_mean, run_mean + F, mean);
SEQNORM_SIMD
    for (int64_t f = 0; f < F; ++f)
      rstd[f] = static_cast<T>(1.0 / std::sqrt(static_cast<double>(run_var[f]) + s.eps));
    return use;
  }
  for_features(N, F, [&](int64_t lo, int64_t hi) {
    std::vector<double> sum(hi - lo, 0.0), sq(hi - lo, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      if (valid && !valid[n]) continue;
      const T* p = x + n * F + lo;
      for (int64_t f = 0; f < hi - lo; ++f) sum[f] += p[f];
    }
    for (int64_t f = 0; f < hi - lo; ++f) sum[f] /= count;
    for (int64_t n = 0; n < N; ++n) {
      if (valid && !valid[n]) continue;
      const T* p = x + n * F + lo;
      for (int64_t f = 0; f < hi - lo; ++f) sq[f] += (p[f] - sum[f]) * (p[f] - sum[f]);
    }
    for (int64_t f = 0; f < hi - lo; ++f) {
      sq[f] /= count;
      bmean[lo + f] = mean[lo + f] = static_cast<T>(sum[f]);
      bvar[lo + f] = static_cast<T>(sq[f]);
      rstd[lo + f] = static_cast<T>(1.0 / std::sqrt(sq[f] + s.eps));
    }
  });
  return use;
}

// Normalizes one row x (F) into xhat (may alias x). Group: statistics per group of F/G
// contiguous features, written to rstd (G); batch: the step's mean and rstd (F).
template <typename T>
void normalize_row(const Norm& s, const T* x, T* xhat, int64_t F, T* rstd, const T* mean_f,
                   const T* rstd_f) {
  if (s.kind == kBatch) {
SEQNORM_SIMD
    for (int64_t f = 0; f < F; ++f) xhat[f] = (x[f] - mean_f[f]) * rstd_f[f];
    return;
  }
  const int64_t G = s.groups, Fg = F / G;
  for (int64_t g = 0; g < G; ++g) {
    const T* p = x + g * Fg;
    T* q = xhat + g * Fg;
    T sum = 0, sq = 0;  // the SIMD lanes are separate partial sums, as in ATen's norms
#pragma omp simd reduction(+ : sum)
    for (int64_t k = 0; k < Fg; ++k) sum += p[k];
    const T m = sum / Fg;
#pragma omp simd reduction(+ : sq)
    for (int64_t k = 0; k < Fg; ++k) sq += (p[k] - m) * (p[k] - m);
    const T r = static_cast<T>(1.0 / std::sqrt(static_cast<double>(sq) / Fg + s.eps));
SEQNORM_SIMD
    for (int64_t k = 0; k < Fg; ++k) q[k] = (p[k] - m) * r;
    rstd[g] = r;
  }
}

// The backward of a group normalization of one row: d holds dL/dxhat on entry, dL/dx on exit.
template <typename T>
void group_norm_backward_row(int64_t G, T* d, const T* xhat, int64_t F, const T* rstd) {
  const int64_t Fg = F / G;
  for (int64_t g = 0; g < G; ++g) {
    T* p = d + g * Fg;
    const T* xh = xhat + g * Fg;
    T m1 = 0, m2 = 0;
#pragma omp simd reduction(+ : m1, m2)
    for (int64_t k = 0; k < Fg; ++k) {
      m1 += p[k];
      m2 += p[k] * xh[k];
    }
    const T a = static_cast<T>(m1 / Fg), b = static_cast<T>(m2 / Fg), r = rstd[g];
SEQNORM_SIMD
    for (int64_t k = 0; k < Fg; ++k) p[k] = r * (p[k] - a - xh[k] * b);
  }
}

// The backward of batch normalization of a step, all rows at once. Rows of samples that are not
// valid were normalized but took no part in the statistics: their derivative is rstd times
// theirs on entry. (In the recurrence they are zero on entry and stay zero.)
template <typename T>
void batch_norm_backward(T* d, const T* xhat, int64_t N, int64_t F, const bool* valid,
                         const T* rstd, bool use, int64_t count) {
  if (!use) {  // running statistics are constants
    for (int64_t n = 0; n < N; ++n)
SEQNORM_SIMD
      for (int64_t f = 0; f < F; ++f) d[n * F + f] *= rstd[f];
    return;
  }
  for_features(N, F, [&](int64_t lo, int64_t hi) {
    const int64_t W = hi - lo;
    std::vector<double> m1(W, 0.0), m2(W, 0.0);
    for (int64_t n = 0; n < N; ++n) {  // every row's output used the statistics
      const T* p = d + n * F + lo;
      const T* xh = xhat + n * F + lo;
      for (int64_t f = 0; f < W; ++f) {
        m1[f] += p[f];
        m2[f] += p[f] * xh[f];
      }
    }
    std::vector<T> a(W), b(W);
    for (int64_t f = 0; f < W; ++f) {
      a[f] = static_cast<T>(m1[f] / count);
      b[f] = static_cast<T>(m2[f] / count);
    }
    const T* r = rstd + lo;
    for (int64_t n = 0; n < N; ++n) {
      T* p = d + n * F + lo;
      const T* xh = xhat + n * F + lo;
      if (valid && !valid[n]) {
SEQNORM_SIMD
        for (int64_t f = 0; f < W; ++f) p[f] *= r[f];
        continue;
      }
SEQNORM_SIMD
      for (int64_t f = 0; f < W; ++f) p[f] = r[f] * (p[f] - a[f] - xh[f] * b[f]);
    }
  });
}

// Per-step storage of a norm's statistics: rstd (T, N, G) for group, (T, 2, F) mean and rstd
// for batch; and the batch mean and biased variance (2, T, F) for the running statistics.
struct NormBuffers {
  Tensor stats, bstats;
  int64_t stride;
  NormBuffers(const Norm& s, int64_t T, int64_t N, int64_t F, const Tensor& like) {
    const auto o = like.options();
    stride = s.kind == kGroup ? N * s.groups : s.kind == kBatch ? 2 * F : 0;
    stats = at::empty({T * stride}, o);
    bstats = at::zeros({2, s.kind == kBatch ? T : 0, F}, o);
  }
};

std::vector<int64_t> valid_counts(const bool* m, int64_t T, int64_t N) {
  std::vector<int64_t> count(T, N);
  if (m)
    for (int64_t t = 0; t < T; ++t) count[t] = std::count(m + t * N, m + (t + 1) * N, true);
  return count;
}

const bool* mask_ptr(const OptTensor& mask) {
  return mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;
}

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

void check_inputs(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, int64_t gates) {
  TORCH_CHECK(gx.dim() == 3 && gx.is_contiguous(), "gx must be contiguous (T, N, F)");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == gx.size(1), "h0 must be (N, H)");
  TORCH_CHECK(gx.size(2) == gates * h0.size(1), "gx must have gates * H features");
  TORCH_CHECK(w_hh.size(0) == gx.size(2) && w_hh.size(1) == h0.size(1), "w_hh must be (F, H)");
  TORCH_CHECK(gx.device().is_cpu(), "the fused recurrence runs on CPU");
}

// Runs body(n) for every row (sample) n, split over ATen's threads when the rows are wide enough
// to pay for it.
template <typename Body>
void for_rows(int64_t N, int64_t width, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  at::parallel_for(0, N, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; ++n) body(n);
  });
}

// A per-feature sum in double, one copy per thread so that rows can run in parallel.
struct Accumulator {
  int64_t F;
  std::vector<double> sums;
  explicit Accumulator(int64_t F_) : F(F_), sums(F_ * at::get_num_threads(), 0.0) {}
  double* mine() { return sums.data() + at::get_thread_num() * F; }
  Tensor total(const at::TensorOptions& o) {
    Tensor out = at::zeros({F}, o.dtype(at::kDouble));
    double* p = out.data_ptr<double>();
    for (size_t k = 0; k < sums.size(); ++k) p[k % F] += sums[k];
    return out.to(o.dtype());
  }
};

// The backward hands its per-step gradients on a chunk of K steps at a time (rows of about 512
// samples), while they are in cache, to the large matrix products of WeightGrad and InputGrad.
int64_t chunk_steps(int64_t T, int64_t N) {
  return std::clamp<int64_t>(512 / std::max<int64_t>(N, 1), 1, std::max<int64_t>(T, 1));
}

// dW_hh = sum_t dgh_t^T h_{t-1}, as one matrix product per chunk: the backward writes step t's
// dgh (N, F) into at(t) and calls done(t), walking t down from T - 1. ring: a (K, N, F) buffer to
// share (an LSTM without norm, whose dgh is its dgx), else its own.
struct WeightGrad {
  Tensor dw, buf, hs;
  int64_t K, T, N, F, H;
  WeightGrad(const Tensor& hs_, int64_t T_, int64_t N_, int64_t F_, const Tensor& ring)
      : hs(hs_), K(chunk_steps(T_, N_)), T(T_), N(N_), F(F_), H(hs_.size(2)) {
    dw = at::zeros({F, H}, hs.options());
    buf = ring.defined() ? ring : at::empty({K, N, F}, hs.options());
  }
  Tensor at(int64_t t) { return buf[t % K]; }
  void done(int64_t t) {
    if (t % K) return;
    const int64_t len = std::min(K, T - t);
    dw.addmm_(buf.narrow(0, 0, len).reshape({len * N, F}).t(),
              hs.narrow(0, t, len).reshape({len * N, H}));
  }
};

// The input half of the gates, y = gamma * N(x W_ih^T) + beta over (T, N, F): group norm runs
// all T * N rows as one step, rows in parallel; batch norm runs N rows per step, steps in
// parallel and each step's rows in turn (a nested at::parallel_for would run inline as thread 0,
// which would break the per-thread Accumulator).
struct InputRows {
  int64_t steps, rows;
  bool batch;
  InputRows(const Norm& s, int64_t T, int64_t N)
      : steps(s.kind == kBatch ? T : 1), rows(s.kind == kBatch ? N : T * N),
        batch(s.kind == kBatch) {}
  template <typename Body>
  void each_row(int64_t F, const Body& body) const {
    if (!batch) return for_rows(rows, F, body);
    for (int64_t n = 0; n < rows; ++n) body(n);
  }
};

// The input half's gradients, a chunk of steps at a time: the backward writes step t's dL/dy
// (N, F) into at(t) and calls done(t), walking t down from T - 1 as for WeightGrad. Each chunk
// goes through the norm's backward and gain (in place: dy becomes dL/d(x W_ih^T)), then into
// dW_ih and dx as matrix products, while it is in cache; no (T, N, F) gradient is ever stored.
struct InputGrad {
  Norm s;
  Tensor x, w_ih, gamma, xhat, stats, buf, dx, dw;
  const bool* m;
  const int64_t* count;
  int64_t K, T, N, F, stride;
  Accumulator dgamma, dbeta;
  // needs: dx, dW_ih, dgamma, dbeta; xhat and stats from input_norm_forward (kind not none).
  InputGrad(const Norm& s_, const Tensor& x_, const Tensor& w_ih_, const OptTensor& gamma_,
            const OptTensor& xhat_, const OptTensor& stats_, std::array<bool, 4> needs,
            const bool* m_, const int64_t* count_, int64_t T_, int64_t N_, int64_t F_,
            const at::TensorOptions& o)
      : s(s_), m(m_), count(count_), K(chunk_steps(T_, N_)), T(T_), N(N_), F(F_), stride(0),
        dgamma(needs[2] && s_.kind != kNone ? F_ : 0), dbeta(needs[3] ? F_ : 0) {
    buf = at::empty({K, N, F}, o);
    if (s.kind != kNone) {
      TORCH_CHECK(xhat_.has_value() && stats_.has_value(), "a normalized input needs its stats");
      xhat = *xhat_;
      stats = *stats_;
      stride = T ? stats.numel() / T : 0;  // a step's: rstd (N, G) for group, mean, rstd for batch
    }
    if (gamma_.has_value() && gamma_->defined()) gamma = *gamma_;
    if (needs[0]) {
      w_ih = w_ih_;
      dx = buffer({T, N, w_ih.size(1)}, o);
    }
    if (needs[1]) {
      x = x_.contiguous();
      dw = at::zeros_like(w_ih_);
    }
  }
  Tensor at(int64_t t) { return buf[t % K]; }
  void done(int64_t t) {
    if (t % K) return;
    const int64_t len = std::min(K, T - t);
    const Tensor chunk = buf.narrow(0, 0, len);
    AT_DISPATCH_FLOATING_TYPES(buf.scalar_type(), "seqnorm_input_backward", [&] {
      backward<scalar_t>(t, len, chunk.data_ptr<scalar_t>());
    });
    const Tensor rows = chunk.reshape({len * N, F});
    if (dw.defined()) dw.addmm_(rows.t(), x.narrow(0, t, len).reshape({len * N, x.size(2)}));
    if (dx.defined()) {
      Tensor out = dx.narrow(0, t, len).view({len * N, dx.size(2)});
      at::mm_out(out, rows, w_ih);
    }
  }

 private:
  // dy (len, N, F) of steps t0.. into dL/d(x W_ih^T) in place, accumulating dgamma and dbeta.
  template <typename T_>
  void backward(int64_t t0, int64_t len, T_* dy) {
    const bool dg = dgamma.F > 0, db = dbeta.F > 0;
    if (s.kind == kNone && !db) return;
    const T_* gam = gamma.defined() ? gamma.data_ptr<T_>() : nullptr;
    const InputRows ir(s, len, N);  // without a norm all rows in parallel, as for group norm
    at::parallel_for(0, ir.steps, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t at_row = k * ir.rows, t = t0 + k;
        T_* dyt = dy + at_row * F;
        const T_* xht = s.kind == kNone ? nullptr : xhat.data_ptr<T_>() + (t0 * N + at_row) * F;
        const T_* st = s.kind == kNone ? nullptr : stats.data_ptr<T_>() + t * stride;
        ir.each_row(F, [&](int64_t n) {
          T_* d = dyt + n * F;
          if (db) {
            double* b = dbeta.mine();
SEQNORM_SIMD
            for (int64_t f = 0; f < F; ++f) b[f] += d[f];
          }
          if (s.kind == kNone) return;
          const T_* xh = xht + n * F;
          if (dg) {
            double* g = dgamma.mine();
SEQNORM_SIMD
            for (int64_t f = 0; f < F; ++f) g[f] += d[f] * xh[f];
          }
          if (gam) {
SEQNORM_SIMD
            for (int64_t f = 0; f < F; ++f) d[f] *= gam[f];
          }
          if (s.kind == kGroup) group_norm_backward_row(s.groups, d, xh, F, st + n * s.groups);
        });
        if (s.kind == kBatch)
          batch_norm_backward(dyt, xht, N, F, m ? m + t * N : nullptr, st + F,
                              s.training && count[t] >= 2, count[t]);
      }
    });
  }
};

// The per-step product y = x W^T with a fixed W (out, in). For a large float32 W (2 MiB and
// more, an LSTM of hidden 512 and up) oneDNN's blocked weights, packed once per sequence, beat
// sgemm by 1.1-2x at every batch size on the 2-core AVX2 machine of benchmarks/bench_rnn.py (they
// are the kernels torch.nn.LSTM runs on CPU); at 1 MiB they win by 6-11% in the forward product
// from batch 8 on, tie in the backward one, and lose 2x at batch 1. Otherwise (and in float64)
// at::mm runs with W^T made contiguous once.
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
  // x W^T: in out for at::mm, a new tensor from oneDNN (copying it into out would cost more).
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

// Which buffer slots a step uses. Training keeps every step's activations and states for the
// backward; without a backward (keep false) one slot of activations and a ring of two states
// suffice, and stay in cache.
struct Steps {
  int64_t kept, states;
  bool keep;
  Steps(int64_t T, bool keep_) : kept(keep_ ? T : 1), states(keep_ ? T + 1 : 2), keep(keep_) {}
  int64_t act(int64_t t) const { return keep ? t : 0; }        // activations of step t
  int64_t state(int64_t t) const { return keep ? t : t & 1; }  // the state before step t
};

// A norm's view of one step: its statistics (batch statistics are computed over all rows here,
// before the rows run; group statistics by each row as it is normalized).
template <typename T>
struct StepNorm {
  const Norm& s;
  int64_t F;
  T* st;  // group: rstd (N, G); batch: mean (F) and rstd (F)
  StepNorm(const Norm& s_, NormBuffers& buf, int64_t t, int64_t T_, int64_t N, int64_t F_,
           const T* z, const bool* valid, int64_t count, const T* run_mean, const T* run_var)
      : s(s_), F(F_), st(buf.stats.data_ptr<T>() + t * buf.stride) {
    if (s.kind != kBatch) return;
    T* bs = buf.bstats.data_ptr<T>();
    batch_stats(s, z, N, F, valid, count, run_mean + t * F, run_var + t * F, st, st + F,
                bs + t * F, bs + (T_ + t) * F);
  }
  void row(int64_t n, const T* z, T* xhat) const {
    normalize_row(s, z, xhat, F, st + n * s.groups, st, st + F);
  }
};

// ---------------------------------------------------------------------------------------------
// LSTM: gates = gx + Nh(h W_hh^T), c' = sig(f) c + sig(i) tanh(g), h' = sig(o) tanh(Nc(c')).

std::vector<Tensor> lstm_forward(const Tensor& gx, const Tensor& h0_, const Tensor& c0_,
                                 const Tensor& w_hh, const OptTensor& mask, int64_t kind,
                                 int64_t groups, double eps, bool training,
                                 const OptTensor& gamma_hh, const OptTensor& gamma_c,
                                 const OptTensor& beta_c, const OptTensor& run_mean_hh,
                                 const OptTensor& run_var_hh, const OptTensor& run_mean_c,
                                 const OptTensor& run_var_c, bool keep) {
  check_inputs(gx, h0_, w_hh, 4);
  const Norm s{kind, groups, eps, training};
  const int64_t T = gx.size(0), N = gx.size(1), F = gx.size(2), H = F / 4;
  const bool normed = kind != kNone;
  const auto o = gx.options();
  const Steps st(T, keep);
  Tensor out = buffer({T, N, H}, o);
  Tensor hs = buffer({st.states, N, H}, o);  // h_{t-1} for step t is hs[st.state(t)]
  Tensor cs = buffer({st.states, N, H}, o);
  // sig(i), sig(f), tanh(g), sig(o) of every step, over gx (the caller's own: each row of gx is
  // read before its activations are written, feature by feature); one slot without a backward
  Tensor acts = keep ? gx : at::empty({1, N, F}, o);
  Tensor xhat_hh = buffer({normed ? st.kept : 1, N, F}, o);  // x_hat of h W_hh^T
  Tensor xhat_c = buffer({normed ? st.kept : 0, N, H}, o);   // x_hat of c'
  NormBuffers nb_hh(s, T, N, F, gx), nb_c(s, T, N, H, gx);
  const bool* m = mask_ptr(mask);
  const std::vector<int64_t> count = valid_counts(m, T, N);
  hs[0].copy_(h0_);
  cs[0].copy_(c0_);
  const Product product(w_hh, N, true);  // h W_hh^T

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "seqnorm_lstm_forward", [&] {
    using T_ = scalar_t;
    const T_* gam_hh = ptr_or_null<T_>(gamma_hh);
    const T_* gam_c = ptr_or_null<T_>(gamma_c);
    const T_* bet_c = ptr_or_null<T_>(beta_c);
    Tensor ybuf = at::empty({N, H}, o);  // Nc(c') of each row
    const bool batch = kind == kBatch;
    for (int64_t t = 0; t < T; ++t) {
      const bool* valid = m ? m + t * N : nullptr;
      const int64_t k = st.act(t), now = st.state(t), next = st.state(t + 1);
      // z = h W_hh^T (in the x_hat slot, or oneDNN's own tensor), normalized into the slot
      const Tensor z_t = product(hs[now], xhat_hh[normed ? k : 0]);
      const T_* z = z_t.data_ptr<T_>();
      T_* xh = xhat_hh.data_ptr<T_>() + (normed ? k : 0) * N * F;
      const StepNorm<T_> norm_hh(s, nb_hh, t, T, N, F, z, valid, count[t],
                                 ptr_or_null<T_>(run_mean_hh), ptr_or_null<T_>(run_var_hh));
      const T_* g = gx.data_ptr<T_>() + t * N * F;
      T_* a = acts.data_ptr<T_>() + k * N * F;
      const T_* c_prev = cs.data_ptr<T_>() + now * N * H;
      T_* c_new = cs.data_ptr<T_>() + next * N * H;
      T_* xc = normed ? xhat_c.data_ptr<T_>() + k * N * H : nullptr;
      const T_* h_prev = hs.data_ptr<T_>() + now * N * H;
      T_* h_new = hs.data_ptr<T_>() + next * N * H;
      T_* out_t = out.data_ptr<T_>() + t * N * H;
      std::optional<StepNorm<T_>> norm_c;
      auto output = [&](int64_t n) {  // h' = sig(o) tanh(Nc(c')), or the state kept
        if (valid && !valid[n]) {
          std::copy(h_prev + n * H, h_prev + (n + 1) * H, h_new + n * H);
          std::copy(c_prev + n * H, c_prev + (n + 1) * H, c_new + n * H);
          std::fill(out_t + n * H, out_t + (n + 1) * H, T_(0));
          if (normed) std::fill(xc + n * H, xc + (n + 1) * H, T_(0));  // read by the backward
          return;
        }
        const T_* on = a + n * F + 3 * H;
        T_* hn = h_new + n * H;
        T_* y = ybuf.data_ptr<T_>() + n * H;
        if (normed) {
          norm_c->row(n, c_new + n * H, xc + n * H);
          const T_* xcn = xc + n * H;
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) y[j] = gam_c[j] * xcn[j] + bet_c[j];
        } else {
          std::copy(c_new + n * H, c_new + (n + 1) * H, y);
        }
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) hn[j] = on[j] * tanh_(y[j]);
        std::copy(hn, hn + H, out_t + n * H);
      };
      if (normed && !batch)  // group statistics come row by row
        norm_c.emplace(s, nb_c, t, T, N, H, c_new, valid, count[t], nullptr, nullptr);
      for_rows(N, F, [&](int64_t n) {  // gates and the new cell state (and, unless batch, h')
        const T_* gn = g + n * F;
        const T_* zn = z + n * F;
        T_* an = a + n * F;
        if (normed) {
          T_* xn = xh + n * F;
          norm_hh.row(n, zn, xn);
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) an[f] = gn[f] + gam_hh[f] * xn[f];
        } else {
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) an[f] = gn[f] + zn[f];
        }
SEQNORM_SIMD
        for (int64_t f = 0; f < 2 * H; ++f) an[f] = sigmoid(an[f]);
SEQNORM_SIMD
        for (int64_t f = 2 * H; f < 3 * H; ++f) an[f] = tanh_(an[f]);
SEQNORM_SIMD
        for (int64_t f = 3 * H; f < F; ++f) an[f] = sigmoid(an[f]);
        const T_* cp = c_prev + n * H;
        T_* cn = c_new + n * H;
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) cn[j] = an[H + j] * cp[j] + an[j] * an[2 * H + j];
        if (!batch) output(n);
      });
      if (batch) {  // batch statistics of c' need every row's c' first
        norm_c.emplace(s, nb_c, t, T, N, H, c_new, valid, count[t], ptr_or_null<T_>(run_mean_c),
                       ptr_or_null<T_>(run_var_c));
        for_rows(N, H, output);
      }
    }
  });
  Tensor counts = at::tensor(count, o.dtype(at::kLong));
  return {out,          hs[st.state(T)].clone(), cs[st.state(T)].clone(), hs, cs, acts, xhat_hh,
          nb_hh.stats,  xhat_c, nb_c.stats, nb_hh.bstats, nb_c.bstats, counts};
}

// The input half's arguments of a backward: the layer input x (T, N, I), W_ih (F, I), its norm
// (kind, groups, eps, training) and gain, input_norm_forward's xhat and stats, and which of dx,
// dW_ih, dgamma_ih, dbeta_ih to compute.
#define SEQNORM_INPUT_ARGS                                                                    \
  const Tensor& x, const Tensor& w_ih, int64_t kind_ih, int64_t groups_ih, double eps_ih,    \
      bool training_ih, const OptTensor& gamma_ih, const OptTensor& xhat_ih,                 \
      const OptTensor& stats_ih, std::array<bool, 4> needs_ih
#define SEQNORM_INPUT_SCHEMA                                                                  \
  "Tensor x, Tensor w_ih, int kind_ih, int groups_ih, float eps_ih, bool training_ih, "      \
  "Tensor? gamma_ih, Tensor? xhat_ih, Tensor? stats_ih, bool[4] needs_ih"

// Returns dx, dw_ih, dgamma_ih, dbeta_ih, dh0, dc0, dw_hh, dgamma_hh, dgamma_c, dbeta_c (those
// not asked for or absent are undefined or empty).
std::vector<Tensor> lstm_backward(const Tensor& grad_out, const Tensor& grad_hn,
                                  const Tensor& grad_cn, const Tensor& w_hh,
                                  const OptTensor& mask, int64_t kind, int64_t groups, double eps,
                                  bool training, const OptTensor& gamma_hh,
                                  const OptTensor& gamma_c, const OptTensor& beta_c,
                                  const Tensor& hs, const Tensor& cs, const Tensor& acts,
                                  const Tensor& xhat_hh,
                                  const Tensor& stats_hh, const Tensor& xhat_c,
                                  const Tensor& stats_c, const Tensor& counts,
                                  SEQNORM_INPUT_ARGS) {
  const Norm s{kind, groups, eps, training};
  const int64_t T = acts.size(0), N = acts.size(1), F = acts.size(2), H = F / 4;
  const bool normed = kind != kNone, batch = kind == kBatch;
  const Tensor gout = grad_out.contiguous();
  const Product product(w_hh.t(), N, false);  // dgh W_hh
  Tensor dh = grad_hn.contiguous().clone(), dc = grad_cn.contiguous().clone();
  const int64_t* count = counts.data_ptr<int64_t>();
  const bool* m = mask_ptr(mask);
  InputGrad ig({kind_ih, groups_ih, eps_ih, training_ih}, x, w_ih, gamma_ih, xhat_ih, stats_ih,
               needs_ih, m, count, T, N, F, acts.options());  // dL/dgx, a chunk at a time
  WeightGrad wg(hs, T, N, F, normed ? Tensor() : ig.buf);  // dL/d(h W_hh^T) is dgx without norm
  Tensor dxc = at::empty({N, H}, acts.options()), tcb = at::empty({N, H}, acts.options());
  Tensor dprev_buf = at::empty({N, H}, acts.options());  // dgh W_hh of a step (at::mm writes here)
  Accumulator dgamma_hh(normed ? F : 0), dgamma_c(normed ? H : 0), dbeta_c(normed ? H : 0);
  const int64_t stride_hh = T ? stats_hh.numel() / T : 0, stride_c = T ? stats_c.numel() / T : 0;

  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "seqnorm_lstm_backward", [&] {
    using T_ = scalar_t;
    const T_* gam_hh = ptr_or_null<T_>(gamma_hh);
    const T_* gam_c = ptr_or_null<T_>(gamma_c);
    const T_* bet_c = ptr_or_null<T_>(beta_c);
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    T_* dx = dxc.data_ptr<T_>();
    T_* tc = tcb.data_ptr<T_>();
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool* valid = m ? m + t * N : nullptr;
      const bool use = batch && training && count[t] >= 2;
      const T_* a = acts.data_ptr<T_>() + t * N * F;
      T_* dga = ig.at(t).data_ptr<T_>();
      Tensor dgh_t = wg.at(t);
      T_* dnp = dgh_t.data_ptr<T_>();
      const T_* go = gout.data_ptr<T_>() + t * N * H;
      const T_* c_prev = cs.data_ptr<T_>() + t * N * H;
      const T_* c_new = cs.data_ptr<T_>() + (t + 1) * N * H;
      const T_* xc = normed ? xhat_c.data_ptr<T_>() + t * N * H : nullptr;
      const T_* st_c = normed ? stats_c.data_ptr<T_>() + t * stride_c : nullptr;
      // dL/dc' through h' = sig(o) tanh(Nc(c')), into dx (zero for samples not valid).
      for_rows(N, H, [&](int64_t n) {
        T_* dxn = dx + n * H;
        if (valid && !valid[n]) {
          std::fill(dxn, dxn + H, T_(0));
          return;
        }
        const T_* on = a + n * F + 3 * H;
        T_* dhn = dhp + n * H;
        T_* tcn = tc + n * H;
        const T_* gon = go + n * H;
        if (normed) {
          const T_* xcn = xc + n * H;
          double* dgam_c = dgamma_c.mine();
          double* dbet_c = dbeta_c.mine();
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) tcn[j] = tanh_(gam_c[j] * xcn[j] + bet_c[j]);
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) {
            dhn[j] += gon[j];
            const T_ dy = dhn[j] * on[j] * (1 - tcn[j] * tcn[j]);
            dgam_c[j] += dy * xcn[j];
            dbet_c[j] += dy;
            dxn[j] = dy * gam_c[j];
          }
          if (!batch) group_norm_backward_row(s.groups, dxn, xcn, H, st_c + n * s.groups);
        } else {
          const T_* cn = c_new + n * H;
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) tcn[j] = tanh_(cn[j]);
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) {
            dhn[j] += gon[j];
            dxn[j] = dhn[j] * on[j] * (1 - tcn[j] * tcn[j]);
          }
        }
      });
      if (batch) batch_norm_backward(dx, xc, N, H, valid, st_c + H, use, count[t]);
      const T_* xh = normed ? xhat_hh.data_ptr<T_>() + t * N * F : nullptr;
      for_rows(N, F, [&](int64_t n) {  // through c' = sig(f) c + sig(i) tanh(g) to the gates
        const T_* an = a + n * F;
        T_* dan = dga + n * F;
        if (valid && !valid[n]) {
          std::fill(dan, dan + F, T_(0));
          if (normed) std::fill(dnp + n * F, dnp + (n + 1) * F, T_(0));
          return;
        }
        const T_* dxn = dx + n * H;
        const T_* cp = c_prev + n * H;
        const T_* dhn = dhp + n * H;
        const T_* tcn = tc + n * H;
        T_* dcn = dcp + n * H;
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) {
          const T_ i = an[j], f = an[H + j], g = an[2 * H + j], o = an[3 * H + j];
          const T_ dct = dcn[j] + dxn[j];
          dan[j] = dct * g * i * (1 - i);
          dan[H + j] = dct * cp[j] * f * (1 - f);
          dan[2 * H + j] = dct * i * (1 - g * g);
          dan[3 * H + j] = dhn[j] * tcn[j] * o * (1 - o);
          dcn[j] = dct * f;
        }
        if (normed) {  // through gates = gx + gamma * x_hat(h W_hh^T)
          const T_* xn = xh + n * F;
          T_* dnn = dnp + n * F;
          double* dgam_hh = dgamma_hh.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) {
            dgam_hh[f] += dan[f] * xn[f];
            dnn[f] = dan[f] * gam_hh[f];
          }
          if (!batch)
            group_norm_backward_row(s.groups, dnn, xn, F,
                                    stats_hh.data_ptr<T_>() + t * stride_hh + n * s.groups);
        }
      });
      if (batch)
        batch_norm_backward(dnp, xh, N, F, valid, stats_hh.data_ptr<T_>() + t * stride_hh + F,
                            use, count[t]);
      const Tensor dprev = product(dgh_t, dprev_buf);  // (N, H); zero rows where not valid
      const T_* dp = dprev.data_ptr<T_>();
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) continue;  // the state passed through: dh stays
        std::copy(dp + n * H, dp + (n + 1) * H, dhp + n * H);
      }
      wg.done(t);  // before ig.done(t), which overwrites a ring it may share
      ig.done(t);
    }
  });
  const auto ao = acts.options();
  return {ig.dx, ig.dw, ig.dgamma.total(ao), ig.dbeta.total(ao), dh, dc, wg.dw,
          dgamma_hh.total(ao), dgamma_c.total(ao), dbeta_c.total(ao)};
}

// ---------------------------------------------------------------------------------------------
// GRU: gh = Nh(h W_hh^T) + b_hh, r = sig(gx_r + gh_r), z = sig(gx_z + gh_z),
// n = tanh(gx_n + r gh_n), h' = (1 - z) n + z h.

std::vector<Tensor> gru_forward(const Tensor& gx, const Tensor& h0_, const Tensor& w_hh,
                                const OptTensor& bias_hh, const OptTensor& mask, int64_t kind,
                                int64_t groups, double eps, bool training,
                                const OptTensor& gamma_hh, const OptTensor& run_mean_hh,
                                const OptTensor& run_var_hh, bool keep) {
  check_inputs(gx, h0_, w_hh, 3);
  const Norm s{kind, groups, eps, training};
  const int64_t T = gx.size(0), N = gx.size(1), F = gx.size(2), H = F / 3;
  const bool normed = kind != kNone;
  const auto o = gx.options();
  const Steps st(T, keep);
  Tensor out = buffer({T, N, H}, o);
  Tensor hs = buffer({st.states, N, H}, o);
  Tensor acts = keep ? gx : at::empty({1, N, F}, o);      // r, z, n (over gx, as in the LSTM)
  Tensor ghn = buffer({st.kept, N, H}, o);                // gh_n, the recurrent half of n
  Tensor xhat = buffer({normed ? st.kept : 1, N, F}, o);  // x_hat of h W_hh^T
  NormBuffers nb(s, T, N, F, gx);
  const bool* m = mask_ptr(mask);
  const std::vector<int64_t> count = valid_counts(m, T, N);
  hs[0].copy_(h0_);
  const Product product(w_hh, N, true);

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "seqnorm_gru_forward", [&] {
    using T_ = scalar_t;
    const T_* gam = ptr_or_null<T_>(gamma_hh);
    const T_* b = ptr_or_null<T_>(bias_hh);
    Tensor ghbuf = at::empty({N, F}, o);  // Nh(h W_hh^T) + b_hh of each row
    for (int64_t t = 0; t < T; ++t) {
      const bool* valid = m ? m + t * N : nullptr;
      const int64_t k = st.act(t), now = st.state(t), next = st.state(t + 1);
      const Tensor z_t = product(hs[now], xhat[normed ? k : 0]);  // as in the LSTM
      const T_* z = z_t.data_ptr<T_>();
      T_* xh = xhat.data_ptr<T_>() + (normed ? k : 0) * N * F;
      const StepNorm<T_> norm(s, nb, t, T, N, F, z, valid, count[t], ptr_or_null<T_>(run_mean_hh),
                              ptr_or_null<T_>(run_var_hh));
      const T_* g = gx.data_ptr<T_>() + t * N * F;
      T_* a = acts.data_ptr<T_>() + k * N * F;
      const T_* h_prev = hs.data_ptr<T_>() + now * N * H;
      T_* h_new = hs.data_ptr<T_>() + next * N * H;
      T_* out_t = out.data_ptr<T_>() + t * N * H;
      for_rows(N, F, [&](int64_t n) {
        const T_* gn = g + n * F;
        const T_* xn = normed ? xh + n * F : z + n * F;
        if (normed) norm.row(n, z + n * F, xh + n * F);
        T_* an = a + n * F;
        T_* ghnn = ghn.data_ptr<T_>() + (k * N + n) * H;
        T_* gh = ghbuf.data_ptr<T_>() + n * F;
        if (gam) {
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) gh[f] = gam[f] * xn[f];
        } else {
          std::copy(xn, xn + F, gh);
        }
        if (b) {
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) gh[f] += b[f];
        }
SEQNORM_SIMD
        for (int64_t f = 0; f < 2 * H; ++f) an[f] = sigmoid(gn[f] + gh[f]);
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) {
          ghnn[j] = gh[2 * H + j];
          an[2 * H + j] = tanh_(gn[2 * H + j] + an[j] * gh[2 * H + j]);
        }
        T_* hn = h_new + n * H;
        const T_* hp = h_prev + n * H;
        if (valid && !valid[n]) {
          std::copy(hp, hp + H, hn);
          std::fill(out_t + n * H, out_t + (n + 1) * H, T_(0));
          return;
        }
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) hn[j] = (1 - an[H + j]) * an[2 * H + j] + an[H + j] * hp[j];
        std::copy(hn, hn + H, out_t + n * H);
      });
    }
  });
  Tensor counts = at::tensor(count, o.dtype(at::kLong));
  return {out, hs[st.state(T)].clone(), hs, acts, ghn, xhat, nb.stats, nb.bstats, counts};
}

// Returns dx, dw_ih, dgamma_ih, dbeta_ih, dh0, dw_hh, dbias_hh, dgamma_hh (as for the LSTM).
std::vector<Tensor> gru_backward(const Tensor& grad_out, const Tensor& grad_hn,
                                 const Tensor& w_hh, bool has_bias, const OptTensor& mask,
                                 int64_t kind, int64_t groups, double eps, bool training,
                                 const OptTensor& gamma_hh, const Tensor& hs,
                                 const Tensor& acts, const Tensor& ghn, const Tensor& xhat,
                                 const Tensor& stats, const Tensor& counts, SEQNORM_INPUT_ARGS) {
  const Norm s{kind, groups, eps, training};
  const int64_t T = acts.size(0), N = acts.size(1), F = acts.size(2), H = F / 3;
  const bool normed = kind != kNone, batch = kind == kBatch;
  const Tensor gout = grad_out.contiguous();
  const Product product(w_hh.t(), N, false);  // dgh W_hh
  Tensor dh = grad_hn.contiguous().clone();
  const int64_t* count = counts.data_ptr<int64_t>();
  const bool* m = mask_ptr(mask);
  InputGrad ig({kind_ih, groups_ih, eps_ih, training_ih}, x, w_ih, gamma_ih, xhat_ih, stats_ih,
               needs_ih, m, count, T, N, F, acts.options());  // dL/dgx, a chunk at a time
  WeightGrad wg(hs, T, N, F, Tensor());  // dL/d(h W_hh^T)
  Tensor dprev_buf = at::empty({N, H}, acts.options());  // as in the LSTM
  Accumulator dbias(has_bias ? F : 0), dgamma(normed ? F : 0);
  const int64_t stride = T ? stats.numel() / T : 0;

  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "seqnorm_gru_backward", [&] {
    using T_ = scalar_t;
    const T_* gam = ptr_or_null<T_>(gamma_hh);
    T_* dhp = dh.data_ptr<T_>();
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool* valid = m ? m + t * N : nullptr;
      const T_* a = acts.data_ptr<T_>() + t * N * F;
      T_* dga = ig.at(t).data_ptr<T_>();
      Tensor dgh_t = wg.at(t);
      T_* dnp = dgh_t.data_ptr<T_>();
      const T_* go = gout.data_ptr<T_>() + t * N * H;
      const T_* h_prev = hs.data_ptr<T_>() + t * N * H;
      const T_* xh = normed ? xhat.data_ptr<T_>() + t * N * F : nullptr;
      const T_* st = normed ? stats.data_ptr<T_>() + t * stride : nullptr;
      for_rows(N, F, [&](int64_t n) {
        const T_* an = a + n * F;
        T_* dan = dga + n * F;
        T_* dnn = dnp + n * F;
        if (valid && !valid[n]) {
          std::fill(dan, dan + F, T_(0));
          std::fill(dnn, dnn + F, T_(0));
          return;
        }
        const T_* gnn = ghn.data_ptr<T_>() + (t * N + n) * H;
        const T_* hp = h_prev + n * H;
        const T_* gon = go + n * H;
        T_* dhn = dhp + n * H;
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) {
          const T_ r = an[j], z = an[H + j], nn = an[2 * H + j];
          const T_ d = dhn[j] + gon[j];
          const T_ dpn = d * (1 - z) * (1 - nn * nn);
          const T_ dpr = dpn * gnn[j] * r * (1 - r);
          const T_ dpz = d * (hp[j] - nn) * z * (1 - z);
          dan[j] = dpr;
          dan[H + j] = dpz;
          dan[2 * H + j] = dpn;
          dnn[j] = dpr;
          dnn[H + j] = dpz;
          dnn[2 * H + j] = dpn * r;
          dhn[j] = d * z;  // the direct path; the one through W_hh is added below
        }
        if (has_bias) {
          double* db = dbias.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) db[f] += dnn[f];
        }
        if (normed) {
          const T_* xn = xh + n * F;
          double* dgam = dgamma.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) {
            dgam[f] += dnn[f] * xn[f];
            dnn[f] *= gam[f];
          }
          if (!batch) group_norm_backward_row(s.groups, dnn, xn, F, st + n * s.groups);
        }
      });
      if (batch)
        batch_norm_backward(dnp, xh, N, F, valid, st + F, training && count[t] >= 2, count[t]);
      const Tensor dprev = product(dgh_t, dprev_buf);
      const T_* dp = dprev.data_ptr<T_>();
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) continue;
        for (int64_t j = 0; j < H; ++j) dhp[n * H + j] += dp[n * H + j];
      }
      wg.done(t);
      ig.done(t);
    }
  });
  const auto ao = acts.options();
  return {ig.dx, ig.dw, ig.dgamma.total(ao), ig.dbeta.total(ao), dh, wg.dw, dbias.total(ao),
          dgamma.total(ao)};
}

// ---------------------------------------------------------------------------------------------
// The input projection x W^T + b of every step at once (x (T, N, I), W (F, I)), into a cached
// buffer. oneDNN's packed product is faster by a few percent (194.8 against 183.5 ms at shape C
// measured on the benchmark machine, and 11.7 against 12.5 ms at A), but only into a fresh
// output, which at C costs more in page faults than that.

Tensor project(const Tensor& x, const Tensor& w, const OptTensor& bias) {
  TORCH_CHECK(x.dim() == 3 && w.dim() == 2 && x.size(2) == w.size(1),
              "x must be (T, N, I) and w (F, I)");
  const int64_t T = x.size(0), N = x.size(1), F = w.size(0);
  Tensor out = buffer({T, N, F}, x.options());
  Tensor rows = out.view({T * N, F});
  const Tensor in = x.reshape({T * N, x.size(2)});
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(rows, *bias, in, w.t());
  } else {
    at::mm_out(rows, in, w.t());
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The input half of the gates: y = gamma * N(x) + beta for every step of x (T, N, F) at once,
// where x = x_t W_ih^T and beta holds the cell's biases. Batch norm runs the steps in parallel
// (each with its own statistics over its valid samples); group norm runs every row in parallel.
// This replaces the norm module's several passes (and, for batch norm, transposes) with one.

std::vector<Tensor> input_norm_forward(const Tensor& x, const OptTensor& mask, int64_t kind,
                                       int64_t groups, double eps, bool training,
                                       const OptTensor& gamma, const OptTensor& beta,
                                       const OptTensor& run_mean, const OptTensor& run_var,
                                       bool keep) {
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "x must be contiguous (T, N, F)");
  TORCH_CHECK(kind == kGroup || kind == kBatch, "input_norm needs a group or batch norm");
  const Norm s{kind, groups, eps, training};
  const int64_t T = x.size(0), N = x.size(1), F = x.size(2);
  const InputRows ir(s, T, N);
  // x is the caller's own temporary: x_hat overwrites it, and so does y without a backward.
  const Tensor& xhat = x;
  Tensor y = keep ? buffer(x.sizes(), x.options()) : x;
  NormBuffers nb(s, ir.steps, ir.rows, F, x);
  const bool* m = mask_ptr(mask);
  const std::vector<int64_t> count = valid_counts(m, T, N);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "seqnorm_input_norm_forward", [&] {
    using T_ = scalar_t;
    const T_* gam = ptr_or_null<T_>(gamma);
    const T_* bet = ptr_or_null<T_>(beta);
    at::parallel_for(0, ir.steps, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t t = lo; t < hi; ++t) {
        const int64_t at_row = t * ir.rows;
        const T_* xt = x.data_ptr<T_>() + at_row * F;
        const StepNorm<T_> norm(s, nb, t, ir.steps, ir.rows, F, xt, m ? m + t * N : nullptr,
                                count[t], ptr_or_null<T_>(run_mean), ptr_or_null<T_>(run_var));
        ir.each_row(F, [&](int64_t n) {
          T_* xh = xhat.data_ptr<T_>() + (at_row + n) * F;
          T_* yn = y.data_ptr<T_>() + (at_row + n) * F;
          norm.row(n, xt + n * F, xh);
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f)
            yn[f] = (gam ? gam[f] * xh[f] : xh[f]) + (bet ? bet[f] : T_(0));
        });
      }
    });
  });
  Tensor counts = at::tensor(count, x.options().dtype(at::kLong));
  return {y, xhat, nb.stats, nb.bstats, counts};
}

}  // namespace

TORCH_LIBRARY(seqnorm_fused, m) {
  m.def(
      "lstm_forward(Tensor(a!) gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? mask, int kind, "
      "int groups, float eps, bool training, Tensor? gamma_hh, Tensor? gamma_c, Tensor? beta_c, "
      "Tensor? run_mean_hh, Tensor? run_var_hh, Tensor? run_mean_c, Tensor? run_var_c, "
      "bool keep) -> Tensor[]",
      &lstm_forward);
  m.def(
      "lstm_backward(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor? mask, "
      "int kind, int groups, float eps, bool training, Tensor? gamma_hh, Tensor? gamma_c, "
      "Tensor? beta_c, Tensor hs, Tensor cs, Tensor acts, Tensor xhat_hh, "
      "Tensor stats_hh, Tensor xhat_c, Tensor stats_c, Tensor counts, " SEQNORM_INPUT_SCHEMA
      ") -> Tensor[]",
      &lstm_backward);
  m.def(
      "gru_forward(Tensor(a!) gx, Tensor h0, Tensor w_hh, Tensor? bias_hh, Tensor? mask, "
      "int kind, int groups, float eps, bool training, Tensor? gamma_hh, Tensor? run_mean_hh, "
      "Tensor? run_var_hh, bool keep) -> Tensor[]",
      &gru_forward);
  m.def(
      "gru_backward(Tensor grad_out, Tensor grad_hn, Tensor w_hh, bool has_bias, Tensor? mask, "
      "int kind, int groups, float eps, bool training, Tensor? gamma_hh, Tensor hs, "
      "Tensor acts, Tensor ghn, Tensor xhat, Tensor stats, Tensor counts, " SEQNORM_INPUT_SCHEMA
      ") -> Tensor[]",
      &gru_backward);
  m.def(
      "input_norm_forward(Tensor(a!) x, Tensor? mask, int kind, int groups, float eps, "
      "bool training, Tensor? gamma, Tensor? beta, Tensor? run_mean, Tensor? run_var, "
      "bool keep) -> Tensor[]",
      &input_norm_forward);
  m.def("project(Tensor x, Tensor w, Tensor? bias) -> Tensor", &project);
  m.def("cache_info() -> int[]", [] { return BufferCache::get().info(); });
  m.def("set_cache_limit(int bytes) -> ()", [](int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "set_cache_limit: bytes=", bytes, ", expected >= 0");
    BufferCache::get().set_limit(static_cast<size_t>(bytes));
  });
  m.def("empty_cache() -> ()", [] { BufferCache::get().empty(); });
}
