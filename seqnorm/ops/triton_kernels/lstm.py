"""One LSTM step on the GPU, forward and backward, after the step's product ``z = h W_hh^T``:
the recurrent norm, the gates, the cell state, its norm and the output, with the padding mask
(DESIGN.md section 2). Layer and group norm: one program per sample (row). Batch norm: one
program per block of hidden units holding every sample, since its statistics are per feature
over the batch. With projections the kernel writes ``h'`` before the projection (``hpre``), and
the driver projects it.
"""

from __future__ import annotations

import triton
import triton.language as tl

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
def valid_row(MASK, n, HAS_MASK: tl.constexpr):
    if HAS_MASK:
        return tl.load(MASK + n) != 0
    return n >= 0


@triton.jit
def gate_row(act, k, index: tl.constexpr):
    """One gate's ``(BH,)`` values out of a row's ``(4, BH)`` tile."""
    return tl.sum(tl.where(k == index, act, 0.0), axis=0)


@triton.jit
def lstm_step_rows(
    Z,
    GX,
    H_PREV,
    C_PREV,
    H_NEW,
    C_NEW,
    OUT,
    ACTS,
    XHAT_HH,
    STATS_HH,
    XHAT_C,
    STATS_C,
    HPRE,
    MASK,
    GAMMA_HH,
    GAMMA_C,
    BETA_C,
    eps,
    H: tl.constexpr,
    BH: tl.constexpr,
    G: tl.constexpr,
    NORMED: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    n = tl.program_id(0)
    F: tl.constexpr = 4 * H
    k = tl.arange(0, 4)[:, None]
    j = tl.arange(0, BH)[None, :]
    f = k * H + j
    m = j < H
    jj = tl.arange(0, BH)
    mj = jj < H
    valid = valid_row(MASK, n, HAS_MASK)
    keep = valid.to(ACC)
    z = tl.load(Z + n * F + f, mask=m, other=0.0).to(ACC)
    pre = tl.load(GX + n * F + f, mask=m, other=0.0).to(ACC)
    if NORMED:
        xz = group_norm_row(z, m, f // (F // G), G, F // G, eps, STATS_HH + n * G, 1.0)
        tl.store(XHAT_HH + n * F + f, xz.to(XHAT_HH.dtype.element_ty), mask=m)
        pre += xz * tl.load(GAMMA_HH + f, mask=m, other=0.0).to(ACC)
    else:
        pre += z
    act = tl.where(k == 2, tanh(pre), sigmoid(pre))
    tl.store(ACTS + n * F + f, act.to(ACTS.dtype.element_ty), mask=m)
    i, fg, g, o = gate_row(act, k, 0), gate_row(act, k, 1), gate_row(act, k, 2), gate_row(act, k, 3)
    cp = tl.load(C_PREV + n * H + jj, mask=mj, other=0.0).to(ACC)
    c = fg * cp + i * g
    tl.store(C_NEW + n * H + jj, tl.where(valid, c, cp).to(C_NEW.dtype.element_ty), mask=mj)
    if NORMED:
        gid = (jj // (H // G))[None, :]
        xc = group_norm_row(c[None, :], mj[None, :], gid, G, H // G, eps, STATS_C + n * G, keep)
        xc = tl.sum(xc, axis=0)
        tl.store(XHAT_C + n * H + jj, (xc * keep).to(XHAT_C.dtype.element_ty), mask=mj)
        y = xc * tl.load(GAMMA_C + jj, mask=mj, other=0.0).to(ACC)
        y += tl.load(BETA_C + jj, mask=mj, other=0.0).to(ACC)
    else:
        y = c
    hp = o * tanh(y)
    if PROJ:
        tl.store(HPRE + n * H + jj, (hp * keep).to(HPRE.dtype.element_ty), mask=mj)
    else:
        h_prev = tl.load(H_PREV + n * H + jj, mask=mj, other=0.0)
        tl.store(H_NEW + n * H + jj, tl.where(valid, hp.to(h_prev.dtype), h_prev), mask=mj)
        tl.store(OUT + n * H + jj, (hp * keep).to(OUT.dtype.element_ty), mask=mj)


@triton.jit
def _batch_gate(
    Z,
    GX,
    ACTS,
    XHAT_HH,
    STATS_T,
    BATCH_MEAN_T,
    BATCH_VAR_T,
    RUN_MEAN_T,
    RUN_VAR_T,
    GAMMA_HH,
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
    ACC: tl.constexpr,
):
    """One gate of a block of units over every sample: batch-normalized, activated, stored."""
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
    pre = tl.load(GX + offsets, mask=both, other=0.0).to(ACC)
    pre += xz * tl.load(GAMMA_HH + feat, mask=cols, other=0.0).to(ACC)
    if index == 2:
        act = tanh(pre)
    else:
        act = sigmoid(pre)
    tl.store(ACTS + offsets, act.to(ACTS.dtype.element_ty), mask=both)
    return act


@triton.jit
def lstm_step_batch(
    Z,
    GX,
    H_PREV,
    C_PREV,
    H_NEW,
    C_NEW,
    OUT,
    ACTS,
    XHAT_HH,
    STATS_HH,
    XHAT_C,
    STATS_C,
    HPRE,
    MASK,
    GAMMA_HH,
    GAMMA_C,
    BETA_C,
    RUN_HH,
    RUN_C,
    BATCH_HH,
    BATCH_C,
    t,
    steps,
    N,
    eps,
    training,
    H: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Batch norm: BJ units of every sample at step ``t``. ``RUN_*`` and ``BATCH_*`` (2, T, F) are
    the running statistics of every step and the batch ones (mean rows, then variance rows);
    ``STATS_*`` (2, F) this step's mean and rstd as used."""
    F: tl.constexpr = 4 * H
    RUN_MEAN = RUN_HH + t * F
    RUN_VAR = RUN_HH + (steps + t) * F
    BATCH_MEAN = BATCH_HH + t * F
    BATCH_VAR = BATCH_HH + (steps + t) * F
    jc = tl.program_id(0) * BJ + tl.arange(0, BJ)[None, :]
    cols = jc < H
    rows = tl.arange(0, BN)[:, None]
    exists = rows < N
    valid = exists
    if HAS_MASK:
        valid = exists & (tl.load(MASK + rows, mask=exists, other=0) != 0)
    count = valid_count(valid, ACC)
    use_batch = (count >= 2) & (training != 0)
    # one call per gate, the same arguments but the gate's index
    # fmt: off
    i  = _batch_gate(Z, GX, ACTS, XHAT_HH, STATS_HH, BATCH_MEAN, BATCH_VAR, RUN_MEAN, RUN_VAR,
                     GAMMA_HH, rows, exists, valid, jc, cols, count, use_batch, eps, 0, H, F, ACC)
    fg = _batch_gate(Z, GX, ACTS, XHAT_HH, STATS_HH, BATCH_MEAN, BATCH_VAR, RUN_MEAN, RUN_VAR,
                     GAMMA_HH, rows, exists, valid, jc, cols, count, use_batch, eps, 1, H, F, ACC)
    g  = _batch_gate(Z, GX, ACTS, XHAT_HH, STATS_HH, BATCH_MEAN, BATCH_VAR, RUN_MEAN, RUN_VAR,
                     GAMMA_HH, rows, exists, valid, jc, cols, count, use_batch, eps, 2, H, F, ACC)
    o  = _batch_gate(Z, GX, ACTS, XHAT_HH, STATS_HH, BATCH_MEAN, BATCH_VAR, RUN_MEAN, RUN_VAR,
                     GAMMA_HH, rows, exists, valid, jc, cols, count, use_batch, eps, 3, H, F, ACC)
    # fmt: on
    units = rows * H + jc
    both = exists & cols
    cp = tl.load(C_PREV + units, mask=both, other=0.0).to(ACC)
    c = fg * cp + i * g
    xc, mean, rstd, bmean, bvar = batch_norm_columns(
        c, valid, cols, count, use_batch, RUN_C + t * H + jc, RUN_C + (steps + t) * H + jc, eps, ACC
    )
    tl.store(XHAT_C + units, tl.where(valid, xc, 0.0).to(XHAT_C.dtype.element_ty), mask=both)
    tl.store(STATS_C + jc, mean.to(STATS_C.dtype.element_ty), mask=cols)
    tl.store(STATS_C + H + jc, rstd.to(STATS_C.dtype.element_ty), mask=cols)
    tl.store(BATCH_C + t * H + jc, bmean.to(BATCH_C.dtype.element_ty), mask=cols & use_batch)
    tl.store(
        BATCH_C + (steps + t) * H + jc, bvar.to(BATCH_C.dtype.element_ty), mask=cols & use_batch
    )
    y = xc * tl.load(GAMMA_C + jc, mask=cols, other=0.0).to(ACC)
    y += tl.load(BETA_C + jc, mask=cols, other=0.0).to(ACC)
    hp = o * tanh(y)
    tl.store(C_NEW + units, tl.where(valid, c, cp).to(C_NEW.dtype.element_ty), mask=both)
    keep = valid.to(ACC)
    if PROJ:
        tl.store(HPRE + units, (hp * keep).to(HPRE.dtype.element_ty), mask=both)
    else:
        h_prev = tl.load(H_PREV + units, mask=both, other=0.0)
        tl.store(H_NEW + units, tl.where(valid, hp.to(h_prev.dtype), h_prev), mask=both)
        tl.store(OUT + units, (hp * keep).to(OUT.dtype.element_ty), mask=both)


@triton.jit
def lstm_step_rows_backward(
    DH,
    DOUT,
    DHPRE,
    DC,
    DGATES,
    DZ,
    DNC,
    ACTS,
    C_PREV,
    C_NEW,
    XHAT_C,
    STATS_C,
    XHAT_HH,
    STATS_HH,
    MASK,
    GAMMA_HH,
    GAMMA_C,
    BETA_C,
    H: tl.constexpr,
    BH: tl.constexpr,
    G: tl.constexpr,
    NORMED: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    """Backward through one step of one sample: dL/d(gates) (DGATES, the input half's), dL/dz
    (DZ, for dW_hh and dh), dL/d(Nc(c')) (DNC, for the cell norm's gain and shift), and the
    carried dc in place. dh is the driver's: it is replaced by dz W_hh where the row is valid."""
    n = tl.program_id(0)
    F: tl.constexpr = 4 * H
    k = tl.arange(0, 4)[:, None]
    j = tl.arange(0, BH)[None, :]
    f = k * H + j
    m = j < H
    jj = tl.arange(0, BH)
    mj = jj < H
    valid = valid_row(MASK, n, HAS_MASK)
    keep = valid.to(ACC)
    if PROJ:
        dho = tl.load(DHPRE + n * H + jj, mask=mj, other=0.0).to(ACC)
    else:
        dho = tl.load(DH + n * H + jj, mask=mj, other=0.0).to(ACC)
        dho += tl.load(DOUT + n * H + jj, mask=mj, other=0.0).to(ACC)
    act = tl.load(ACTS + n * F + f, mask=m, other=0.0).to(ACC)
    i, fg, g, o = gate_row(act, k, 0), gate_row(act, k, 1), gate_row(act, k, 2), gate_row(act, k, 3)
    if NORMED:
        xc = tl.load(XHAT_C + n * H + jj, mask=mj, other=0.0).to(ACC)
        gamma_c = tl.load(GAMMA_C + jj, mask=mj, other=0.0).to(ACC)
        tc = tanh(gamma_c * xc + tl.load(BETA_C + jj, mask=mj, other=0.0).to(ACC))
    else:
        tc = tanh(tl.load(C_NEW + n * H + jj, mask=mj, other=0.0).to(ACC))
    dy = dho * o * (1.0 - tc * tc)
    if NORMED:
        tl.store(DNC + n * H + jj, (dy * keep).to(DNC.dtype.element_ty), mask=mj)
        gid = (jj // (H // G))[None, :]
        dcn = group_norm_row_backward(
            (dy * gamma_c)[None, :], xc[None, :], mj[None, :], gid, G, H // G, STATS_C + n * G, ACC
        )
        dcn = tl.sum(dcn, axis=0)
    else:
        dcn = dy
    dc = tl.load(DC + n * H + jj, mask=mj, other=0.0).to(ACC)
    dct = dc + dcn
    cp = tl.load(C_PREV + n * H + jj, mask=mj, other=0.0).to(ACC)
    di = dct * g * i * (1.0 - i)
    df = dct * cp * fg * (1.0 - fg)
    dg = dct * i * (1.0 - g * g)
    do = dho * tc * o * (1.0 - o)
    dgates = tl.where(
        k == 0,
        di[None, :],
        tl.where(k == 1, df[None, :], tl.where(k == 2, dg[None, :], do[None, :])),
    )
    dgates = dgates * keep
    tl.store(DGATES + n * F + f, dgates.to(DGATES.dtype.element_ty), mask=m)
    if NORMED:
        xz = tl.load(XHAT_HH + n * F + f, mask=m, other=0.0).to(ACC)
        d = dgates * tl.load(GAMMA_HH + f, mask=m, other=0.0).to(ACC)
        dz = group_norm_row_backward(d, xz, m, f // (F // G), G, F // G, STATS_HH + n * G, ACC)
        tl.store(DZ + n * F + f, (dz * keep).to(DZ.dtype.element_ty), mask=m)
    tl.store(DC + n * H + jj, tl.where(valid, dct * fg, dc).to(DC.dtype.element_ty), mask=mj)


@triton.jit
def _batch_gate_backward(
    dgate,
    DGATES,
    DZ,
    XHAT_HH,
    STATS_HH,
    GAMMA_HH,
    rows,
    both,
    valid,
    keep,
    jc,
    cols,
    count,
    use_batch,
    index: tl.constexpr,
    H: tl.constexpr,
    F: tl.constexpr,
    ACC: tl.constexpr,
):
    """One gate's dL/d(pre-activation) of a block of units: stored, and through batch norm."""
    feat = index * H + jc
    offsets = rows * F + feat
    dgate = dgate * keep
    tl.store(DGATES + offsets, dgate.to(DGATES.dtype.element_ty), mask=both)
    xz = tl.load(XHAT_HH + offsets, mask=both, other=0.0).to(ACC)
    gamma = tl.load(GAMMA_HH + feat, mask=cols, other=0.0).to(ACC)
    rstd = tl.load(STATS_HH + F + feat, mask=cols, other=0.0).to(ACC)
    dz = batch_norm_columns_backward(dgate * gamma, xz, valid, cols, count, use_batch, rstd)
    tl.store(DZ + offsets, dz.to(DZ.dtype.element_ty), mask=both)


@triton.jit
def lstm_step_batch_backward(
    DH,
    DOUT,
    DHPRE,
    DC,
    DGATES,
    DZ,
    DNC,
    ACTS,
    C_PREV,
    XHAT_C,
    STATS_C,
    XHAT_HH,
    STATS_HH,
    MASK,
    GAMMA_HH,
    GAMMA_C,
    BETA_C,
    N,
    training,
    H: tl.constexpr,
    BN: tl.constexpr,
    BJ: tl.constexpr,
    PROJ: tl.constexpr,
    HAS_MASK: tl.constexpr,
    ACC: tl.constexpr,
):
    """As lstm_step_rows_backward for batch norm: BJ units of every sample."""
    F: tl.constexpr = 4 * H
    jc = tl.program_id(0) * BJ + tl.arange(0, BJ)[None, :]
    cols = jc < H
    rows = tl.arange(0, BN)[:, None]
    exists = rows < N
    valid = exists
    if HAS_MASK:
        valid = exists & (tl.load(MASK + rows, mask=exists, other=0) != 0)
    count = valid_count(valid, ACC)
    use_batch = (count >= 2) & (training != 0)
    keep = valid.to(ACC)
    units = rows * H + jc
    both = exists & cols
    if PROJ:
        dho = tl.load(DHPRE + units, mask=both, other=0.0).to(ACC)
    else:
        dho = tl.load(DH + units, mask=both, other=0.0).to(ACC)
        dho += tl.load(DOUT + units, mask=both, other=0.0).to(ACC)
    dho *= keep
    i = tl.load(ACTS + rows * F + jc, mask=both, other=0.0).to(ACC)
    fg = tl.load(ACTS + rows * F + H + jc, mask=both, other=0.0).to(ACC)
    g = tl.load(ACTS + rows * F + 2 * H + jc, mask=both, other=0.0).to(ACC)
    o = tl.load(ACTS + rows * F + 3 * H + jc, mask=both, other=0.0).to(ACC)
    xc = tl.load(XHAT_C + units, mask=both, other=0.0).to(ACC)
    gamma_c = tl.load(GAMMA_C + jc, mask=cols, other=0.0).to(ACC)
    tc = tanh(gamma_c * xc + tl.load(BETA_C + jc, mask=cols, other=0.0).to(ACC))
    dy = dho * o * (1.0 - tc * tc)
    tl.store(DNC + units, dy.to(DNC.dtype.element_ty), mask=both)
    rstd_c = tl.load(STATS_C + H + jc, mask=cols, other=0.0).to(ACC)
    dcn = batch_norm_columns_backward(dy * gamma_c, xc, valid, cols, count, use_batch, rstd_c)
    dc = tl.load(DC + units, mask=both, other=0.0).to(ACC)
    dct = dc + dcn
    cp = tl.load(C_PREV + units, mask=both, other=0.0).to(ACC)
    _batch_gate_backward(
        dct * g * i * (1.0 - i),
        DGATES,
        DZ,
        XHAT_HH,
        STATS_HH,
        GAMMA_HH,
        rows,
        both,
        valid,
        keep,
        jc,
        cols,
        count,
        use_batch,
        0,
        H,
        F,
        ACC,
    )
    _batch_gate_backward(
        dct * cp * fg * (1.0 - fg),
        DGATES,
        DZ,
        XHAT_HH,
        STATS_HH,
        GAMMA_HH,
        rows,
        both,
        valid,
        keep,
        jc,
        cols,
        count,
        use_batch,
        1,
        H,
        F,
        ACC,
    )
    _batch_gate_backward(
        dct * i * (1.0 - g * g),
        DGATES,
        DZ,
        XHAT_HH,
        STATS_HH,
        GAMMA_HH,
        rows,
        both,
        valid,
        keep,
        jc,
        cols,
        count,
        use_batch,
        2,
        H,
        F,
        ACC,
    )
    _batch_gate_backward(
        dho * tc * o * (1.0 - o),
        DGATES,
        DZ,
        XHAT_HH,
        STATS_HH,
        GAMMA_HH,
        rows,
        both,
        valid,
        keep,
        jc,
        cols,
        count,
        use_batch,
        3,
        H,
        F,
        ACC,
    )
    tl.store(DC + units, tl.where(valid, dct * fg, dc).to(DC.dtype.element_ty), mask=both)
