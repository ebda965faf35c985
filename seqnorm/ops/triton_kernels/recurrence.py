"""The CUDA (and Triton-interpreter) implementation of the recurrence operators: the drivers
that run the Triton kernels of norms.py, lstm.py and gru.py around the matrix products.

Forward: the input projection of every step is one product (cuBLAS), its normalization one
kernel over every step; then per step one product ``h W_hh^T`` and one step kernel (with
projections a second product and a masked copy). Backward: per step one step kernel and one
product ``dz W_hh``; the weight gradients are single large products after the loop, as are the
input half's. The time loops run through CUDA graphs (graphs.py). Inputs and results are those
of the operators in seqnorm/ops/library.py, in the same layout as the C++ kernel's.

Precision: the products run in the weights' dtype (half under autocast, where the wrapper
casts the weights); norms, gates and state in float32 registers; the state and what the
backward keeps in the state's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..types import GRUSaved, LSTMSaved
from . import graphs
from .gru import gru_step_batch, gru_step_batch_backward, gru_step_rows, gru_step_rows_backward
from .lstm import lstm_step_batch, lstm_step_batch_backward, lstm_step_rows, lstm_step_rows_backward
from .norms import (
    input_backward_batch,
    input_backward_rows,
    input_forward_batch,
    input_forward_rows,
)

MAX_HIDDEN = 2048
"""The largest hidden size the kernels take: a row of gates lives in one program's registers."""
MAX_BATCH_NORM_BATCH = 1024
"""Batch norm holds every sample of a step in one program: the largest batch it takes."""
MAX_GROUPS = 64
"""Group norm's groups are unrolled in the kernels: the most they take."""


def unsupported(
    x: Tensor, tensors: list[Tensor], hidden: int, norm: str, groups: int
) -> str | None:
    """Why the Triton kernels cannot run this direction, or None."""
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    if any(t.dtype not in dtypes for t in (x, *tensors)):
        return f"the Triton kernels run in {', '.join(map(str, dtypes))}"
    if hidden > MAX_HIDDEN:
        return f"the Triton kernels take hidden sizes up to {MAX_HIDDEN}, got hidden_size={hidden}"
    if norm == "group" and groups > MAX_GROUPS:
        return f"the Triton kernels take up to {MAX_GROUPS} groups, got groups={groups}"
    if norm == "batch" and x.shape[1] > MAX_BATCH_NORM_BATCH:
        return f"the Triton batch-norm kernels take batches up to {MAX_BATCH_NORM_BATCH}, got {x.shape[1]}"
    return None


def _groups(norm: str, groups: int) -> int:
    return groups if norm == "group" else 1


def _acc(dtype: torch.dtype):
    """The kernels' arithmetic: float64 for float64 tensors, float32 for the others."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def num_warps_for(elements: int) -> int:
    """Warps of a program holding ``elements`` values per tile (16 or fewer each per thread;
    ptxas spilled at 8 warps for the LSTM backward's 2048)."""
    return 4 if elements <= 2048 else 8 if elements <= 4096 else 16


def block_columns(n: int, features: int) -> tuple[int, int]:
    """(BN, BJ) of a batch-norm program: every sample, and as many units as keep a tile small."""
    rows = triton.next_power_of_2(max(n, 1))
    return rows, max(1, min(triton.next_power_of_2(features), 1024 // rows))


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _counts(mask: Tensor | None, steps: int, n: int, device) -> Tensor:
    if mask is None:
        return torch.full((steps,), n, dtype=torch.long, device=device)
    return mask.sum(1)


def _mm(a: Tensor, w: Tensor, out: Tensor | None = None) -> Tensor:
    """``a W^T`` in the weight's dtype (half under autocast)."""
    return torch.mm(a.to(w.dtype), w.t(), out=out)


# --- the input half -------------------------------------------------------------------------------


def input_forward(x, w_ih, bias, gamma, running, mask, norm, groups, eps, training, state_dtype):
    """``gamma * N(x W_ih^T) + bias`` of every step: the gates' input half, x_hat, statistics and
    the batch statistics (empty where they do not apply)."""
    steps, n, _ = x.shape
    features = w_ih.shape[0]
    dtype = state_dtype
    proj = _mm(x.reshape(steps * n, x.shape[2]), w_ih)  # (T*N, F); N may be 0
    if norm == "none":
        gx = proj.to(state_dtype) if bias is None else torch.add(proj, bias).to(state_dtype)
        return gx.view(steps, n, features), _empty(gx), _empty(gx), _empty(gx)
    gx = torch.empty(steps, n, features, device=x.device, dtype=state_dtype)
    xhat = torch.empty_like(gx)
    if norm == "batch":
        stats = gx.new_empty(steps, 2, features)
        batch = gx.new_zeros(2, steps, features)
        bn, bj = block_columns(n, features)
        grid = (steps, triton.cdiv(features, bj))
        input_forward_batch[grid](
            proj,
            gx,
            xhat,
            stats,
            batch,
            running,
            mask,
            gamma,
            bias,
            steps,
            n,
            eps,
            int(training),
            features,
            bn,
            bj,
            mask is not None,
            bias is not None,
            ACC=_acc(dtype),
            num_warps=num_warps_for(bn * bj),
        )
        return gx, xhat, stats.view(-1), batch
    g = _groups(norm, groups)
    stats = gx.new_empty(steps * n * g)
    bf = triton.next_power_of_2(features)
    input_forward_rows[(steps * n,)](
        proj,
        gx,
        xhat,
        stats,
        gamma,
        bias,
        eps,
        features,
        bf,
        g,
        bias is not None,
        ACC=_acc(dtype),
        num_warps=num_warps_for(bf),
    )
    return gx, xhat, stats, _empty(gx)


def _sum_of_products(a: Tensor, b: Tensor, chunks: int = 8) -> Tensor:
    """``(a * b).sum((0, 1))`` (a gain's gradient), a few steps at a time, so that the product
    never takes the memory of a whole ``(T, N, F)`` tensor at the backward's peak."""
    total = None
    for a_part, b_part in zip(a.chunk(chunks), b.chunk(chunks)):
        part = (a_part * b_part).sum((0, 1))
        total = part if total is None else total.add_(part)
    return total


def input_backward(dgates, x, w_ih, gamma, xhat, stats, mask, norm, groups, training, needs):
    """Gradients of the input half from dL/dgx (``dgates``, which becomes dL/d(x W_ih^T)): x,
    W_ih, the gain, the bias."""
    steps, n, features = dgates.shape
    dtype = dgates.dtype
    dbias = dgates.sum((0, 1)) if needs[3] else None
    dgamma = _sum_of_products(dgates, xhat) if needs[2] and norm != "none" else None
    if not (needs[0] or needs[1]):
        return None, None, dgamma, dbias
    if norm == "none":
        dproj = dgates
    elif norm == "batch":
        dproj = dgates  # in place: each program reads its tile before it writes it
        bn, bj = block_columns(n, features)
        input_backward_batch[(steps, triton.cdiv(features, bj))](
            dgates,
            dproj,
            xhat,
            stats,
            mask,
            gamma,
            n,
            int(training),
            features,
            bn,
            bj,
            mask is not None,
            ACC=_acc(dtype),
            num_warps=num_warps_for(bn * bj),
        )
    else:
        dproj = dgates  # in place, likewise: one program a row
        bf = triton.next_power_of_2(features)
        input_backward_rows[(steps * n,)](
            dgates,
            dproj,
            xhat,
            stats,
            gamma,
            features,
            bf,
            _groups(norm, groups),
            ACC=_acc(dtype),
            num_warps=num_warps_for(bf),
        )
    rows = dproj.reshape(steps * n, features)
    dx = (rows.to(w_ih.dtype) @ w_ih).view(x.shape) if needs[0] else None
    dw = (
        rows.t().to(w_ih.dtype) @ x.reshape(steps * n, x.shape[2]).to(w_ih.dtype)
        if needs[1]
        else None
    )
    return dx, dw, dgamma, dbias


# --- LSTM -----------------------------------------------------------------------------------------


def lstm_forward(
    x,
    h0,
    c0,
    w_ih,
    w_hh,
    b_ih,
    b_hh,
    w_hr,
    gamma_ih,
    gamma_hh,
    gamma_c,
    beta_c,
    running_ih,
    running_hh,
    running_c,
    mask,
    norm,
    groups,
    eps,
    training,
    keep,
    backend,
):
    steps, n = x.shape[:2]
    hidden, out_size = c0.shape[-1], h0.shape[-1]
    dtype = h0.dtype
    bias = None if b_ih is None else b_ih + b_hh
    gx, xhat_ih, stats_ih, batch_ih = input_forward(
        x, w_ih, bias, gamma_ih, running_ih, mask, norm, groups, eps, training, dtype
    )
    config = (norm, groups, eps, training, keep, steps, n, hidden, out_size)
    inputs = {
        "gx": gx,
        "h0": h0,
        "c0": c0,
        "w_hh": w_hh,
        "w_hr": w_hr,
        "gamma_hh": gamma_hh,
        "gamma_c": gamma_c,
        "beta_c": beta_c,
        "running_hh": running_hh,
        "running_c": running_c,
        "mask": mask,
    }
    result = graphs.run(("lstm_forward", *config), lambda s: _lstm_loop(s, *config), inputs)
    counts = _counts(mask, steps, n, x.device)
    batch = norm == "batch" and training
    heads = (
        result["out"],
        result["h_n"],
        result["c_n"],
        *(b if batch else _empty(gx) for b in (batch_ih, result["batch_hh"], result["batch_c"])),
    )
    if not keep:
        return (*heads, *(_empty(gx) for _ in LSTMSaved._fields[:-1]), counts)
    normed = norm != "none"
    saved = LSTMSaved(
        result["hs"],
        result["cs"],
        result["acts"],
        result["xhat_hh"] if normed else _empty(gx),
        result["stats_hh"],
        result["xhat_c"] if normed else _empty(gx),
        result["stats_c"],
        result["hpre"] if w_hr is not None else _empty(gx),
        xhat_ih if normed else _empty(gx),
        stats_ih,
        counts,
    )
    return (*heads, *saved)


def _lstm_loop(s, norm, groups, eps, training, keep, steps, n, hidden, out_size) -> dict:
    """The time loop: every step's product and kernel. ``gx`` becomes the activations."""
    gx, mask, w_hh, w_hr = s["gx"], s["mask"], s["w_hh"], s["w_hr"]
    features = 4 * hidden
    proj, normed = w_hr is not None, norm != "none"
    dtype = s["h0"].dtype
    g = _groups(norm, groups)
    kept = steps if keep else 1
    hs = gx.new_empty((steps + 1) if keep else 2, n, out_size)
    cs = gx.new_empty((steps + 1) if keep else 2, n, hidden)
    hs[0].copy_(s["h0"])
    cs[0].copy_(s["c0"])
    out = gx.new_empty(steps, n, out_size)
    acts = gx if keep else gx.new_empty(1, n, features)
    xhat_hh = gx.new_empty(kept if normed else 1, n, features)
    xhat_c = gx.new_empty(kept if normed else 1, n, hidden)
    hpre = gx.new_empty(kept if proj else 1, n, hidden)
    batch = norm == "batch"
    stats_hh = gx.new_zeros(steps, 2, features) if batch else gx.new_zeros(steps, n, g)
    stats_c = gx.new_zeros(steps, 2, hidden) if batch else gx.new_zeros(steps, n, g)
    batch_hh = gx.new_zeros(2, steps, features)
    batch_c = gx.new_zeros(2, steps, hidden)
    z = torch.empty(n, features, device=gx.device, dtype=w_hh.dtype)
    projected = torch.empty(n, out_size, device=gx.device, dtype=w_hh.dtype) if proj else None
    bh = triton.next_power_of_2(hidden)
    bn, bj = block_columns(n, hidden)
    for t in range(steps):
        now, nxt, k = (t, t + 1, t) if keep else (t & 1, (t + 1) & 1, 0)
        _mm(hs[now], w_hh, out=z)
        valid = None if mask is None else mask[t]
        buffers = (
            z,
            gx[t],
            hs[now],
            cs[now],
            hs[nxt],
            cs[nxt],
            out[t],
            acts[k],
            xhat_hh[k if normed else 0],
            stats_hh[t],
            xhat_c[k if normed else 0],
            stats_c[t],
            hpre[k if proj else 0],
            valid,
        )
        if batch:
            lstm_step_batch[(triton.cdiv(hidden, bj),)](
                *buffers,
                s["gamma_hh"],
                s["gamma_c"],
                s["beta_c"],
                s["running_hh"],
                s["running_c"],
                batch_hh,
                batch_c,
                t,
                steps,
                n,
                eps,
                int(training),
                hidden,
                bn,
                bj,
                proj,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(bn * bj),
            )
        else:
            lstm_step_rows[(n,)](
                *buffers,
                s["gamma_hh"],
                s["gamma_c"],
                s["beta_c"],
                eps,
                hidden,
                bh,
                g,
                normed,
                proj,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(4 * bh),
            )
        if proj:  # h' = h_pre W_hr^T where the row is valid
            _mm(hpre[k], w_hr, out=projected)
            keep_row = None if valid is None else valid.unsqueeze(1)
            if keep_row is None:
                hs[nxt].copy_(projected)
                out[t].copy_(projected)
            else:
                hs[nxt].copy_(torch.where(keep_row, projected.to(dtype), hs[now]))
                out[t].copy_(projected.to(dtype) * keep_row)
    last = steps if keep else steps & 1
    return {
        "out": out,
        "h_n": hs[last].clone(),
        "c_n": cs[last].clone(),
        "hs": hs,
        "cs": cs,
        "acts": acts if keep else None,  # gx itself: a replay writes the graph's copy of it
        "xhat_hh": xhat_hh,
        "stats_hh": stats_hh.view(-1),
        "xhat_c": xhat_c,
        "stats_c": stats_c.view(-1),
        "hpre": hpre,
        "batch_hh": batch_hh,
        "batch_c": batch_c,
    }


def lstm_backward(
    grad_out,
    grad_h,
    grad_c,
    x,
    w_ih,
    w_hh,
    w_hr,
    gamma_ih,
    gamma_hh,
    gamma_c,
    beta_c,
    mask,
    hs,
    cs,
    acts,
    xhat_hh,
    stats_hh,
    xhat_c,
    stats_c,
    hpre,
    xhat_ih,
    stats_ih,
    counts,
    norm,
    groups,
    eps,
    training,
    needs,
    backend,
):
    steps, n, features = acts.shape
    hidden, out_size = features // 4, hs.shape[-1]
    normed, proj = norm != "none", w_hr is not None
    config = (norm, groups, training, steps, n, hidden, out_size)
    inputs = {
        "grad_out": grad_out.contiguous(),
        "grad_h": grad_h,
        "grad_c": grad_c,
        "w_hh": w_hh,
        "w_hr": w_hr,
        "gamma_hh": gamma_hh,
        "gamma_c": gamma_c,
        "beta_c": beta_c,
        "mask": mask,
        "acts": acts,
        "cs": cs,
        "xhat_hh": xhat_hh,
        "stats_hh": stats_hh,
        "xhat_c": xhat_c,
        "stats_c": stats_c,
    }
    r = graphs.run(("lstm_backward", *config), lambda s: _lstm_backward_loop(s, *config), inputs)
    # the backward's memory peaks in input_backward: free all it does not need before it
    dgates, dz, dtotal, dnc = (r.pop(k) for k in ("dgates", "dz", "dtotal", "dnc"))
    dw_hh = _weight_grad(dz, hs[:-1], w_hh) if needs[4] else None
    dw_hr = _weight_grad(dtotal, hpre, w_hr) if proj and needs[6] else None
    dgamma_hh = _sum_of_products(dgates, xhat_hh) if normed and needs[8] else None
    dgamma_c = _sum_of_products(dnc, xhat_c) if normed and needs[9] else None
    dbeta_c = dnc.sum((0, 1)) if normed and needs[10] else None
    del dz, dtotal, dnc
    dx, dw_ih, dgamma_ih, dbias = input_backward(
        dgates,
        x,
        w_ih,
        gamma_ih,
        xhat_ih,
        stats_ih,
        mask,
        norm,
        groups,
        training,
        (needs[0], needs[3], needs[7], needs[5]),
    )
    grads = (
        dx,
        r["dh"],
        r["dc"],
        dw_ih,
        dw_hh,
        dbias,
        dw_hr,
        dgamma_ih,
        dgamma_hh,
        dgamma_c,
        dbeta_c,
    )
    likes = (x, grad_h, grad_c, w_ih, w_hh, grad_c, w_hr, gamma_ih, gamma_hh, gamma_c, beta_c)
    return _wanted(grads, likes, needs, x)


def _lstm_backward_loop(s, norm, groups, training, steps, n, hidden, out_size) -> dict:
    features = 4 * hidden
    normed, proj, batch = norm != "none", s["w_hr"] is not None, norm == "batch"
    mask, w_hh, w_hr, acts, cs = s["mask"], s["w_hh"], s["w_hr"], s["acts"], s["cs"]
    grad_out = s["grad_out"]
    g = _groups(norm, groups)
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32  # gradients
    dh = s["grad_h"].to(dtype).clone()
    dc = s["grad_c"].to(dtype).clone()
    dgates = torch.empty(steps, n, features, device=acts.device, dtype=dtype)
    dz = torch.empty_like(dgates) if normed else dgates
    dnc = torch.empty(steps if normed else 1, n, hidden, device=acts.device, dtype=dtype)
    dtotal = torch.empty(steps if proj else 1, n, out_size, device=acts.device, dtype=dtype)
    dhpre = torch.empty(n, hidden, device=acts.device, dtype=dtype) if proj else None
    dprev = torch.empty(n, out_size, device=acts.device, dtype=w_hh.dtype)
    stats_hh = s["stats_hh"].view(steps, -1)
    stats_c = s["stats_c"].view(steps, -1)
    bh = triton.next_power_of_2(hidden)
    bn, bj = block_columns(n, hidden)
    for t in range(steps - 1, -1, -1):
        valid = None if mask is None else mask[t]
        if proj:  # dh of the projected output, through W_hr to h before it
            total = dh + grad_out[t]
            dtotal[t] = total if valid is None else torch.where(valid.unsqueeze(1), total, 0)
            dhpre.copy_(dtotal[t].to(w_hr.dtype) @ w_hr)
        buffers = (
            dh,
            grad_out[t],
            dhpre,
            dc,
            dgates[t],
            dz[t],
            dnc[t if normed else 0],
            acts[t],
            cs[t],
            cs[t + 1],
            s["xhat_c"][t] if normed else cs[t],
            stats_c[t],
            s["xhat_hh"][t] if normed else acts[t],
            stats_hh[t],
            valid,
            s["gamma_hh"],
            s["gamma_c"],
            s["beta_c"],
        )
        if batch:
            lstm_step_batch_backward[(triton.cdiv(hidden, bj),)](
                *(b for i, b in enumerate(buffers) if i != 9),
                n,
                int(training),
                hidden,
                bn,
                bj,
                proj,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(bn * bj),
            )
        else:
            lstm_step_rows_backward[(n,)](
                *buffers,
                hidden,
                bh,
                g,
                normed,
                proj,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(4 * bh),
            )
        torch.mm(dz[t].to(w_hh.dtype), w_hh, out=dprev)
        if valid is None:
            dh.copy_(dprev)
        else:
            dh.copy_(torch.where(valid.unsqueeze(1), dprev.to(dh.dtype), dh))
    return {"dh": dh, "dc": dc, "dgates": dgates, "dz": dz, "dnc": dnc, "dtotal": dtotal}


def _weight_grad(d: Tensor, inputs: Tensor, weight: Tensor) -> Tensor:
    """sum over steps and samples of d^T inputs, as one product."""
    return d.reshape(-1, d.shape[-1]).t().to(weight.dtype) @ inputs.reshape(
        -1, inputs.shape[-1]
    ).to(weight.dtype)


def _wanted(grads, likes, needs, x) -> tuple[Tensor, ...]:
    """Each gradient asked for in its input's dtype; empty tensors for the rest."""
    return tuple(
        g.to(like.dtype) if need and g is not None else x.new_empty(0)
        for g, like, need in zip(grads, likes, needs)
    )


# --- GRU ------------------------------------------------------------------------------------------


def gru_forward(
    x,
    h0,
    w_ih,
    w_hh,
    b_ih,
    b_hh,
    gamma_ih,
    gamma_hh,
    running_ih,
    running_hh,
    mask,
    norm,
    groups,
    eps,
    training,
    keep,
    backend,
):
    steps, n = x.shape[:2]
    hidden = h0.shape[-1]
    dtype = h0.dtype
    gx, xhat_ih, stats_ih, batch_ih = input_forward(
        x, w_ih, b_ih, gamma_ih, running_ih, mask, norm, groups, eps, training, dtype
    )
    config = (norm, groups, eps, training, keep, steps, n, hidden)
    inputs = {
        "gx": gx,
        "h0": h0,
        "w_hh": w_hh,
        "b_hh": b_hh,
        "gamma_hh": gamma_hh,
        "running_hh": running_hh,
        "mask": mask,
    }
    result = graphs.run(("gru_forward", *config), lambda s: _gru_loop(s, *config), inputs)
    counts = _counts(mask, steps, n, x.device)
    batch = norm == "batch" and training
    heads = (
        result["out"],
        result["h_n"],
        *(b if batch else _empty(gx) for b in (batch_ih, result["batch_hh"])),
    )
    if not keep:
        return (*heads, *(_empty(gx) for _ in GRUSaved._fields[:-1]), counts)
    normed = norm != "none"
    saved = GRUSaved(
        result["hs"],
        result["acts"],
        result["gh_n"],
        result["xhat_hh"] if normed else _empty(gx),
        result["stats_hh"],
        xhat_ih if normed else _empty(gx),
        stats_ih,
        counts,
    )
    return (*heads, *saved)


def _gru_loop(s, norm, groups, eps, training, keep, steps, n, hidden) -> dict:
    gx, mask, w_hh = s["gx"], s["mask"], s["w_hh"]
    features = 3 * hidden
    normed, batch = norm != "none", norm == "batch"
    g = _groups(norm, groups)
    dtype = s["h0"].dtype
    kept = steps if keep else 1
    hs = gx.new_empty((steps + 1) if keep else 2, n, hidden)
    hs[0].copy_(s["h0"])
    out = gx.new_empty(steps, n, hidden)
    acts = gx if keep else gx.new_empty(1, n, features)
    gh_n = gx.new_empty(kept, n, hidden)
    xhat_hh = gx.new_empty(kept if normed else 1, n, features)
    stats_hh = gx.new_zeros(steps, 2, features) if batch else gx.new_zeros(steps, n, g)
    batch_hh = gx.new_zeros(2, steps, features)
    z = torch.empty(n, features, device=gx.device, dtype=w_hh.dtype)
    bh = triton.next_power_of_2(hidden)
    bn, bj = block_columns(n, hidden)
    for t in range(steps):
        now, nxt, k = (t, t + 1, t) if keep else (t & 1, (t + 1) & 1, 0)
        _mm(hs[now], w_hh, out=z)
        valid = None if mask is None else mask[t]
        buffers = (
            z,
            gx[t],
            hs[now],
            hs[nxt],
            out[t],
            acts[k],
            gh_n[k],
            xhat_hh[k if normed else 0],
            stats_hh[t],
            valid,
            s["gamma_hh"],
            s["b_hh"],
        )
        if batch:
            gru_step_batch[(triton.cdiv(hidden, bj),)](
                *buffers,
                s["running_hh"],
                batch_hh,
                t,
                steps,
                n,
                eps,
                int(training),
                hidden,
                bn,
                bj,
                s["b_hh"] is not None,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(bn * bj),
            )
        else:
            gru_step_rows[(n,)](
                *buffers,
                eps,
                hidden,
                bh,
                g,
                normed,
                s["b_hh"] is not None,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(4 * bh),
            )
    last = steps if keep else steps & 1
    return {
        "out": out,
        "h_n": hs[last].clone(),
        "hs": hs,
        "acts": acts if keep else None,  # gx itself: a replay writes the graph's copy of it
        "gh_n": gh_n,
        "xhat_hh": xhat_hh,
        "stats_hh": stats_hh.view(-1),
        "batch_hh": batch_hh,
    }


def gru_backward(
    grad_out,
    grad_h,
    x,
    w_ih,
    w_hh,
    b_hh,
    gamma_ih,
    gamma_hh,
    mask,
    hs,
    acts,
    ghn,
    xhat_hh,
    stats_hh,
    xhat_ih,
    stats_ih,
    counts,
    norm,
    groups,
    eps,
    training,
    needs,
    backend,
):
    steps, n, features = acts.shape
    hidden = features // 3
    normed = norm != "none"
    config = (norm, groups, training, steps, n, hidden)
    inputs = {
        "grad_out": grad_out.contiguous(),
        "grad_h": grad_h,
        "w_hh": w_hh,
        "gamma_hh": gamma_hh,
        "mask": mask,
        "acts": acts,
        "gh_n": ghn,
        "hs": hs,
        "xhat_hh": xhat_hh,
        "stats_hh": stats_hh,
    }
    r = graphs.run(("gru_backward", *config), lambda s: _gru_backward_loop(s, *config), inputs)
    # the backward's memory peaks in input_backward: free all it does not need before it
    dgates, dgh, dz = (r.pop(k) for k in ("dgates", "dgh", "dz"))
    dw_hh = _weight_grad(dz, hs[:-1], w_hh) if needs[3] else None
    db_hh = dgh.sum((0, 1)) if b_hh is not None and needs[5] else None
    dgamma_hh = _sum_of_products(dgh, xhat_hh) if normed and needs[7] else None
    del dgh, dz
    dx, dw_ih, dgamma_ih, db_ih = input_backward(
        dgates,
        x,
        w_ih,
        gamma_ih,
        xhat_ih,
        stats_ih,
        mask,
        norm,
        groups,
        training,
        (needs[0], needs[2], needs[6], needs[4]),
    )
    grads = (dx, r["dh"], dw_ih, dw_hh, db_ih, db_hh, dgamma_ih, dgamma_hh)
    likes = (x, grad_h, w_ih, w_hh, grad_h, grad_h if b_hh is None else b_hh, gamma_ih, gamma_hh)
    return _wanted(grads, likes, needs, x)


def _gru_backward_loop(s, norm, groups, training, steps, n, hidden) -> dict:
    features = 3 * hidden
    normed, batch = norm != "none", norm == "batch"
    mask, w_hh, acts, hs = s["mask"], s["w_hh"], s["acts"], s["hs"]
    g = _groups(norm, groups)
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32  # gradients
    dh = s["grad_h"].to(dtype).clone()
    dgates = torch.empty(steps, n, features, device=acts.device, dtype=dtype)
    dgh = torch.empty_like(dgates)
    dz = torch.empty_like(dgates) if normed else dgh
    dprev = torch.empty(n, hidden, device=acts.device, dtype=w_hh.dtype)
    stats_hh = s["stats_hh"].view(steps, -1)
    bh = triton.next_power_of_2(hidden)
    bn, bj = block_columns(n, hidden)
    for t in range(steps - 1, -1, -1):
        valid = None if mask is None else mask[t]
        buffers = (
            dh,
            s["grad_out"][t],
            dgates[t],
            dgh[t],
            dz[t],
            acts[t],
            s["gh_n"][t],
            hs[t],
            s["xhat_hh"][t] if normed else acts[t],
            stats_hh[t],
            valid,
            s["gamma_hh"],
        )
        if batch:
            gru_step_batch_backward[(triton.cdiv(hidden, bj),)](
                *buffers,
                n,
                int(training),
                hidden,
                bn,
                bj,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(bn * bj),
            )
        else:
            gru_step_rows_backward[(n,)](
                *buffers,
                hidden,
                bh,
                g,
                normed,
                mask is not None,
                ACC=_acc(dtype),
                num_warps=num_warps_for(4 * bh),
            )
        torch.mm(dz[t].to(w_hh.dtype), w_hh, out=dprev)
        if valid is None:
            dh += dprev
        else:
            dh += torch.where(valid.unsqueeze(1), dprev.to(dh.dtype), 0)
    return {"dh": dh, "dgates": dgates, "dgh": dgh, "dz": dz}
