"""Triton pieces shared by the LSTM and GRU kernels: the nonlinearities, the normalizations of a
row (layer and group norm, forward and backward) and of a column over the batch (batch norm),
and the kernels of the input half of the gates (every step at once).

Statistics are overflow-safe: each group's values are scaled by their largest magnitude before
they are squared, so that float32 values of 1e20 and up normalize as the float64 reference
does. A row of gates is a ``(4, BH)`` tile (gate, unit; the GRU's fourth gate row masked off):
feature ``f = k * H + j``; group ``f // (F / G)``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def sigmoid(x):
    z = tl.exp(-tl.abs(x))  # never overflows
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def tanh(x):
    return 2.0 * sigmoid(2.0 * x) - 1.0


@triton.jit
def _total(x):
    """The sum of every element of a 2-D tile."""
    return tl.sum(tl.sum(x, axis=1), axis=0)


@triton.jit
def _rstd(sd, eps):
    """1 / sqrt(sd^2 + eps) from a standard deviation, as 1 / sd beyond 1e18, where sd^2 would
    overflow. Both branches are computed: the first must not divide by an sd of 0 (a padded row,
    a zero state)."""
    return tl.where(sd > 1e18, 1.0 / tl.maximum(sd, 1e18), 1.0 / tl.sqrt(sd * sd + eps))


@triton.jit
def _scaled_moments(v, sel, count, eps):
    """Mean and rstd of the selected elements of ``v`` (a 2-D tile), and ``v`` normalized.

    With ``s`` the largest magnitude: ``u = v / s``, ``var = s^2 var(u)``; rstd is formed from
    the standard deviation ``s * sd(u)``, so that no square of a value is ever taken.
    """
    s = tl.max(tl.max(tl.where(sel, tl.abs(v), 0.0), axis=1), axis=0)
    s = tl.where(s > 0, s, 1.0)
    u = v / s
    mu = _total(tl.where(sel, u, 0.0)) / count
    du = tl.where(sel, u - mu, 0.0)
    sd = s * tl.sqrt(_total(du * du) / count)
    rstd = _rstd(sd, eps)
    return s * mu, rstd, du * (s * rstd)


@triton.jit
def group_norm_row(v, m, gid, G: tl.constexpr, width, eps, rstd_ptr, keep):
    """x_hat of a row tile ``v`` with G groups of ``width`` elements (``gid`` per element, ``m``
    the elements that exist); stores each group's rstd (times ``keep``: 0 for a row that is not
    valid at this step) at ``rstd_ptr + g``."""
    xhat = tl.zeros(v.shape, v.dtype)
    for g in tl.static_range(G):
        sel = m & (gid == g)
        _, rstd, normed = _scaled_moments(v, sel, width, eps)
        xhat = tl.where(sel, normed, xhat)
        tl.store(rstd_ptr + g, rstd * keep)
    return xhat


@triton.jit
def group_norm_row_backward(d, xhat, m, gid, G: tl.constexpr, width, rstd_ptr, ACC: tl.constexpr):
    """dL/dx of a group-normalized row tile from ``d`` = dL/dx_hat."""
    dx = tl.zeros(d.shape, d.dtype)
    for g in tl.static_range(G):
        sel = m & (gid == g)
        a = _total(tl.where(sel, d, 0.0)) / width
        b = _total(tl.where(sel, d * xhat, 0.0)) / width
        r = tl.load(rstd_ptr + g).to(ACC)
        dx = tl.where(sel, r * (d - a - xhat * b), dx)
    return dx


@triton.jit
def valid_count(valid, ACC: tl.constexpr):
    """The valid rows of each column of a tile, at least 1: a step past the end of every
    sequence has none, and batch norm (which then uses its running statistics) would divide by
    0 in the branch it discards."""
    return tl.maximum(tl.sum(valid.to(ACC), axis=0)[None, :], 1.0)


@triton.jit
def batch_norm_columns(
    v, valid, cols, count, use_batch, run_mean_ptr, run_var_ptr, eps, ACC: tl.constexpr
):
    """Batch norm of a ``(BN, BJ)`` tile: per column over the valid rows (``valid`` ``(BN, 1)``)
    when ``use_batch``, else with the running mean and variance of each column (``cols``
    ``(1, BJ)``). Returns x_hat, the mean and rstd used, and the batch mean and biased
    variance (for the running statistics; meaningless unless ``use_batch``)."""
    sel = valid & cols
    s = tl.max(tl.where(sel, tl.abs(v), 0.0), axis=0)[None, :]
    s = tl.where(s > 0, s, 1.0)
    u = v / s
    mu = tl.sum(tl.where(sel, u, 0.0), axis=0)[None, :] / count
    du = tl.where(sel, u - mu, 0.0)
    sd = s * tl.sqrt(tl.sum(du * du, axis=0)[None, :] / count)
    batch_rstd = _rstd(sd, eps)
    batch_mean = s * mu
    run_mean = tl.load(run_mean_ptr, mask=cols, other=0.0).to(ACC)
    run_var = tl.load(run_var_ptr, mask=cols, other=1.0).to(ACC)
    mean = tl.where(use_batch, batch_mean, run_mean)
    rstd = tl.where(use_batch, batch_rstd, 1.0 / tl.sqrt(run_var + eps))
    xhat = tl.where(use_batch, (u - mu) * (s * batch_rstd), (v - run_mean) * rstd)
    return tl.where(cols, xhat, 0.0), mean, rstd, batch_mean, sd * sd


@triton.jit
def batch_norm_columns_backward(d, xhat, valid, cols, count, use_batch, rstd):
    """dL/dx of a batch-normalized ``(BN, BJ)`` tile from ``d`` = dL/dx_hat (zero in the rows
    that are not valid); with running statistics they are constants."""
    a = tl.sum(tl.where(valid & cols, d, 0.0), axis=0)[None, :] / count
    b = tl.sum(tl.where(valid & cols, d * xhat, 0.0), axis=0)[None, :] / count
    through_batch = tl.where(valid, rstd * (d - a - xhat * b), rstd * d)
    return tl.where(use_batch, through_batch, rstd * d)


# --- the input half: y = gamma * N(x W_ih^T) + bias, every step at once ----------------------


@triton.jit
def input_forward_rows(
    PROJ,
    Y,
    XHAT,
    STATS,
    GAMMA,
    BIAS,
    eps,
    F: tl.constexpr,
    BF: tl.constexpr,
    G: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """Layer or group norm of one row (one sample at one step) of the projection."""
    r = tl.program_id(0).to(tl.int64)  # r * F passes 2^31 in long sequences of large batches
    f = tl.arange(0, BF)[None, :]
    m = f < F
    v = tl.load(PROJ + r * F + f, mask=m, other=0.0).to(ACC)
    xhat = group_norm_row(v, m, f // (F // G), G, F // G, eps, STATS + r * G, 1.0)
    y = xhat * tl.load(GAMMA + f, mask=m, other=0.0).to(ACC)
    if HAS_BIAS:
        y += tl.load(BIAS + f, mask=m, other=0.0).to(ACC)
    tl.store(XHAT + r * F + f, xhat.to(XHAT.dtype.element_ty), mask=m)
    tl.store(Y + r * F + f, y.to(Y.dtype.element_ty), mask=m)


@triton.jit
def input_forward_batch(
    PROJ,
    Y,
    XHAT,
    STATS,
    BATCH,
    RUNNING,
    MASK,
    GAMMA,
    BIAS,
    steps,
    N,
    eps,
    training,
    F: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """Batch norm of BJ features of one step over its valid samples (running statistics for a
    step with fewer than two, and in eval mode). Writes the statistics used ``(T, 2, F)`` (mean,
    rstd) and the batch ones ``(2, T, F)`` (mean, biased variance)."""
    t = tl.program_id(0).to(tl.int64)  # (t * N + rows) * F passes 2^31 likewise
    c = tl.program_id(1) * BJ + tl.arange(0, BJ)[None, :]
    rows = tl.arange(0, BN)[:, None]
    cols = c < F
    exists = rows < N
    valid = exists
    if HAS_MASK:
        valid = exists & (tl.load(MASK + t * N + rows, mask=exists, other=0) != 0)
    count = valid_count(valid, ACC)
    use_batch = (count >= 2) & (training != 0)
    offsets = (t * N + rows) * F + c
    v = tl.load(PROJ + offsets, mask=exists & cols, other=0.0).to(ACC)
    xhat, mean, rstd, bmean, bvar = batch_norm_columns(
        v,
        valid,
        cols,
        count,
        use_batch,
        RUNNING + t * F + c,
        RUNNING + (steps + t) * F + c,
        eps,
        ACC,
    )
    y = xhat * tl.load(GAMMA + c, mask=cols, other=0.0).to(ACC)
    if HAS_BIAS:
        y += tl.load(BIAS + c, mask=cols, other=0.0).to(ACC)
    tl.store(XHAT + offsets, xhat.to(XHAT.dtype.element_ty), mask=exists & cols)
    tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=exists & cols)
    tl.store(STATS + t * 2 * F + c, mean.to(STATS.dtype.element_ty), mask=cols)
    tl.store(STATS + (t * 2 + 1) * F + c, rstd.to(STATS.dtype.element_ty), mask=cols)
    keep = cols & use_batch
    tl.store(BATCH + t * F + c, bmean.to(BATCH.dtype.element_ty), mask=keep)
    tl.store(BATCH + (steps + t) * F + c, bvar.to(BATCH.dtype.element_ty), mask=keep)


@triton.jit
def input_backward_rows(
    DY,
    DX,
    XHAT,
    STATS,
    GAMMA,
    F: tl.constexpr,
    BF: tl.constexpr,
    G: tl.constexpr,
    ACC: tl.constexpr,
):
    """dL/d(projection) of one row from dL/dy (gain, then the group norm's backward)."""
    r = tl.program_id(0).to(tl.int64)  # r * F passes 2^31 in long sequences of large batches
    f = tl.arange(0, BF)[None, :]
    m = f < F
    d = tl.load(DY + r * F + f, mask=m, other=0.0).to(ACC)
    d *= tl.load(GAMMA + f, mask=m, other=0.0).to(ACC)
    xhat = tl.load(XHAT + r * F + f, mask=m, other=0.0).to(ACC)
    dx = group_norm_row_backward(d, xhat, m, f // (F // G), G, F // G, STATS + r * G, ACC)
    tl.store(DX + r * F + f, dx.to(DX.dtype.element_ty), mask=m)


@triton.jit
def input_backward_batch(
    DY,
    DX,
    XHAT,
    STATS,
    MASK,
    GAMMA,
    N,
    training,
    F: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)  # (t * N + rows) * F passes 2^31 likewise
    c = tl.program_id(1) * BJ + tl.arange(0, BJ)[None, :]
    rows = tl.arange(0, BN)[:, None]
    cols = c < F
    exists = rows < N
    valid = exists
    if HAS_MASK:
        valid = exists & (tl.load(MASK + t * N + rows, mask=exists, other=0) != 0)
    count = valid_count(valid, ACC)
    use_batch = (count >= 2) & (training != 0)
    offsets = (t * N + rows) * F + c
    d = tl.load(DY + offsets, mask=exists & cols, other=0.0).to(ACC)
    d *= tl.load(GAMMA + c, mask=cols, other=0.0).to(ACC)
    xhat = tl.load(XHAT + offsets, mask=exists & cols, other=0.0).to(ACC)
    rstd = tl.load(STATS + (t * 2 + 1) * F + c, mask=cols, other=0.0).to(ACC)
    dx = batch_norm_columns_backward(d, xhat, valid, cols, count, use_batch, rstd)
    tl.store(DX + offsets, dx.to(DX.dtype.element_ty), mask=exists & cols)
