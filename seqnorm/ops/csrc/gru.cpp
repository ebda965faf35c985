// The GRU's time loop, forward and backward (DESIGN.md section 2):
//   gh = Nh(h W_hh^T) + b_hh,  r = sig(gx_r + gh_r),  z = sig(gx_z + gh_z),
//   n = tanh(gx_n + r gh_n),  h' = (1 - z) n + z h,
// organized as the LSTM's (lstm.cpp): one product per step, then each row while in cache; the
// backward hands its gradients on by chunks of steps to the weight and input products.
#include "buffer_cache.h"
#include "float_math.h"
#include "input_half.h"
#include "kernels.h"
#include "norms.h"
#include "products.h"

namespace seqnorm {
namespace {

// What gru_forward keeps for gru_backward, in the order of seqnorm/ops/types.py's GRUSaved.
struct GRUSaved {
  Tensor hs, acts, gh_n, xhat_hh, stats_hh, xhat_ih, stats_ih, counts;
  explicit GRUSaved(at::TensorList v) {
    TORCH_CHECK(v.size() == 8, "gru_backward: expected the 8 tensors of GRUSaved, got ", v.size());
    hs = v[0], acts = v[1], gh_n = v[2], xhat_hh = v[3], stats_hh = v[4], xhat_ih = v[5];
    stats_ih = v[6], counts = v[7];
  }
};

}  // namespace

std::vector<Tensor> gru_forward(Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                const OptTensor& b_hh, const OptTensor& gamma_hh,
                                const OptTensor& running_mean_hh,
                                const OptTensor& running_var_hh, const OptTensor& mask,
                                const std::string& norm, int64_t groups, double eps,
                                bool training, bool keep) {
  const NormConfig s = NormConfig::parse(norm, groups, eps, training);
  TORCH_CHECK(gx.dim() == 3 && gx.is_contiguous(), "gx must be contiguous (steps, N, 3H)");
  const int64_t steps = gx.size(0), N = gx.size(1), F = gx.size(2), H = F / 3;
  TORCH_CHECK(h0.sizes() == at::IntArrayRef({N, H}), "h0 must be (N, H)");
  TORCH_CHECK(w_hh.size(0) == F && w_hh.size(1) == H, "w_hh must be (3H, H)");
  check_running(s, running_mean_hh, running_var_hh, steps, F, "the recurrent projection");
  const bool normed = s.normed();
  const auto o = gx.options();
  const StepSlots slots(steps, keep);
  Tensor out = buffer({steps, N, H}, o);
  Tensor hs = buffer({slots.states, N, H}, o);
  Tensor acts = keep ? gx : at::empty({1, N, F}, o);         // r, z, n (over gx, as in the LSTM)
  Tensor gh_n = buffer({slots.kept, N, H}, o);               // the recurrent half of n
  Tensor xhat = buffer({normed ? slots.kept : 1, N, F}, o);  // x_hat of h W_hh^T
  NormBuffers nb(s, steps, N, F, gx);
  const bool* m = mask_ptr(mask);
  const std::vector<int64_t> count = valid_counts(m, steps, N);
  hs[0].copy_(h0);
  Product recurrent(w_hh, N);
  const bool apart = rows_apart(s, recurrent, N);  // run_steps

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "seqnorm_gru_forward", [&] {
    const scalar_t* gam = ptr_or_null<scalar_t>(gamma_hh);
    const scalar_t* bias = ptr_or_null<scalar_t>(b_hh);
    const RunningRows<scalar_t> run(running_mean_hh, running_var_hh);
    Tensor gh_buf = at::empty({N, F}, o);  // Nh(h W_hh^T) + b_hh of each row
    if (s.batch() && !s.training) running_stats_ahead(s, nb, steps, F, run);
    const auto step = [&](int64_t t, int64_t lo, int64_t hi) {  // rows [lo, hi) of step t
      const bool* valid = m ? m + t * N : nullptr;
      const int64_t k = slots.act(t), now = slots.state(t), next = slots.state(t + 1);
      const scalar_t* h_prev = hs.data_ptr<scalar_t>() + now * N * H;
      scalar_t* xh = xhat.data_ptr<scalar_t>() + (normed ? k : 0) * N * F;
      const scalar_t* z =  // as in the LSTM
          apart ? recurrent.rows_of(h_prev, lo, hi, H, xh)
                : recurrent.rows(h_prev, N, H, xh, [&] { return hs[now]; },
                                 [&] { return xhat[normed ? k : 0]; });
      const StepNorm<scalar_t> norm_hh(s, nb, t, steps, N, F, z, valid, count[t], run);
      const scalar_t* g = gx.data_ptr<scalar_t>() + t * N * F;
      scalar_t* a = acts.data_ptr<scalar_t>() + k * N * F;
      scalar_t* h_new = hs.data_ptr<scalar_t>() + next * N * H;
      scalar_t* out_t = out.data_ptr<scalar_t>() + t * N * H;
      for_rows(lo, hi, F, [&](int64_t n) {
        const scalar_t* gn = g + n * F;
        const scalar_t* xn = normed ? xh + n * F : z + n * F;
        if (normed) norm_hh.row(n, z + n * F, xh + n * F);
        scalar_t* an = a + n * F;
        scalar_t* ghn = gh_n.data_ptr<scalar_t>() + (k * N + n) * H;
        scalar_t* gh = gh_buf.data_ptr<scalar_t>() + n * F;
        if (gam) {
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) gh[f] = gam[f] * xn[f];
        } else {
          std::copy(xn, xn + F, gh);
        }
        if (bias) {
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) gh[f] += bias[f];
        }
SEQNORM_SIMD
        for (int64_t f = 0; f < 2 * H; ++f) an[f] = sigmoid(gn[f] + gh[f]);
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) {
          ghn[j] = gh[2 * H + j];
          an[2 * H + j] = tanh_approx(gn[2 * H + j] + an[j] * gh[2 * H + j]);
        }
        scalar_t* hn = h_new + n * H;
        const scalar_t* hp = h_prev + n * H;
        if (valid && !valid[n]) {
          std::copy(hp, hp + H, hn);
          std::fill(out_t + n * H, out_t + (n + 1) * H, scalar_t(0));
          return;
        }
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) hn[j] = (1 - an[H + j]) * an[2 * H + j] + an[H + j] * hp[j];
        std::copy(hn, hn + H, out_t + n * H);
      });
    };
    run_steps(steps, N, apart, step);
  });
  Tensor counts = at::tensor(count, o.dtype(at::kLong));
  return {out, hs[slots.state(steps)].clone(), hs, acts, gh_n, xhat, nb.stats, nb.batch_stats,
          counts};
}

std::vector<Tensor> gru_backward(const Tensor& grad_out, const Tensor& grad_h,
                                 at::TensorList saved_list, const Tensor& x, const Tensor& w_ih,
                                 const Tensor& w_hh, const OptTensor& b_hh,
                                 const OptTensor& gamma_ih, const OptTensor& gamma_hh,
                                 const OptTensor& mask, const std::string& norm, int64_t groups,
                                 double eps, bool training, GRUNeeds needs) {
  const NormConfig s = NormConfig::parse(norm, groups, eps, training);
  const GRUSaved saved(saved_list);
  const Tensor& acts = saved.acts;
  const int64_t steps = acts.size(0), N = acts.size(1), F = acts.size(2), H = F / 3;
  const bool normed = s.normed(), batch = s.batch();
  const auto o = acts.options();
  const Tensor gout = grad_out.contiguous();
  Product recurrent(w_hh.t(), N);  // dgh W_hh
  Tensor dh = grad_h.contiguous().clone();
  const int64_t* count = saved.counts.data_ptr<int64_t>();
  const bool* m = mask_ptr(mask);
  InputGrad ig(s, x, w_ih, gamma_ih, saved.xhat_ih, saved.stats_ih,
               {needs[0], needs[2], needs[6], needs[4]}, m, count, steps, N, F);
  WeightGrad wg(saved.hs, steps, N, F, Tensor());  // dL/d(h W_hh^T)
  Tensor dprev_buf = at::empty({N, H}, o);          // as in the LSTM
  Accumulator dbias_hh(present(b_hh) ? F : 0), dgamma_hh(normed ? F : 0);
  const int64_t stride = steps ? saved.stats_hh.numel() / steps : 0;

  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "seqnorm_gru_backward", [&] {
    const scalar_t* gam = ptr_or_null<scalar_t>(gamma_hh);
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    for (int64_t t = steps - 1; t >= 0; --t) {
      const bool* valid = m ? m + t * N : nullptr;
      const scalar_t* a = acts.data_ptr<scalar_t>() + t * N * F;
      scalar_t* dgates = ig.ptr<scalar_t>(t);  // dL/dgx
      scalar_t* dz = wg.ptr<scalar_t>(t);        // dL/d(h W_hh^T)
      const scalar_t* go = gout.data_ptr<scalar_t>() + t * N * H;
      const scalar_t* h_prev = saved.hs.data_ptr<scalar_t>() + t * N * H;
      const scalar_t* xh = normed ? saved.xhat_hh.data_ptr<scalar_t>() + t * N * F : nullptr;
      const scalar_t* stats = normed ? saved.stats_hh.data_ptr<scalar_t>() + t * stride : nullptr;
      for_rows(N, F, [&](int64_t n) {
        const scalar_t* an = a + n * F;
        scalar_t* dgn = dgates + n * F;
        scalar_t* dzn = dz + n * F;
        if (valid && !valid[n]) {
          std::fill(dgn, dgn + F, scalar_t(0));
          std::fill(dzn, dzn + F, scalar_t(0));
          return;
        }
        const scalar_t* ghn = saved.gh_n.data_ptr<scalar_t>() + (t * N + n) * H;
        const scalar_t* hp = h_prev + n * H;
        const scalar_t* gon = go + n * H;
        scalar_t* dhn = dhp + n * H;
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t r = an[j], z = an[H + j], nn = an[2 * H + j];
          const scalar_t d = dhn[j] + gon[j];
          const scalar_t dn = d * (1 - z) * (1 - nn * nn);
          const scalar_t dr = dn * ghn[j] * r * (1 - r);
          const scalar_t dzg = d * (hp[j] - nn) * z * (1 - z);
          dgn[j] = dr;
          dgn[H + j] = dzg;
          dgn[2 * H + j] = dn;
          dzn[j] = dr;
          dzn[H + j] = dzg;
          dzn[2 * H + j] = dn * r;
          dhn[j] = d * z;  // the direct path; the one through W_hh is added below
        }
        if (dbias_hh.F) {
          double* db = dbias_hh.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) db[f] += dzn[f];
        }
        if (normed && !batch) {  // batch norm: all rows at once, below
          const scalar_t* xn = xh + n * F;
          double* dgam = dgamma_hh.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) {
            dgam[f] += dzn[f] * xn[f];
            dzn[f] *= gam[f];
          }
          group_norm_backward_row(s.groups, dzn, xn, F, stats + n * s.groups);
        }
      });
      if (batch)  // from the serial time loop: thread 0's sums take every feature
        batch_norm_backward(dz, dz, xh, gam, dgamma_hh.mine(), nullptr, N, F, valid, stats + F,
                            s.uses_batch(count[t]), count[t]);
      const scalar_t* dp = recurrent.rows(dz, N, F, dprev_buf.data_ptr<scalar_t>(),
                                          [&] { return wg.at(t); }, [&] { return dprev_buf; });
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) continue;
        for (int64_t j = 0; j < H; ++j) dhp[n * H + j] += dp[n * H + j];
      }
      wg.done(t);
      ig.done(t);
    }
  });
  // In the order of GRU_GRADS: x, h0, w_ih, w_hh, b_ih, b_hh, gamma_ih, gamma_hh.
  return {ig.dx, dh, ig.dw, wg.dw, ig.dbias.total(o), dbias_hh.total(o), ig.dgamma.total(o),
          dgamma_hh.total(o)};
}

}  // namespace seqnorm
