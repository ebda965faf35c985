// The operators' entry points (their schemas are in registration.cpp; their Python callers in
// seqnorm/ops/library.py).
#pragma once

#include "common.h"

#include <array>

namespace seqnorm {

// Which gradients a backward computes, in the order of its results (seqnorm/ops/library.py's
// LSTM_GRADS and GRU_GRADS).
using LSTMNeeds = std::array<bool, 11>;
using GRUNeeds = std::array<bool, 8>;

std::vector<Tensor> lstm_forward(Tensor& gx, const Tensor& h0, const Tensor& c0,
                                 const Tensor& w_hh, const OptTensor& w_hr,
                                 const OptTensor& gamma_hh, const OptTensor& gamma_c,
                                 const OptTensor& beta_c, const OptTensor& running_mean_hh,
                                 const OptTensor& running_var_hh,
                                 const OptTensor& running_mean_c,
                                 const OptTensor& running_var_c, const OptTensor& mask,
                                 const std::string& norm, int64_t groups, double eps,
                                 bool training, bool keep);

std::vector<Tensor> lstm_backward(const Tensor& grad_out, const Tensor& grad_h,
                                  const Tensor& grad_c, at::TensorList saved, const Tensor& x,
                                  const Tensor& w_ih, const Tensor& w_hh, const OptTensor& w_hr,
                                  const OptTensor& gamma_ih, const OptTensor& gamma_hh,
                                  const OptTensor& gamma_c, const OptTensor& beta_c,
                                  const OptTensor& mask, const std::string& norm, int64_t groups,
                                  double eps, bool training, LSTMNeeds needs);

std::vector<Tensor> gru_forward(Tensor& gx, const Tensor& h0, const Tensor& w_hh,
                                const OptTensor& b_hh, const OptTensor& gamma_hh,
                                const OptTensor& running_mean_hh,
                                const OptTensor& running_var_hh, const OptTensor& mask,
                                const std::string& norm, int64_t groups, double eps,
                                bool training, bool keep);

std::vector<Tensor> gru_backward(const Tensor& grad_out, const Tensor& grad_h,
                                 at::TensorList saved, const Tensor& x, const Tensor& w_ih,
                                 const Tensor& w_hh, const OptTensor& b_hh,
                                 const OptTensor& gamma_ih, const OptTensor& gamma_hh,
                                 const OptTensor& mask, const std::string& norm, int64_t groups,
                                 double eps, bool training, GRUNeeds needs);

// Batch norm's running statistics (S, F) moved by the batch statistics (2, T, F) of steps 0..T-1
// with at least two valid samples (counts), in place.
void update_running_stats(Tensor& running_mean, Tensor& running_var, const Tensor& batch,
                          const Tensor& counts, double momentum);

}  // namespace seqnorm
