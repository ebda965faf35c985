// The fused CPU recurrence of seqnorm's LSTM and GRU: forward and hand-written backward through
// time for the recurrent half of the cells (DESIGN.md section 2), with layer/group or per-step
// batch normalization of the recurrent projection (and, for the LSTM, of the cell state).
//
// Per step the forward runs one matrix product (h W_hh^T) and a few passes over the (N, gates*H)
// gates: the normalization with its statistics, the gate nonlinearities (ATen's vectorized
// sigmoid/tanh) and the state update. The backward walks the steps in reverse with the same
// number of passes and one matrix product for dh; the gradient of W_hh is one matrix product over
// all steps after the loop. Everything the backward needs is saved by the forward, nothing is
// recomputed.
//
// The readable Python path (seqnorm.functional.lstm_step / gru_step in seqnorm.rnn) is the
// reference; tests/test_fused.py checks this file against it, outputs and every gradient.
//
// Layout: gx (T, N, F) with F = gates*H, states (N, H), w_hh (F, H), mask (T, N) bool (absent:
// every sample valid). A sample that is not valid at a step keeps its state, outputs zero, and
// takes no part in batch statistics.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <vector>

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

enum NormKind : int64_t { kNone = 0, kGroup = 1, kBatch = 2 };

struct NormSpec {
  int64_t kind;
  int64_t groups;
  double eps;
  bool training;
};

template <typename T>
const T* ptr_or_null(const OptTensor& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

// Normalizes x (N, F) in place into x_hat. Group: statistics per sample and group of F/G
// contiguous features, rstd (N, G). Batch: statistics per feature over the valid samples when
// training with at least two of them (use = true), else the running ones; rstd (F), and the
// batch mean and biased variance written to bmean/bvar (F) when used. Returns use.
template <typename T>
bool norm_forward(const NormSpec& s, T* x, int64_t N, int64_t F, const bool* valid, T* rstd,
                  const T* run_mean, const T* run_var, T* bmean, T* bvar, int64_t count) {
  if (s.kind == kGroup) {
    const int64_t G = s.groups, Fg = F / G;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        T* p = x + n * F + g * Fg;
        double sum = 0;
        for (int64_t k = 0; k < Fg; ++k) sum += p[k];
        const double mean = sum / Fg;
        double sq = 0;
        for (int64_t k = 0; k < Fg; ++k) sq += (p[k] - mean) * (p[k] - mean);
        const double r = 1.0 / std::sqrt(sq / Fg + s.eps);
        for (int64_t k = 0; k < Fg; ++k) p[k] = static_cast<T>((p[k] - mean) * r);
        rstd[n * G + g] = static_cast<T>(r);
      }
    }
    return false;
  }
  // batch
  const bool use = s.training && count >= 2;
  std::vector<double> mean(F), var(F, 0.0);
  if (use) {
    std::vector<double> sum(F, 0.0);
    for (int64_t n = 0; n < N; ++n) {
      if (valid && !valid[n]) continue;
      const T* p = x + n * F;
      for (int64_t f = 0; f < F; ++f) sum[f] += p[f];
    }
    for (int64_t f = 0; f < F; ++f) mean[f] = sum[f] / count;
    for (int64_t n = 0; n < N; ++n) {
      if (valid && !valid[n]) continue;
      const T* p = x + n * F;
      for (int64_t f = 0; f < F; ++f) var[f] += (p[f] - mean[f]) * (p[f] - mean[f]);
    }
    for (int64_t f = 0; f < F; ++f) {
      var[f] /= count;
      bmean[f] = static_cast<T>(mean[f]);
      bvar[f] = static_cast<T>(var[f]);
    }
  } else {
    for (int64_t f = 0; f < F; ++f) {
      mean[f] = run_mean[f];
      var[f] = run_var[f];
    }
  }
  std::vector<double> r(F);
  for (int64_t f = 0; f < F; ++f) {
    r[f] = 1.0 / std::sqrt(var[f] + s.eps);
    rstd[f] = static_cast<T>(r[f]);
  }
  for (int64_t n = 0; n < N; ++n) {
    T* p = x + n * F;
    for (int64_t f = 0; f < F; ++f) p[f] = static_cast<T>((p[f] - mean[f]) * r[f]);
  }
  return use;
}

// The backward of norm_forward: d (N, F) holds dL/dx_hat on entry (zero in rows of samples that
// are not valid) and dL/dx on exit.
template <typename T>
void norm_backward(const NormSpec& s, T* d, const T* xhat, int64_t N, int64_t F, const bool* valid,
                   const T* rstd, bool use, int64_t count) {
  if (s.kind == kGroup) {
    const int64_t G = s.groups, Fg = F / G;
    for (int64_t n = 0; n < N; ++n) {
      for (int64_t g = 0; g < G; ++g) {
        T* p = d + n * F + g * Fg;
        const T* xh = xhat + n * F + g * Fg;
        double m1 = 0, m2 = 0;
        for (int64_t k = 0; k < Fg; ++k) {
          m1 += p[k];
          m2 += p[k] * xh[k];
        }
        m1 /= Fg;
        m2 /= Fg;
        const double r = rstd[n * G + g];
        for (int64_t k = 0; k < Fg; ++k) p[k] = static_cast<T>(r * (p[k] - m1 - xh[k] * m2));
      }
    }
    return;
  }
  if (!use) {  // running statistics: constants
    for (int64_t n = 0; n < N; ++n)
      for (int64_t f = 0; f < F; ++f) d[n * F + f] *= rstd[f];
    return;
  }
  std::vector<double> m1(F, 0.0), m2(F, 0.0);
  for (int64_t n = 0; n < N; ++n) {
    if (valid && !valid[n]) continue;
    for (int64_t f = 0; f < F; ++f) {
      m1[f] += d[n * F + f];
      m2[f] += d[n * F + f] * xhat[n * F + f];
    }
  }
  for (int64_t f = 0; f < F; ++f) {
    m1[f] /= count;
    m2[f] /= count;
  }
  for (int64_t n = 0; n < N; ++n) {
    T* p = d + n * F;
    if (valid && !valid[n]) {
      for (int64_t f = 0; f < F; ++f) p[f] = 0;
      continue;
    }
    const T* xh = xhat + n * F;
    for (int64_t f = 0; f < F; ++f) p[f] = static_cast<T>(rstd[f] * (p[f] - m1[f] - xh[f] * m2[f]));
  }
}

// Shapes of the per-step statistics a norm saves: rstd (T, N, G) or (T, F).
Tensor rstd_buffer(const NormSpec& s, int64_t T, int64_t N, int64_t F, const Tensor& like) {
  if (s.kind == kGroup) return at::empty({T, N, s.groups}, like.options());
  if (s.kind == kBatch) return at::empty({T, F}, like.options());
  return at::empty({0}, like.options());
}

int64_t rstd_stride(const NormSpec& s, int64_t N, int64_t F) {
  return s.kind == kGroup ? N * s.groups : F;
}

std::vector<int64_t> valid_counts(const OptTensor& mask, int64_t T, int64_t N) {
  std::vector<int64_t> count(T, N);
  if (mask.has_value() && mask->defined()) {
    const bool* m = mask->data_ptr<bool>();
    for (int64_t t = 0; t < T; ++t) {
      int64_t c = 0;
      for (int64_t n = 0; n < N; ++n) c += m[t * N + n];
      count[t] = c;
    }
  }
  return count;
}

void check_inputs(const Tensor& gx, const Tensor& h0, const Tensor& w_hh, int64_t gates) {
  TORCH_CHECK(gx.dim() == 3 && gx.is_contiguous(), "gx must be contiguous (T, N, F)");
  TORCH_CHECK(h0.dim() == 2 && h0.size(0) == gx.size(1), "h0 must be (N, H)");
  TORCH_CHECK(gx.size(2) == gates * h0.size(1), "gx must have gates * H features");
  TORCH_CHECK(w_hh.size(0) == gx.size(2) && w_hh.size(1) == h0.size(1), "w_hh must be (F, H)");
  TORCH_CHECK(gx.device().is_cpu(), "the fused recurrence runs on CPU");
}

// ---------------------------------------------------------------------------------------------
// LSTM: gates = gx + Nh(h W_hh^T), c' = sig(f) c + sig(i) tanh(g), h' = sig(o) tanh(Nc(c')).

std::vector<Tensor> lstm_forward(const Tensor& gx, const Tensor& h0_, const Tensor& c0_,
                                 const Tensor& w_hh_, const OptTensor& mask, int64_t kind,
                                 int64_t groups, double eps, bool training,
                                 const OptTensor& gamma_hh, const OptTensor& gamma_c,
                                 const OptTensor& beta_c, const OptTensor& run_mean_hh,
                                 const OptTensor& run_var_hh, const OptTensor& run_mean_c,
                                 const OptTensor& run_var_c) {
  check_inputs(gx, h0_, w_hh_, 4);
  const NormSpec s{kind, groups, eps, training};
  const int64_t T = gx.size(0), N = gx.size(1), F = gx.size(2), H = F / 4;
  const Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous(), w_t = w_hh_.t();
  Tensor out = at::empty({T, N, H}, gx.options());
  Tensor hs = at::empty({T + 1, N, H}, gx.options());  // h_{t-1} for step t is hs[t]
  Tensor cs = at::empty({T + 1, N, H}, gx.options());
  Tensor acts = at::empty({T, N, F}, gx.options());  // sig(i), sig(f), tanh(g), sig(o)
  Tensor tc = at::empty({T, N, H}, gx.options());    // tanh(Nc(c'))
  const bool normed = kind != kNone;
  Tensor xhat_hh = normed ? at::empty({T, N, F}, gx.options()) : at::empty({0}, gx.options());
  Tensor xhat_c = normed ? at::empty({T, N, H}, gx.options()) : at::empty({0}, gx.options());
  Tensor rstd_hh = rstd_buffer(s, T, N, F, gx), rstd_c = rstd_buffer(s, T, N, H, gx);
  const bool batch = kind == kBatch;
  Tensor bstats_hh = at::zeros({2, batch ? T : 0, F}, gx.options());  // batch mean, biased var
  Tensor bstats_c = at::zeros({2, batch ? T : 0, H}, gx.options());
  const std::vector<int64_t> count = valid_counts(mask, T, N);
  Tensor counts = at::tensor(count, gx.options().dtype(at::kLong));
  hs[0].copy_(h0);
  cs[0].copy_(c0);
  const bool* m = mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "seqnorm_lstm_forward", [&] {
    using T_ = scalar_t;
    const T_* gam_hh = ptr_or_null<T_>(gamma_hh);
    const T_* gam_c = ptr_or_null<T_>(gamma_c);
    const T_* bet_c = ptr_or_null<T_>(beta_c);
    for (int64_t t = 0; t < T; ++t) {
      const bool* valid = m ? m + t * N : nullptr;
      Tensor a_t = acts[t];
      T_* a = a_t.data_ptr<T_>();
      const T_* g = gx.data_ptr<T_>() + t * N * F;
      if (!normed) {
        at::addmm_out(a_t, gx[t], hs[t], w_t);
      } else {
        Tensor x_t = xhat_hh[t];
        at::mm_out(x_t, hs[t], w_t);
        T_* xh = x_t.data_ptr<T_>();
        const int64_t off = t * F;
        norm_forward<T_>(s, xh, N, F, valid, rstd_hh.data_ptr<T_>() + t * rstd_stride(s, N, F),
                         batch ? run_mean_hh->data_ptr<T_>() + off : nullptr,
                         batch ? run_var_hh->data_ptr<T_>() + off : nullptr,
                         batch ? bstats_hh.data_ptr<T_>() + off : nullptr,
                         batch ? bstats_hh.data_ptr<T_>() + T * F + off : nullptr, count[t]);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t f = 0; f < F; ++f) a[n * F + f] = g[n * F + f] + gam_hh[f] * xh[n * F + f];
      }
      a_t.narrow(1, 0, 2 * H).sigmoid_();
      a_t.narrow(1, 2 * H, H).tanh_();
      a_t.narrow(1, 3 * H, H).sigmoid_();
      const T_* c_prev = cs.data_ptr<T_>() + t * N * H;
      T_* c_new = cs.data_ptr<T_>() + (t + 1) * N * H;
      T_* y = tc.data_ptr<T_>() + t * N * H;
      for (int64_t n = 0; n < N; ++n) {
        const T_* an = a + n * F;
        for (int64_t j = 0; j < H; ++j)
          c_new[n * H + j] = an[H + j] * c_prev[n * H + j] + an[j] * an[2 * H + j];
      }
      if (!normed) {
        std::copy(c_new, c_new + N * H, y);
      } else {
        T_* xc = xhat_c.data_ptr<T_>() + t * N * H;
        std::copy(c_new, c_new + N * H, xc);
        const int64_t off = t * H;
        norm_forward<T_>(s, xc, N, H, valid, rstd_c.data_ptr<T_>() + t * rstd_stride(s, N, H),
                         batch ? run_mean_c->data_ptr<T_>() + off : nullptr,
                         batch ? run_var_c->data_ptr<T_>() + off : nullptr,
                         batch ? bstats_c.data_ptr<T_>() + off : nullptr,
                         batch ? bstats_c.data_ptr<T_>() + T * H + off : nullptr, count[t]);
        for (int64_t n = 0; n < N; ++n)
          for (int64_t j = 0; j < H; ++j) y[n * H + j] = gam_c[j] * xc[n * H + j] + bet_c[j];
      }
      tc[t].tanh_();
      const T_* h_prev = hs.data_ptr<T_>() + t * N * H;
      T_* h_new = hs.data_ptr<T_>() + (t + 1) * N * H;
      T_* o = out.data_ptr<T_>() + t * N * H;
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) {
          std::copy(h_prev + n * H, h_prev + (n + 1) * H, h_new + n * H);
          std::copy(c_prev + n * H, c_prev + (n + 1) * H, c_new + n * H);
          std::fill(o + n * H, o + (n + 1) * H, T_(0));
          continue;
        }
        const T_* an = a + n * F;
        for (int64_t j = 0; j < H; ++j) {
          const T_ h = an[3 * H + j] * y[n * H + j];
          h_new[n * H + j] = h;
          o[n * H + j] = h;
        }
      }
    }
  });
  return {out, hs, cs, acts, tc, xhat_hh, rstd_hh, xhat_c, rstd_c, bstats_hh, bstats_c, counts};
}

// Returns dgx, dh0, dc0, dw_hh, dgamma_hh, dgamma_c, dbeta_c (the last three empty when kind is
// none).
std::vector<Tensor> lstm_backward(const Tensor& grad_out, const Tensor& grad_hn,
                                  const Tensor& grad_cn, const Tensor& w_hh,
                                  const OptTensor& mask, int64_t kind, int64_t groups, double eps,
                                  bool training, const OptTensor& gamma_hh,
                                  const OptTensor& gamma_c, const Tensor& hs, const Tensor& cs,
                                  const Tensor& acts, const Tensor& tc, const Tensor& xhat_hh,
                                  const Tensor& rstd_hh, const Tensor& xhat_c,
                                  const Tensor& rstd_c, const Tensor& counts) {
  const NormSpec s{kind, groups, eps, training};
  const int64_t T = acts.size(0), N = acts.size(1), F = acts.size(2), H = F / 4;
  const bool normed = kind != kNone, batch = kind == kBatch;
  const Tensor gout = grad_out.contiguous(), w = w_hh.contiguous();
  Tensor dh = grad_hn.contiguous().clone(), dc = grad_cn.contiguous().clone();
  Tensor dgx = at::empty({T, N, F}, acts.options());
  Tensor dgh = normed ? at::empty({T, N, F}, acts.options()) : dgx;  // dL/d(h W_hh^T)
  Tensor dxc = at::empty({N, H}, acts.options());
  Tensor dgamma_hh = at::zeros({normed ? F : 0}, acts.options().dtype(at::kDouble));
  Tensor dgamma_c = at::zeros({normed ? H : 0}, acts.options().dtype(at::kDouble));
  Tensor dbeta_c = at::zeros({normed ? H : 0}, acts.options().dtype(at::kDouble));
  const int64_t* count = counts.data_ptr<int64_t>();
  const bool* m = mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "seqnorm_lstm_backward", [&] {
    using T_ = scalar_t;
    const T_* gam_hh = ptr_or_null<T_>(gamma_hh);
    const T_* gam_c = ptr_or_null<T_>(gamma_c);
    double* dgam_hh = dgamma_hh.data_ptr<double>();
    double* dgam_c = dgamma_c.data_ptr<double>();
    double* dbet_c = dbeta_c.data_ptr<double>();
    T_* dhp = dh.data_ptr<T_>();
    T_* dcp = dc.data_ptr<T_>();
    T_* dx = dxc.data_ptr<T_>();
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool* valid = m ? m + t * N : nullptr;
      const T_* a = acts.data_ptr<T_>() + t * N * F;
      const T_* y = tc.data_ptr<T_>() + t * N * H;
      const T_* go = gout.data_ptr<T_>() + t * N * H;
      const T_* c_prev = cs.data_ptr<T_>() + t * N * H;
      const T_* xc = normed ? xhat_c.data_ptr<T_>() + t * N * H : nullptr;
      T_* dg = dgx.data_ptr<T_>() + t * N * F;
      // dL/d c' through h' = sig(o) tanh(Nc(c')), into dx (zero for samples not valid).
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) {
          std::fill(dx + n * H, dx + (n + 1) * H, T_(0));
          continue;
        }
        const T_* an = a + n * F;
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = n * H + j;
          dhp[k] += go[k];
          const T_ dy = dhp[k] * an[3 * H + j] * (1 - y[k] * y[k]);
          if (normed) {
            dgam_c[j] += dy * xc[k];
            dbet_c[j] += dy;
            dx[k] = dy * gam_c[j];
          } else {
            dx[k] = dy;
          }
        }
      }
      if (normed)
        norm_backward<T_>(s, dx, xc, N, H, valid, rstd_c.data_ptr<T_>() + t * rstd_stride(s, N, H),
                          batch && count[t] >= 2 && training, count[t]);
      for (int64_t n = 0; n < N; ++n) {
        T_* dgn = dg + n * F;
        if (valid && !valid[n]) {
          std::fill(dgn, dgn + F, T_(0));
          continue;
        }
        const T_* an = a + n * F;
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = n * H + j;
          const T_ i = an[j], f = an[H + j], g = an[2 * H + j], o = an[3 * H + j];
          const T_ dct = dcp[k] + dx[k];
          dgn[j] = dct * g * i * (1 - i);
          dgn[H + j] = dct * c_prev[k] * f * (1 - f);
          dgn[2 * H + j] = dct * i * (1 - g * g);
          dgn[3 * H + j] = dhp[k] * y[k] * o * (1 - o);
          dcp[k] = dct * f;
        }
      }
      if (normed) {
        const T_* xh = xhat_hh.data_ptr<T_>() + t * N * F;
        T_* dn = dgh.data_ptr<T_>() + t * N * F;
        for (int64_t n = 0; n < N; ++n)
          for (int64_t f = 0; f < F; ++f) {
            const int64_t k = n * F + f;
            dgam_hh[f] += dg[k] * xh[k];
            dn[k] = dg[k] * gam_hh[f];
          }
        norm_backward<T_>(s, dn, xh, N, F, valid, rstd_hh.data_ptr<T_>() + t * rstd_stride(s, N, F),
                          batch && count[t] >= 2 && training, count[t]);
      }
      const Tensor dprev = at::mm(dgh[t], w);  // (N, H); zero rows where not valid
      const T_* dp = dprev.data_ptr<T_>();
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) continue;  // the state passed through: dh stays
        std::copy(dp + n * H, dp + (n + 1) * H, dhp + n * H);
      }
    }
  });
  Tensor dw = at::mm(dgh.reshape({T * N, F}).t(), hs.narrow(0, 0, T).reshape({T * N, H}));
  const auto dtype = acts.scalar_type();
  return {dgx, dh, dc, dw, dgamma_hh.to(dtype), dgamma_c.to(dtype), dbeta_c.to(dtype)};
}

// ---------------------------------------------------------------------------------------------
// GRU: gh = Nh(h W_hh^T) + b_hh, r = sig(gx_r + gh_r), z = sig(gx_z + gh_z),
// n = tanh(gx_n + r gh_n), h' = (1 - z) n + z h.

std::vector<Tensor> gru_forward(const Tensor& gx, const Tensor& h0_, const Tensor& w_hh_,
                                const OptTensor& bias_hh, const OptTensor& mask, int64_t kind,
                                int64_t groups, double eps, bool training,
                                const OptTensor& gamma_hh, const OptTensor& run_mean_hh,
                                const OptTensor& run_var_hh) {
  check_inputs(gx, h0_, w_hh_, 3);
  const NormSpec s{kind, groups, eps, training};
  const int64_t T = gx.size(0), N = gx.size(1), F = gx.size(2), H = F / 3;
  const Tensor h0 = h0_.contiguous(), w_t = w_hh_.t();
  const bool normed = kind != kNone, batch = kind == kBatch;
  Tensor out = at::empty({T, N, H}, gx.options());
  Tensor hs = at::empty({T + 1, N, H}, gx.options());
  Tensor acts = at::empty({T, N, F}, gx.options());  // r, z, n
  Tensor ghn = at::empty({T, N, H}, gx.options());   // gh_n, the recurrent half of n
  Tensor xhat = at::empty({T, N, F}, gx.options());  // x_hat of h W_hh^T (itself if no norm)
  Tensor rstd = rstd_buffer(s, T, N, F, gx);
  Tensor bstats = at::zeros({2, batch ? T : 0, F}, gx.options());
  const std::vector<int64_t> count = valid_counts(mask, T, N);
  Tensor counts = at::tensor(count, gx.options().dtype(at::kLong));
  hs[0].copy_(h0);
  const bool* m = mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(gx.scalar_type(), "seqnorm_gru_forward", [&] {
    using T_ = scalar_t;
    const T_* gam = ptr_or_null<T_>(gamma_hh);
    const T_* b = ptr_or_null<T_>(bias_hh);
    for (int64_t t = 0; t < T; ++t) {
      const bool* valid = m ? m + t * N : nullptr;
      Tensor x_t = xhat[t], a_t = acts[t];
      at::mm_out(x_t, hs[t], w_t);
      T_* xh = x_t.data_ptr<T_>();
      if (normed) {
        const int64_t off = t * F;
        norm_forward<T_>(s, xh, N, F, valid, rstd.data_ptr<T_>() + t * rstd_stride(s, N, F),
                         batch ? run_mean_hh->data_ptr<T_>() + off : nullptr,
                         batch ? run_var_hh->data_ptr<T_>() + off : nullptr,
                         batch ? bstats.data_ptr<T_>() + off : nullptr,
                         batch ? bstats.data_ptr<T_>() + T * F + off : nullptr, count[t]);
      }
      const T_* g = gx.data_ptr<T_>() + t * N * F;
      T_* a = a_t.data_ptr<T_>();
      T_* gn = ghn.data_ptr<T_>() + t * N * H;
      for (int64_t n = 0; n < N; ++n)
        for (int64_t f = 0; f < F; ++f) {
          const int64_t k = n * F + f;
          const T_ gh = (gam ? gam[f] * xh[k] : xh[k]) + (b ? b[f] : T_(0));
          if (f < 2 * H)
            a[k] = g[k] + gh;
          else
            gn[n * H + f - 2 * H] = gh;
        }
      a_t.narrow(1, 0, 2 * H).sigmoid_();
      for (int64_t n = 0; n < N; ++n)
        for (int64_t j = 0; j < H; ++j)
          a[n * F + 2 * H + j] = g[n * F + 2 * H + j] + a[n * F + j] * gn[n * H + j];
      a_t.narrow(1, 2 * H, H).tanh_();
      const T_* h_prev = hs.data_ptr<T_>() + t * N * H;
      T_* h_new = hs.data_ptr<T_>() + (t + 1) * N * H;
      T_* o = out.data_ptr<T_>() + t * N * H;
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) {
          std::copy(h_prev + n * H, h_prev + (n + 1) * H, h_new + n * H);
          std::fill(o + n * H, o + (n + 1) * H, T_(0));
          continue;
        }
        const T_* an = a + n * F;
        for (int64_t j = 0; j < H; ++j) {
          const T_ z = an[H + j];
          const T_ h = (1 - z) * an[2 * H + j] + z * h_prev[n * H + j];
          h_new[n * H + j] = h;
          o[n * H + j] = h;
        }
      }
    }
  });
  return {out, hs, acts, ghn, xhat, rstd, bstats, counts};
}

// Returns dgx, dh0, dw_hh, dbias_hh, dgamma_hh (the last two empty when absent).
std::vector<Tensor> gru_backward(const Tensor& grad_out, const Tensor& grad_hn,
                                 const Tensor& w_hh, bool has_bias, const OptTensor& mask,
                                 int64_t kind, int64_t groups, double eps, bool training,
                                 const OptTensor& gamma_hh, const Tensor& hs, const Tensor& acts,
                                 const Tensor& ghn, const Tensor& xhat, const Tensor& rstd,
                                 const Tensor& counts) {
  const NormSpec s{kind, groups, eps, training};
  const int64_t T = acts.size(0), N = acts.size(1), F = acts.size(2), H = F / 3;
  const bool normed = kind != kNone, batch = kind == kBatch;
  const Tensor gout = grad_out.contiguous(), w = w_hh.contiguous();
  Tensor dh = grad_hn.contiguous().clone();
  Tensor dgx = at::empty({T, N, F}, acts.options());
  Tensor dgh = at::empty({T, N, F}, acts.options());  // dL/d(h W_hh^T)
  Tensor dbias = at::zeros({has_bias ? F : 0}, acts.options().dtype(at::kDouble));
  Tensor dgamma = at::zeros({normed ? F : 0}, acts.options().dtype(at::kDouble));
  const int64_t* count = counts.data_ptr<int64_t>();
  const bool* m = mask.has_value() && mask->defined() ? mask->data_ptr<bool>() : nullptr;

  AT_DISPATCH_FLOATING_TYPES(acts.scalar_type(), "seqnorm_gru_backward", [&] {
    using T_ = scalar_t;
    const T_* gam = ptr_or_null<T_>(gamma_hh);
    double* db = dbias.data_ptr<double>();
    double* dgam = dgamma.data_ptr<double>();
    T_* dhp = dh.data_ptr<T_>();
    for (int64_t t = T - 1; t >= 0; --t) {
      const bool* valid = m ? m + t * N : nullptr;
      const T_* a = acts.data_ptr<T_>() + t * N * F;
      const T_* gn = ghn.data_ptr<T_>() + t * N * H;
      const T_* go = gout.data_ptr<T_>() + t * N * H;
      const T_* h_prev = hs.data_ptr<T_>() + t * N * H;
      const T_* xh = xhat.data_ptr<T_>() + t * N * F;
      T_* dg = dgx.data_ptr<T_>() + t * N * F;
      T_* dn = dgh.data_ptr<T_>() + t * N * F;
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) {
          std::fill(dg + n * F, dg + (n + 1) * F, T_(0));
          std::fill(dn + n * F, dn + (n + 1) * F, T_(0));
          continue;
        }
        const T_* an = a + n * F;
        for (int64_t j = 0; j < H; ++j) {
          const int64_t k = n * H + j;
          const T_ r = an[j], z = an[H + j], nn = an[2 * H + j];
          const T_ d = dhp[k] + go[k];
          const T_ dpn = d * (1 - z) * (1 - nn * nn);
          const T_ dpr = dpn * gn[k] * r * (1 - r);
          const T_ dpz = d * (h_prev[k] - nn) * z * (1 - z);
          dg[n * F + j] = dpr;
          dg[n * F + H + j] = dpz;
          dg[n * F + 2 * H + j] = dpn;
          dn[n * F + j] = dpr;
          dn[n * F + H + j] = dpz;
          dn[n * F + 2 * H + j] = dpn * r;
          dhp[k] = d * z;  // the direct path; the one through W_hh is added below
        }
      }
      for (int64_t n = 0; n < N; ++n)
        for (int64_t f = 0; f < F; ++f) {
          const int64_t k = n * F + f;
          if (has_bias) db[f] += dn[k];
          if (normed) {
            dgam[f] += dn[k] * xh[k];
            dn[k] *= gam[f];
          }
        }
      if (normed)
        norm_backward<T_>(s, dn, xh, N, F, valid, rstd.data_ptr<T_>() + t * rstd_stride(s, N, F),
                          batch && count[t] >= 2 && training, count[t]);
      const Tensor dprev = at::mm(dgh[t], w);
      const T_* dp = dprev.data_ptr<T_>();
      for (int64_t n = 0; n < N; ++n) {
        if (valid && !valid[n]) continue;
        for (int64_t j = 0; j < H; ++j) dhp[n * H + j] += dp[n * H + j];
      }
    }
  });
  Tensor dw = at::mm(dgh.reshape({T * N, F}).t(), hs.narrow(0, 0, T).reshape({T * N, H}));
  const auto dtype = acts.scalar_type();
  return {dgx, dh, dw, dbias.to(dtype), dgamma.to(dtype)};
}

}  // namespace

TORCH_LIBRARY(seqnorm_fused, m) {
  m.def(
      "lstm_forward(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? mask, int kind, "
      "int groups, float eps, bool training, Tensor? gamma_hh, Tensor? gamma_c, Tensor? beta_c, "
      "Tensor? run_mean_hh, Tensor? run_var_hh, Tensor? run_mean_c, Tensor? run_var_c) "
      "-> Tensor[]",
      &lstm_forward);
  m.def(
      "lstm_backward(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor w_hh, Tensor? mask, "
      "int kind, int groups, float eps, bool training, Tensor? gamma_hh, Tensor? gamma_c, "
      "Tensor hs, Tensor cs, Tensor acts, Tensor tc, Tensor xhat_hh, Tensor rstd_hh, "
      "Tensor xhat_c, Tensor rstd_c, Tensor counts) -> Tensor[]",
      &lstm_backward);
  m.def(
      "gru_forward(Tensor gx, Tensor h0, Tensor w_hh, Tensor? bias_hh, Tensor? mask, int kind, "
      "int groups, float eps, bool training, Tensor? gamma_hh, Tensor? run_mean_hh, "
      "Tensor? run_var_hh) -> Tensor[]",
      &gru_forward);
  m.def(
      "gru_backward(Tensor grad_out, Tensor grad_hn, Tensor w_hh, bool has_bias, Tensor? mask, "
      "int kind, int groups, float eps, bool training, Tensor? gamma_hh, Tensor hs, Tensor acts, "
      "Tensor ghn, Tensor xhat, Tensor rstd, Tensor counts) -> Tensor[]",
      &gru_backward);
}
