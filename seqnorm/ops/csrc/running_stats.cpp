// Batch norm's running statistics moved towards the batch statistics of a sequence's steps, one
// step after the other (DESIGN.md section 2; the Python reference is seqnorm.functional's
// update_running, which computes the same in closed form).
#include "kernels.h"

namespace seqnorm {

void update_running_stats(Tensor& running_mean, Tensor& running_var, const Tensor& batch,
                          const Tensor& counts, double momentum) {
  TORCH_CHECK(running_mean.dim() == 2 && running_mean.is_contiguous() &&
                  running_var.sizes() == running_mean.sizes() && running_var.is_contiguous() &&
                  running_var.scalar_type() == running_mean.scalar_type(),
              "update_running_stats: running_mean and running_var must be contiguous (S, F) "
              "tensors of one dtype, got ",
              running_mean.sizes(), " and ", running_var.sizes());
  const int64_t S = running_mean.size(0), F = running_mean.size(1);
  const int64_t steps = batch.dim() == 3 ? batch.size(1) : -1;
  TORCH_CHECK(batch.dim() == 3 && batch.size(0) == 2 && batch.size(2) == F &&
                  counts.numel() == steps,
              "update_running_stats: batch must be (2, T, ", F, ") and counts (T,), got ",
              batch.sizes(), " and ", counts.sizes());
  if (S == 0) return;
  const Tensor b = batch.to(running_mean.scalar_type()).contiguous();
  const Tensor n = counts.to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES(running_mean.scalar_type(), "seqnorm_update_running_stats", [&] {
    scalar_t* mean = running_mean.data_ptr<scalar_t>();
    scalar_t* var = running_var.data_ptr<scalar_t>();
    const scalar_t* batch_mean = b.data_ptr<scalar_t>();
    const scalar_t* batch_var = batch_mean + steps * F;
    const int64_t* count = n.data_ptr<int64_t>();
    const auto m = static_cast<scalar_t>(momentum), keep = static_cast<scalar_t>(1 - momentum);
    for (int64_t t = 0; t < steps; ++t) {
      if (count[t] < 2) continue;  // the step normalized with the running statistics
      // steps past the last row share it; the variance is kept unbiased, as in BatchNorm1d
      const int64_t row = std::min(t, S - 1);
      const auto unbias = static_cast<scalar_t>(static_cast<double>(count[t]) / (count[t] - 1));
      scalar_t* mu = mean + row * F;
      scalar_t* v = var + row * F;
      const scalar_t* bm = batch_mean + t * F;
      const scalar_t* bv = batch_var + t * F;
SEQNORM_SIMD
      for (int64_t f = 0; f < F; ++f) {
        mu[f] = keep * mu[f] + m * bm[f];
        v[f] = keep * v[f] + m * (bv[f] * unbias);
      }
    }
  });
}

}  // namespace seqnorm
