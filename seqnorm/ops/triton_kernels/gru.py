"""One GRU step on the GPU, forward and backward, after the step's product ``z = h W_hh^T``
(DESIGN.md section 2), organized as the LSTM's (lstm.py): a program per sample for layer and
group norm, per block of units over every sample for batch norm. A row's 3H features are a
``(4, BH)`` tile whose fourth gate row is masked off.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .lstm import gate_row, valid_row
from .norms import (
    batch_norm_columns,
    batch_norm_columns_backward,
    group_norm_row,
    group_norm_row_backward,
    sigmoid,
    tanh,
    valid_count,
)


@triton.jit
def gru_step_rows(
    Z,
    GX,
    H_PREV,
    H_NEW,
    OUT,
    ACTS,
    GH_N,
    XHAT_HH,
    STATS_HH,
    MASK,
    GAMMA_HH,
    B_HH,
    eps,
    H: tl.constexpr,
    BH: tl.constexpr,
    G: tl.constexpr,
    NORMED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    n = tl.program_id(0)
    F: tl.constexpr = 3 * H
    k = tl.arange(0, 4)[:, None]
    j = tl.arange(0, BH)[None, :]
    f = k * H + j
    m = (k < 3) & (j < H)
    jj = tl.arange(0, BH)
    mj = jj < H
    valid = valid_row(MASK, n, HAS_MASK)
    z = tl.load(Z + n * F + f, mask=m, other=0.0).to(ACC)
    if NORMED:
        xz = group_norm_row(z, m, f // (F // G), G, F // G, eps, STATS_HH + n * G, 1.0)
        tl.store(XHAT_HH + n * F + f, xz.to(XHAT_HH.dtype.element_ty), mask=m)
        gh = xz * tl.load(GAMMA_HH + f, mask=m, other=0.0).to(ACC)
    else:
        gh = z
    if HAS_BIAS:
        gh += tl.load(B_HH + f, mask=m, other=0.0).to(ACC)
    gx = tl.load(GX + n * F + f, mask=m, other=0.0).to(ACC)
    r = sigmoid(gate_row(gx, k, 0) + gate_row(gh, k, 0))
    zg = sigmoid(gate_row(gx, k, 1) + gate_row(gh, k, 1))
    gh_n = gate_row(gh, k, 2)
    nn = tanh(gate_row(gx, k, 2) + r * gh_n)
    act = tl.where(k == 0, r[None, :], tl.where(k == 1, zg[None, :], nn[None, :]))
    tl.store(ACTS + n * F + f, act.to(ACTS.dtype.element_ty), mask=m)
    tl.store(GH_N + n * H + jj, gh_n.to(GH_N.dtype.element_ty), mask=mj)
    h_prev = tl.load(H_PREV + n * H + jj, mask=mj, other=0.0)
    h = (1.0 - zg) * nn + zg * h_prev.to(ACC)
    tl.store(H_NEW + n * H + jj, tl.where(valid, h.to(h_prev.dtype), h_prev), mask=mj)
    tl.store(OUT + n * H + jj, (h * valid.to(ACC)).to(OUT.dtype.element_ty), mask=mj)


@triton.jit
def _batch_half(
    Z,
    XHAT_HH,
    STATS_T,
    BATCH_MEAN_T,
    BATCH_VAR_T,
    RUN_MEAN_T,
    RUN_VAR_T,
    GAMMA_HH,
    B_HH,
    rows,
    exists,
    valid,
    jc,
    cols,
    count,
    use_batch,
    eps,
    index: tl.constexpr,
    H: tl.constexpr,
    F: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC: tl.constexpr,
):
    """One gate's recurrent half ``Nh(h W_hh^T) + b_hh`` for a block of units over every sample."""
    feat = index * H + jc
    offsets = rows * F + feat
    both = exists & cols
    z = tl.load(Z + offsets, mask=both, other=0.0).to(ACC)
    xz, mean, rstd, bmean, bvar = batch_norm_columns(
        z, valid, cols, count, use_batch, RUN_MEAN_T + feat, RUN_VAR_T + feat, eps, ACC
    )
    tl.store(XHAT_HH + offsets, xz.to(XHAT_HH.dtype.element_ty), mask=both)
    tl.store(STATS_T + feat, mean.to(STATS_T.dtype.element_ty), mask=cols)
    tl.store(STATS_T + F + feat, rstd.to(STATS_T.dtype.element_ty), mask=cols)
    tl.store(BATCH_MEAN_T + feat, bmean.to(BATCH_MEAN_T.dtype.element_ty), mask=cols & use_batch)
    tl.store(BATCH_VAR_T + feat, bvar.to(BATCH_VAR_T.dtype.element_ty), mask=cols & use_batch)
    gh = xz * tl.load(GAMMA_HH + feat, mask=cols, other=0.0).to(ACC)
    if HAS_BIAS:
        gh += tl.load(B_HH + feat, mask=cols, other=0.0).to(ACC)
    return gh


@triton.jit
def gru_step_batch(
    Z,
    GX,
    H_PREV,
    H_NEW,
    OUT,
    ACTS,
    GH_N,
    XHAT_HH,
    STATS_HH,
    MASK,
    GAMMA_HH,
    B_HH,
    RUN_HH,
    BATCH_HH,
    t,
    steps,
    N,
    eps,
    training,
    H: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Batch norm: BJ units of every sample at step ``t`` (see lstm_step_batch)."""
    F: tl.constexpr = 3 * H
    RUN_MEAN = RUN_HH + t * F
    RUN_VAR = RUN_HH + (steps + t) * F
    BATCH_MEAN = BATCH_HH + t * F
    BATCH_VAR = BATCH_HH + (steps + t) * F
    jc = tl.program_id(0) * BJ + tl.arange(0, BJ)[None, :]
    cols = jc < H
    rows = tl.arange(0, BN)[:, None]
    exists = rows < N
    both = exists & cols
    valid = exists
    if HAS_MASK:
        valid = exists & (tl.load(MASK + rows, mask=exists, other=0) != 0)
    count = valid_count(valid, ACC)
    use_batch = (count >= 2) & (training != 0)
    base = rows * F + jc
    # one call per gate, the same arguments but the gate's index; each gate's activation follows
    # its call (with the three calls first, Triton 3.6's ptxas spilled 8 bytes on sm_80)
    # fmt: off
    gh_r = _batch_half(Z, XHAT_HH, STATS_HH, BATCH_MEAN, BATCH_VAR, RUN_MEAN, RUN_VAR, GAMMA_HH,
                       B_HH, rows, exists, valid, jc, cols, count, use_batch, eps, 0, H, F,
                       HAS_BIAS, ACC)
    r = sigmoid(tl.load(GX + base, mask=both, other=0.0).to(ACC) + gh_r)
    tl.store(ACTS + base, r.to(ACTS.dtype.element_ty), mask=both)
    gh_z = _batch_half(Z, XHAT_HH, STATS_HH, BATCH_MEAN, BATCH_VAR, RUN_MEAN, RUN_VAR, GAMMA_HH,
                       B_HH, rows, exists, valid, jc, cols, count, use_batch, eps, 1, H, F,
                       HAS_BIAS, ACC)
    zg = sigmoid(tl.load(GX + base + H, mask=both, other=0.0).to(ACC) + gh_z)
    tl.store(ACTS + base + H, zg.to(ACTS.dtype.element_ty), mask=both)
    gh_n = _batch_half(Z, XHAT_HH, STATS_HH, BATCH_MEAN, BATCH_VAR, RUN_MEAN, RUN_VAR, GAMMA_HH,
                       B_HH, rows, exists, valid, jc, cols, count, use_batch, eps, 2, H, F,
                       HAS_BIAS, ACC)
    # fmt: on
    nn = tanh(tl.load(GX + base + 2 * H, mask=both, other=0.0).to(ACC) + r * gh_n)
    tl.store(ACTS + base + 2 * H, nn.to(ACTS.dtype.element_ty), mask=both)
    units = rows * H + jc
    tl.store(GH_N + units, gh_n.to(GH_N.dtype.element_ty), mask=both)
    h_prev = tl.load(H_PREV + units, mask=both, other=0.0)
    h = (1.0 - zg) * nn + zg * h_prev.to(ACC)
    tl.store(H_NEW + units, tl.where(valid, h.to(h_prev.dtype), h_prev), mask=both)
    tl.store(OUT + units, (h * valid.to(ACC)).to(OUT.dtype.element_ty), mask=both)


@triton.jit
def gru_step_rows_backward(
    DH,
    DOUT,
    DGATES,
    DGH,
    DZ,
    ACTS,
    GH_N,
    H_PREV,
    XHAT_HH,
    STATS_HH,
    MASK,
    GAMMA_HH,
    H: tl.constexpr,
    BH: tl.constexpr,
    G: tl.constexpr,
    NORMED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Backward through one step of one sample: dL/dgx (DGATES), dL/d(recurrent half) (DGH, for
    b_hh and the gain), dL/dz (DZ); DH becomes the direct path's d * z where the row is valid
    (the driver adds dz W_hh)."""
    n = tl.program_id(0)
    F: tl.constexpr = 3 * H
    k = tl.arange(0, 4)[:, None]
    j = tl.arange(0, BH)[None, :]
    f = k * H + j
    m = (k < 3) & (j < H)
    jj = tl.arange(0, BH)
    mj = jj < H
    valid = valid_row(MASK, n, HAS_MASK)
    keep = valid.to(ACC)
    dh = tl.load(DH + n * H + jj, mask=mj, other=0.0).to(ACC)
    d = dh + tl.load(DOUT + n * H + jj, mask=mj, other=0.0).to(ACC)
    act = tl.load(ACTS + n * F + f, mask=m, other=0.0).to(ACC)
    r, zg, nn = gate_row(act, k, 0), gate_row(act, k, 1), gate_row(act, k, 2)
    gh_n = tl.load(GH_N + n * H + jj, mask=mj, other=0.0).to(ACC)
    h_prev = tl.load(H_PREV + n * H + jj, mask=mj, other=0.0).to(ACC)
    dn = d * (1.0 - zg) * (1.0 - nn * nn)
    dr = dn * gh_n * r * (1.0 - r)
    dz_gate = d * (h_prev - nn) * zg * (1.0 - zg)
    dgates = tl.where(k == 0, dr[None, :], tl.where(k == 1, dz_gate[None, :], dn[None, :])) * keep
    dgh = (
        tl.where(k == 0, dr[None, :], tl.where(k == 1, dz_gate[None, :], (dn * r)[None, :])) * keep
    )
    tl.store(DGATES + n * F + f, dgates.to(DGATES.dtype.element_ty), mask=m)
    tl.store(DGH + n * F + f, dgh.to(DGH.dtype.element_ty), mask=m)
    if NORMED:
        xz = tl.load(XHAT_HH + n * F + f, mask=m, other=0.0).to(ACC)
        dx = dgh * tl.load(GAMMA_HH + f, mask=m, other=0.0).to(ACC)
        dx = group_norm_row_backward(dx, xz, m, f // (F // G), G, F // G, STATS_HH + n * G, ACC)
        tl.store(DZ + n * F + f, (dx * keep).to(DZ.dtype.element_ty), mask=m)
    tl.store(DH + n * H + jj, tl.where(valid, d * zg, dh).to(DH.dtype.element_ty), mask=mj)


@triton.jit
def _batch_half_backward(
    dgh,
    DGH,
    DZ,
    XHAT_HH,
    STATS_HH,
    GAMMA_HH,
    rows,
    both,
    valid,
    jc,
    cols,
    count,
    use_batch,
    index: tl.constexpr,
    H: tl.constexpr,
    F: tl.constexpr,
    ACC: tl.constexpr,
):
    feat = index * H + jc
    offsets = rows * F + feat
    tl.store(DGH + offsets, dgh.to(DGH.dtype.element_ty), mask=both)
    xz = tl.load(XHAT_HH + offsets, mask=both, other=0.0).to(ACC)
    gamma = tl.load(GAMMA_HH + feat, mask=cols, other=0.0).to(ACC)
    rstd = tl.load(STATS_HH + F + feat, mask=cols, other=0.0).to(ACC)
    dz = batch_norm_columns_backward(dgh * gamma, xz, valid, cols, count, use_batch, rstd)
    tl.store(DZ + offsets, dz.to(DZ.dtype.element_ty), mask=both)


@triton.jit
def gru_step_batch_backward(
    DH,
    DOUT,
    DGATES,
    DGH,
    DZ,
    ACTS,
    GH_N,
    H_PREV,
    XHAT_HH,
    STATS_HH,
    MASK,
    GAMMA_HH,
    N,
    training,
    H: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    F: tl.constexpr = 3 * H
    jc = tl.program_id(0) * BJ + tl.arange(0, BJ)[None, :]
    cols = jc < H
    rows = tl.arange(0, BN)[:, None]
    exists = rows < N
    both = exists & cols
    valid = exists
    if HAS_MASK:
        valid = exists & (tl.load(MASK + rows, mask=exists, other=0) != 0)
    count = valid_count(valid, ACC)
    use_batch = (count >= 2) & (training != 0)
    keep = valid.to(ACC)
    units = rows * H + jc
    base = rows * F + jc
    dh = tl.load(DH + units, mask=both, other=0.0).to(ACC)
    d = (dh + tl.load(DOUT + units, mask=both, other=0.0).to(ACC)) * keep
    r = tl.load(ACTS + base, mask=both, other=0.0).to(ACC)
    zg = tl.load(ACTS + base + H, mask=both, other=0.0).to(ACC)
    nn = tl.load(ACTS + base + 2 * H, mask=both, other=0.0).to(ACC)
    gh_n = tl.load(GH_N + units, mask=both, other=0.0).to(ACC)
    h_prev = tl.load(H_PREV + units, mask=both, other=0.0).to(ACC)
    dn = d * (1.0 - zg) * (1.0 - nn * nn)
    dr = dn * gh_n * r * (1.0 - r)
    dz_gate = d * (h_prev - nn) * zg * (1.0 - zg)
    tl.store(DGATES + base, dr.to(DGATES.dtype.element_ty), mask=both)
    tl.store(DGATES + base + H, dz_gate.to(DGATES.dtype.element_ty), mask=both)
    tl.store(DGATES + base + 2 * H, dn.to(DGATES.dtype.element_ty), mask=both)
    _batch_half_backward(
        dr,
        DGH,
        DZ,
        XHAT_HH,
        STATS_HH,
        GAMMA_HH,
        rows,
        both,
        valid,
        jc,
        cols,
        count,
        use_batch,
        0,
        H,
        F,
        ACC,
    )
    _batch_half_backward(
        dz_gate,
        DGH,
        DZ,
        XHAT_HH,
        STATS_HH,
        GAMMA_HH,
        rows,
        both,
        valid,
        jc,
        cols,
        count,
        use_batch,
        1,
        H,
        F,
        ACC,
    )
    _batch_half_backward(
        dn * r,
        DGH,
        DZ,
        XHAT_HH,
        STATS_HH,
        GAMMA_HH,
        rows,
        both,
        valid,
        jc,
        cols,
        count,
        use_batch,
        2,
        H,
        F,
        ACC,
    )
    tl.store(DH + units, tl.where(valid, d * zg, dh).to(DH.dtype.element_ty), mask=both)
