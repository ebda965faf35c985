// The input half of the gates, forward and backward: y = gamma * N(x W_ih^T) + beta for every
// step at once (beta holds the cell's biases), and its gradients, which the recurrence's
// backward hands on a chunk of steps at a time (InputGrad).
#pragma once

#include "common.h"

#include <array>

namespace seqnorm {

// Projects, normalizes and shifts the input of every step: x (steps, N, I), w_ih (F, I),
// running_mean and running_var (steps, F): batch norm's, of every step. Returns the gates' input
// half y (steps, N, F), x_hat, the statistics, the batch statistics and the valid counts; x_hat
// and y share one buffer without a backward (keep false), and are one tensor without a norm.
std::vector<Tensor> input_forward(const Tensor& x, const Tensor& w_ih, const OptTensor& bias,
                                  const OptTensor& gamma, const OptTensor& running_mean,
                                  const OptTensor& running_var, const OptTensor& mask,
                                  const std::string& norm, int64_t groups, double eps,
                                  bool training, bool keep);

// Which gradients of the input half to compute.
struct InputNeeds {
  bool x, w_ih, gamma, bias;
};

// The input half's gradients, a chunk of steps at a time: the backward writes step t's dL/dy
// (N, F) into at(t) and calls done(t), walking t down from steps - 1, as for WeightGrad. Each
// chunk goes through the norm's backward and gain (in place: dy becomes dL/d(x W_ih^T)), then
// into dW_ih and dx as matrix products, while it is in cache; no (steps, N, F) gradient is ever
// stored.
class InputGrad {
 public:
  // x (steps, N, I) and w_ih (F, I): the layer input and weight; xhat and stats from
  // input_forward (undefined without a norm); count: the valid samples of every step.
  InputGrad(const NormConfig& s, const Tensor& x, const Tensor& w_ih, const OptTensor& gamma,
            const Tensor& xhat, const Tensor& stats, InputNeeds needs, const bool* mask,
            const int64_t* count, int64_t steps, int64_t N, int64_t F);
  Tensor at(int64_t t) { return ring_[t % K_]; }
  template <typename scalar_t>
  scalar_t* ptr(int64_t t) {  // at(t)'s data, with no tensor made
    return ring_.data_ptr<scalar_t>() + (t % K_) * N_ * F_;
  }
  void done(int64_t t);
  Tensor ring() const { return ring_; }

  Tensor dx, dw;              // undefined unless needed
  Accumulator dgamma, dbias;  // empty unless needed

 private:
  template <typename scalar_t>
  void backward(int64_t t0, int64_t len, scalar_t* dy);

  NormConfig s_;
  Tensor x_, w_ih_, gamma_, xhat_, stats_, ring_;
  const bool* mask_;
  const int64_t* count_;
  int64_t K_, steps_, N_, F_, stride_ = 0;
};

}  // namespace seqnorm
