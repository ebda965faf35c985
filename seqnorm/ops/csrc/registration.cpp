// The kernels' operators, torch.ops.seqnorm_cpp.*, called by the CPU implementations of the
// recurrence operators in seqnorm/ops/library.py.
#include <torch/library.h>

#include "buffer_cache.h"
#include "input_half.h"
#include "kernels.h"
#include "products.h"

TORCH_LIBRARY(seqnorm_cpp, m) {
  using namespace seqnorm;
  m.def(
      "input_forward(Tensor x, Tensor w_ih, Tensor? bias, Tensor? gamma, Tensor? running_mean, "
      "Tensor? running_var, Tensor? mask, str norm, int groups, float eps, bool training, "
      "bool keep) -> Tensor[]",
      &input_forward);
  m.def(
      "lstm_forward(Tensor(a!) gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? w_hr, "
      "Tensor? gamma_hh, Tensor? gamma_c, Tensor? beta_c, Tensor? running_mean_hh, "
      "Tensor? running_var_hh, Tensor? running_mean_c, Tensor? running_var_c, Tensor? mask, "
      "str norm, int groups, float eps, bool training, bool keep) -> Tensor[]",
      &lstm_forward);
  m.def(
      "lstm_backward(Tensor grad_out, Tensor grad_h, Tensor grad_c, Tensor[] saved, Tensor x, "
      "Tensor w_ih, Tensor w_hh, Tensor? w_hr, Tensor? gamma_ih, Tensor? gamma_hh, "
      "Tensor? gamma_c, Tensor? beta_c, Tensor? mask, str norm, int groups, float eps, "
      "bool training, bool[11] needs) -> Tensor[]",
      &lstm_backward);
  m.def(
      "gru_forward(Tensor(a!) gx, Tensor h0, Tensor w_hh, Tensor? b_hh, Tensor? gamma_hh, "
      "Tensor? running_mean_hh, Tensor? running_var_hh, Tensor? mask, str norm, int groups, "
      "float eps, bool training, bool keep) -> Tensor[]",
      &gru_forward);
  m.def(
      "gru_backward(Tensor grad_out, Tensor grad_h, Tensor[] saved, Tensor x, Tensor w_ih, "
      "Tensor w_hh, Tensor? b_hh, Tensor? gamma_ih, Tensor? gamma_hh, Tensor? mask, str norm, "
      "int groups, float eps, bool training, bool[8] needs) -> Tensor[]",
      &gru_backward);
  m.def(
      "update_running_stats(Tensor(a!) running_mean, Tensor(b!) running_var, Tensor batch, "
      "Tensor counts, float momentum) -> ()",
      &update_running_stats);
  // the products before and after the time loop, as the kernels run them (for tests and
  // benchmarks/bench_products.py)
  m.def("large_product(Tensor(a!) out, Tensor a, Tensor b, bool accumulate) -> ()",
        [](Tensor& out, const Tensor& a, const Tensor& b, bool accumulate) {
          TORCH_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2 &&
                          out.size(0) == a.size(0) && a.size(1) == b.size(0) &&
                          out.size(1) == b.size(1) && out.is_contiguous(),
                      "large_product: out (M, N) contiguous, a (M, K) and b (K, N), got ",
                      out.sizes(), ", ", a.sizes(), " and ", b.sizes());
          large_product(out, a, b, accumulate);
        });
  m.def("product_timings() -> int", [] { return timings().load(); });
  m.def("loops_apart() -> int", [] { return loops_apart().load(); });
  // how the per-step product x W^T runs at this float32 shape
  m.def("per_step_product(int out_features, int in_features, int batch) -> str",
        [](int64_t out, int64_t in, int64_t batch) {
          return std::string(Product::name(Product(at::zeros({out, in}), batch).way));
        });
  // x W^T, `steps` times on the weights prepared once, as the time loop runs it, one way
  // (packed, brgemm or mm), or as chosen (""); the last result
  m.def("step_products(Tensor x, Tensor w, str way, int steps) -> Tensor",
        [](const Tensor& x, const Tensor& w, const std::string& way, int64_t steps) {
          TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1) && steps >= 1,
                      "step_products: x (N, in), w (out, in), steps >= 1, got ", x.sizes(),
                      ", ", w.sizes(), " and ", steps);
          const auto forced = way.empty() ? std::nullopt : std::optional(Product::named(way));
          const Product product(w, x.size(0), forced);
          const Tensor out = at::empty({x.size(0), w.size(0)}, x.options());
          Tensor y;
          for (int64_t t = 0; t < steps; ++t) y = product(x, out);
          return y;
        });
  m.def("chunk_steps(int steps, int batch) -> int", [](int64_t steps, int64_t batch) {
    return chunk_steps(steps, batch);  // the steps of a chunk of the backward's large products
  });
  m.def("cache_info() -> int[]", [] { return BufferCache::get().info(); });
  m.def("set_cache_limit(int bytes) -> ()", [](int64_t bytes) {
    TORCH_CHECK(bytes >= 0, "set_cache_limit: bytes=", bytes, ", expected >= 0");
    BufferCache::get().set_limit(static_cast<size_t>(bytes));
  });
  m.def("empty_cache() -> ()", [] { BufferCache::get().empty(); });
}
