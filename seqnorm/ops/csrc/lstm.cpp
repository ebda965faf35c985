// The LSTM's time loop, forward and backward (DESIGN.md section 2):
//   gates = gx + Nh(h W_hh^T),  c' = sig(f) c + sig(i) tanh(g),  h' = sig(o) tanh(Nc(c')),
// and with proj_size h' is projected: h' = (sig(o) tanh(Nc(c'))) W_hr^T.
//
// Per step the forward runs one matrix product (h W_hh^T) and then, one sample (row) at a time
// while the row is in cache, the normalization with its statistics, the gate nonlinearities and
// the state update (batch norm computes each step's statistics over all rows first, and those of
// c' before a second walk over the rows). The backward walks the steps in reverse the same way,
// with one matrix product for dh, and hands its gradients on a chunk of steps at a time to large
// matrix products: dW_hh (WeightGrad) and, through the input norm's backward, dW_ih and dx
// (InputGrad); so it stores no (steps, N, F) gradient. Without a backward (keep false) the
// forward stores no step's activations.
#include "buffer_cache.h"
#include "float_math.h"
#include "input_half.h"
#include "kernels.h"
#include "norms.h"
#include "products.h"

namespace seqnorm {
namespace {

// What lstm_forward keeps for lstm_backward, in the order of seqnorm/ops/types.py's LSTMSaved.
struct LSTMSaved {
  Tensor hs, cs, acts, xhat_hh, stats_hh, xhat_c, stats_c, hpre, xhat_ih, stats_ih, counts;
  explicit LSTMSaved(at::TensorList v) {
    TORCH_CHECK(v.size() == 11, "lstm_backward: expected the 11 tensors of LSTMSaved, got ",
                v.size());
    hs = v[0], cs = v[1], acts = v[2], xhat_hh = v[3], stats_hh = v[4], xhat_c = v[5];
    stats_c = v[6], hpre = v[7], xhat_ih = v[8], stats_ih = v[9], counts = v[10];
  }
};

}  // namespace

std::vector<Tensor> lstm_forward(Tensor& gx, const Tensor& h0, const Tensor& c0,
                                 const Tensor& w_hh, const OptTensor& w_hr,
                                 const OptTensor& gamma_hh, const OptTensor& gamma_c,
                                 const OptTensor& beta_c, const OptTensor& running_mean_hh,
                                 const OptTensor& running_var_hh,
                                 const OptTensor& running_mean_c,
                                 const OptTensor& running_var_c, const OptTensor& mask,
                                 const std::string& norm, int64_t groups, double eps,
                                 bool training, bool keep) {
  const NormConfig s = NormConfig::parse(norm, groups, eps, training);
  TORCH_CHECK(gx.dim() == 3 && gx.is_contiguous(), "gx must be contiguous (steps, N, 4H)");
  const int64_t steps = gx.size(0), N = gx.size(1), F = gx.size(2), H = F / 4, P = h0.size(1);
  const bool proj = present(w_hr), normed = s.normed(), batch = s.batch();
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == N && c0.sizes() == at::IntArrayRef({N, H}),
              "h0 must be (N, P) and c0 (N, H)");
  TORCH_CHECK(w_hh.size(0) == F && w_hh.size(1) == P, "w_hh must be (4H, P)");
  TORCH_CHECK(proj ? w_hr->sizes() == at::IntArrayRef({P, H}) : P == H, "w_hr must be (P, H)");
  check_running(s, running_mean_hh, running_var_hh, steps, F, "the recurrent projection");
  check_running(s, running_mean_c, running_var_c, steps, H, "the cell state");
  const auto o = gx.options();
  const StepSlots slots(steps, keep);
  Tensor out = buffer({steps, N, P}, o);
  Tensor hs = buffer({slots.states, N, P}, o);  // h_{t-1} for step t is hs[slots.state(t)]
  Tensor cs = buffer({slots.states, N, H}, o);
  // sig(i), sig(f), tanh(g), sig(o) of every step, over gx (the caller's own: each row of gx is
  // read before its activations are written, feature by feature); one slot without a backward
  Tensor acts = keep ? gx : at::empty({1, N, F}, o);
  Tensor xhat_hh = buffer({normed ? slots.kept : 1, N, F}, o);  // x_hat of h W_hh^T
  Tensor xhat_c = buffer({normed ? slots.kept : 0, N, H}, o);   // x_hat of c'
  Tensor hpre = buffer({proj ? slots.kept : 0, N, H}, o);       // h' before the projection
  NormBuffers nb_hh(s, steps, N, F, gx), nb_c(s, steps, N, H, gx);
  const bool* m = mask_ptr(mask);
  const std::vector<int64_t> count = valid_counts(m, steps, N);
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  Product recurrent(w_hh, N);  // h W_hh^T
  std::optional<Product> projection;       // h' W_hr^T
  Tensor projected;                        // its result (at::mm writes here)
  if (proj) {
    projection.emplace(*w_hr, N);
    projected = at::empty({N, P}, o);
  }
  const bool apart = !proj && rows_apart(s, recurrent, N);  // run_steps

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "seqnorm_lstm_forward", [&] {
    const scalar_t* gam_hh = ptr_or_null<scalar_t>(gamma_hh);
    const scalar_t* gam_c = ptr_or_null<scalar_t>(gamma_c);
    const scalar_t* bet_c = ptr_or_null<scalar_t>(beta_c);
    const RunningRows<scalar_t> run_hh(running_mean_hh, running_var_hh);
    const RunningRows<scalar_t> run_c(running_mean_c, running_var_c);
    Tensor normed_c = at::empty({N, H}, o);  // Nc(c') of each row
    const auto step = [&](int64_t t, int64_t lo, int64_t hi) {  // rows [lo, hi) of step t
      const bool* valid = m ? m + t * N : nullptr;
      const int64_t k = slots.act(t), now = slots.state(t), next = slots.state(t + 1);
      const scalar_t* h_prev = hs.data_ptr<scalar_t>() + now * N * P;
      scalar_t* xh = xhat_hh.data_ptr<scalar_t>() + (normed ? k : 0) * N * F;
      // z = h W_hh^T (in the x_hat slot, or oneDNN's own tensor), normalized into the slot
      const scalar_t* z = apart ? recurrent.rows_of(h_prev, lo, hi, P, xh)
                                : recurrent.rows(h_prev, N, P, xh, [&] { return hs[now]; },
                                                 [&] { return xhat_hh[normed ? k : 0]; });
      const StepNorm<scalar_t> norm_hh(s, nb_hh, t, steps, N, F, z, valid, count[t], run_hh);
      const scalar_t* g = gx.data_ptr<scalar_t>() + t * N * F;
      scalar_t* a = acts.data_ptr<scalar_t>() + k * N * F;
      const scalar_t* c_prev = cs.data_ptr<scalar_t>() + now * N * H;
      scalar_t* c_new = cs.data_ptr<scalar_t>() + next * N * H;
      scalar_t* xc = normed ? xhat_c.data_ptr<scalar_t>() + k * N * H : nullptr;
      scalar_t* hp = proj ? hpre.data_ptr<scalar_t>() + k * N * H : nullptr;
      scalar_t* h_new = hs.data_ptr<scalar_t>() + next * N * P;
      scalar_t* out_t = out.data_ptr<scalar_t>() + t * N * P;
      std::optional<StepNorm<scalar_t>> norm_c;
      auto output = [&](int64_t n) {  // sig(o) tanh(Nc(c')), or the state kept
        if (valid && !valid[n]) {
          std::copy(h_prev + n * P, h_prev + (n + 1) * P, h_new + n * P);
          std::copy(c_prev + n * H, c_prev + (n + 1) * H, c_new + n * H);
          std::fill(out_t + n * P, out_t + (n + 1) * P, scalar_t(0));
          if (normed) std::fill(xc + n * H, xc + (n + 1) * H, scalar_t(0));  // read by the backward
          if (proj) std::fill(hp + n * H, hp + (n + 1) * H, scalar_t(0));    // and this too
          if (normed && !batch) {  // no statistics for it: defined zeros, not stale memory
            scalar_t* rstd = norm_c->stats + n * s.groups;
            std::fill(rstd, rstd + s.groups, scalar_t(0));
          }
          return;
        }
        const scalar_t* on = a + n * F + 3 * H;
        scalar_t* y = normed_c.data_ptr<scalar_t>() + n * H;
        if (normed) {
          norm_c->row(n, c_new + n * H, xc + n * H);
          const scalar_t* xcn = xc + n * H;
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) y[j] = gam_c[j] * xcn[j] + bet_c[j];
        } else {
          std::copy(c_new + n * H, c_new + (n + 1) * H, y);
        }
        scalar_t* hn = proj ? hp + n * H : h_new + n * H;
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) hn[j] = on[j] * tanh_approx(y[j]);
        if (!proj) std::copy(hn, hn + H, out_t + n * H);
      };
      // Batch statistics of c' need every row's c' first: a second walk over the rows. Group
      // statistics come row by row, and running ones (eval mode) are there from the start.
      const bool two_walks = batch && s.uses_batch(count[t]);
      if (normed && !two_walks)
        norm_c.emplace(s, nb_c, t, steps, N, H, c_new, valid, count[t], run_c);
      // gates and the new cell state (and h', unless two_walks)
      for_rows(lo, hi, F, [&](int64_t n) {
        const scalar_t* gn = g + n * F;
        const scalar_t* zn = z + n * F;
        scalar_t* an = a + n * F;
        if (normed) {
          scalar_t* xn = xh + n * F;
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
        for (int64_t f = 2 * H; f < 3 * H; ++f) an[f] = tanh_approx(an[f]);
SEQNORM_SIMD
        for (int64_t f = 3 * H; f < F; ++f) an[f] = sigmoid(an[f]);
        const scalar_t* cp = c_prev + n * H;
        scalar_t* cn = c_new + n * H;
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) cn[j] = an[H + j] * cp[j] + an[j] * an[2 * H + j];
        if (!two_walks) output(n);
      });
      if (two_walks) {
        norm_c.emplace(s, nb_c, t, steps, N, H, c_new, valid, count[t], run_c);
        for_rows(lo, hi, H, output);
      }
      if (proj) {  // h' = (sig(o) tanh(Nc(c'))) W_hr^T for the valid rows
        const Tensor h_t = (*projection)(hpre[k], projected);
        const scalar_t* hr = h_t.data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n) {
          if (valid && !valid[n]) continue;
          std::copy(hr + n * P, hr + (n + 1) * P, h_new + n * P);
          std::copy(hr + n * P, hr + (n + 1) * P, out_t + n * P);
        }
      }
    };
    if (batch && !s.training) {  // running statistics, for StepNorm
      running_stats_ahead(s, nb_hh, steps, F, run_hh);
      running_stats_ahead(s, nb_c, steps, H, run_c);
    }
    run_steps(steps, N, apart, step);
  });
  Tensor counts = at::tensor(count, o.dtype(at::kLong));
  const int64_t last = slots.state(steps);
  return {out,         hs[last].clone(), cs[last].clone(), hs,          cs,
          acts,        xhat_hh,          nb_hh.stats,      xhat_c,      nb_c.stats,
          hpre,        nb_hh.batch_stats, nb_c.batch_stats, counts};
}

std::vector<Tensor> lstm_backward(const Tensor& grad_out, const Tensor& grad_h,
                                  const Tensor& grad_c, at::TensorList saved_list,
                                  const Tensor& x, const Tensor& w_ih, const Tensor& w_hh,
                                  const OptTensor& w_hr, const OptTensor& gamma_ih,
                                  const OptTensor& gamma_hh, const OptTensor& gamma_c,
                                  const OptTensor& beta_c, const OptTensor& mask,
                                  const std::string& norm, int64_t groups, double eps,
                                  bool training, LSTMNeeds needs) {
  const NormConfig s = NormConfig::parse(norm, groups, eps, training);
  const LSTMSaved saved(saved_list);
  const Tensor& acts = saved.acts;
  const int64_t steps = acts.size(0), N = acts.size(1), F = acts.size(2), H = F / 4;
  const int64_t P = saved.hs.size(2);
  const bool proj = present(w_hr), normed = s.normed(), batch = s.batch();
  const auto o = acts.options();
  const Tensor gout = grad_out.contiguous();
  Product recurrent(w_hh.t(), N);  // dgh W_hh
  Tensor dh = grad_h.contiguous().clone(), dc = grad_c.contiguous().clone();
  const int64_t* count = saved.counts.data_ptr<int64_t>();
  const bool* m = mask_ptr(mask);
  // dL/d(input half of the gates), a chunk at a time
  InputGrad ig(s, x, w_ih, gamma_ih, saved.xhat_ih, saved.stats_ih,
               {needs[0], needs[3], needs[7], needs[5]}, m, count, steps, N, F);
  // dL/d(h W_hh^T): without a norm it is dL/dgx, and the two share a ring
  WeightGrad wg(saved.hs, steps, N, F, normed ? Tensor() : ig.ring());
  std::optional<WeightGrad> wg_hr;  // dW_hr = sum_t dh_t^T h'_t (h' before the projection)
  std::optional<Product> unproject;  // dh W_hr
  Tensor dhpre_buf;
  if (proj) {
    wg_hr.emplace(saved.hpre, steps, N, P, Tensor());
    unproject.emplace(w_hr->t(), N);
    dhpre_buf = at::empty({N, H}, o);
  }
  Tensor dc_out = at::empty({N, H}, o);   // dL/dc' through the output path of each row
  Tensor tanh_c = at::empty({N, H}, o);   // tanh(Nc(c')) of each row
  Tensor dprev_buf = at::empty({N, P}, o);  // dgh W_hh of a step (at::mm writes here)
  Accumulator dgamma_hh(normed ? F : 0), dgamma_c(normed ? H : 0), dbeta_c(normed ? H : 0);
  const int64_t stride_hh = steps ? saved.stats_hh.numel() / steps : 0;
  const int64_t stride_c = steps ? saved.stats_c.numel() / steps : 0;

  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "seqnorm_lstm_backward", [&] {
    const scalar_t* gam_hh = ptr_or_null<scalar_t>(gamma_hh);
    const scalar_t* gam_c = ptr_or_null<scalar_t>(gamma_c);
    const scalar_t* bet_c = ptr_or_null<scalar_t>(beta_c);
    scalar_t* dhp = dh.data_ptr<scalar_t>();
    scalar_t* dcp = dc.data_ptr<scalar_t>();
    scalar_t* dco = dc_out.data_ptr<scalar_t>();
    scalar_t* tc = tanh_c.data_ptr<scalar_t>();
    for (int64_t t = steps - 1; t >= 0; --t) {
      const bool* valid = m ? m + t * N : nullptr;
      const scalar_t* a = acts.data_ptr<scalar_t>() + t * N * F;
      scalar_t* dgates = ig.ptr<scalar_t>(t);  // dL/d(gate pre-activations)
      scalar_t* dz = wg.ptr<scalar_t>(t);        // dL/d(h W_hh^T)
      const scalar_t* go = gout.data_ptr<scalar_t>() + t * N * P;
      const scalar_t* c_prev = saved.cs.data_ptr<scalar_t>() + t * N * H;
      const scalar_t* c_new = saved.cs.data_ptr<scalar_t>() + (t + 1) * N * H;
      const scalar_t* xc = normed ? saved.xhat_c.data_ptr<scalar_t>() + t * N * H : nullptr;
      const scalar_t* stats_c =
          normed ? saved.stats_c.data_ptr<scalar_t>() + t * stride_c : nullptr;
      // dL/dh' (before the projection) of every row: dh itself, or (dh + dout) W_hr
      const scalar_t* dh_out = dhp;
      Tensor dhpre;  // (N, H), alive while dh_out points into it
      if (proj) {
        Tensor dtotal_t = wg_hr->at(t);  // dh + dout, zero where not valid: for dW_hr
        scalar_t* dtotal = dtotal_t.data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n) {
          scalar_t* dn = dtotal + n * P;
          if (valid && !valid[n]) {
            std::fill(dn, dn + P, scalar_t(0));
            continue;
          }
SEQNORM_SIMD
          for (int64_t j = 0; j < P; ++j) dn[j] = dhp[n * P + j] + go[n * P + j];
        }
        dhpre = (*unproject)(dtotal_t, dhpre_buf);
        dh_out = dhpre.data_ptr<scalar_t>();
      }
      // dL/dc' through h' = sig(o) tanh(Nc(c')), into dc_out (zero for samples not valid).
      for_rows(N, H, [&](int64_t n) {
        scalar_t* dcn = dco + n * H;
        if (valid && !valid[n]) {
          std::fill(dcn, dcn + H, scalar_t(0));
          return;
        }
        const scalar_t* on = a + n * F + 3 * H;
        scalar_t* tcn = tc + n * H;
        scalar_t* dhn = proj ? nullptr : dhp + n * H;
        if (!proj) {
          const scalar_t* gon = go + n * H;
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) dhn[j] += gon[j];
        }
        const scalar_t* dho = proj ? dh_out + n * H : dhn;
        if (normed) {
          const scalar_t* xcn = xc + n * H;
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) tcn[j] = tanh_approx(gam_c[j] * xcn[j] + bet_c[j]);
        } else {
          const scalar_t* cn = c_new + n * H;
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) tcn[j] = tanh_approx(cn[j]);
        }
        if (normed && !batch) {  // through Nc; batch norm takes all rows at once, below
          const scalar_t* xcn = xc + n * H;
          double* dgam_c = dgamma_c.mine();
          double* dbet_c = dbeta_c.mine();
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) {
            const scalar_t dy = dho[j] * on[j] * (1 - tcn[j] * tcn[j]);
            dgam_c[j] += dy * xcn[j];
            dbet_c[j] += dy;
            dcn[j] = dy * gam_c[j];
          }
          group_norm_backward_row(s.groups, dcn, xcn, H, stats_c + n * s.groups);
        } else {  // dL/dNc(c') for batch norm, dL/dc' without a norm
SEQNORM_SIMD
          for (int64_t j = 0; j < H; ++j) dcn[j] = dho[j] * on[j] * (1 - tcn[j] * tcn[j]);
        }
      });
      if (batch)  // from the serial time loop: thread 0's sums take every feature
        batch_norm_backward(dco, dco, xc, gam_c, dgamma_c.mine(), dbeta_c.mine(), N, H, valid,
                            stats_c + H, s.uses_batch(count[t]), count[t]);
      const scalar_t* xh = normed ? saved.xhat_hh.data_ptr<scalar_t>() + t * N * F : nullptr;
      const scalar_t* stats_hh =
          normed ? saved.stats_hh.data_ptr<scalar_t>() + t * stride_hh : nullptr;
      for_rows(N, F, [&](int64_t n) {  // through c' = sig(f) c + sig(i) tanh(g) to the gates
        const scalar_t* an = a + n * F;
        scalar_t* dgn = dgates + n * F;
        if (valid && !valid[n]) {
          std::fill(dgn, dgn + F, scalar_t(0));
          if (normed) std::fill(dz + n * F, dz + (n + 1) * F, scalar_t(0));
          return;
        }
        const scalar_t* dcon = dco + n * H;
        const scalar_t* cp = c_prev + n * H;
        const scalar_t* dho = proj ? dh_out + n * H : dhp + n * H;
        const scalar_t* tcn = tc + n * H;
        scalar_t* dcn = dcp + n * H;
SEQNORM_SIMD
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t i = an[j], f = an[H + j], g = an[2 * H + j], og = an[3 * H + j];
          const scalar_t dct = dcn[j] + dcon[j];
          dgn[j] = dct * g * i * (1 - i);
          dgn[H + j] = dct * cp[j] * f * (1 - f);
          dgn[2 * H + j] = dct * i * (1 - g * g);
          dgn[3 * H + j] = dho[j] * tcn[j] * og * (1 - og);
          dcn[j] = dct * f;
        }
        if (normed && !batch) {  // through gates = gx + gamma * x_hat(h W_hh^T); batch norm below
          const scalar_t* xn = xh + n * F;
          scalar_t* dzn = dz + n * F;
          double* dgam_hh = dgamma_hh.mine();
SEQNORM_SIMD
          for (int64_t f = 0; f < F; ++f) {
            dgam_hh[f] += dgn[f] * xn[f];
            dzn[f] = dgn[f] * gam_hh[f];
          }
          group_norm_backward_row(s.groups, dzn, xn, F, stats_hh + n * s.groups);
        }
      });
      if (batch)  // dL/dgates is dL/d(gamma x_hat + gx); the input half reads it unchanged
        batch_norm_backward(dgates, dz, xh, gam_hh, dgamma_hh.mine(), nullptr, N, F, valid,
                            stats_hh + F, s.uses_batch(count[t]), count[t]);
      // dh = dgh W_hh (N, P) for the valid rows; samples not valid passed their state through,
      // and their dh stays. With every row valid at::mm and brgemm write it in place.
      const Tensor& target = valid ? dprev_buf : dh;
      const scalar_t* dp = recurrent.rows(
          dz, N, F, target.data_ptr<scalar_t>(), [&] { return wg.at(t); }, [&] { return target; });
      if (dp != dhp) {
        for (int64_t n = 0; n < N; ++n) {
          if (valid && !valid[n]) continue;
          std::copy(dp + n * P, dp + (n + 1) * P, dhp + n * P);
        }
      }
      if (proj) wg_hr->done(t);
      wg.done(t);  // before ig.done(t), which overwrites a ring it may share
      ig.done(t);
    }
  });
  return {ig.dx,
          dh,
          dc,
          ig.dw,
          wg.dw,
          ig.dbias.total(o),
          proj ? wg_hr->dw : Tensor(),
          ig.dgamma.total(o),
          dgamma_hh.total(o),
          dgamma_c.total(o),
          dbeta_c.total(o)};
}

}  // namespace seqnorm
