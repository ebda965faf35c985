"""The CUDA (and Triton-interpreter) implementation of the recurrence operators: the drivers
that run the Triton kernels of norms.py, lstm.py and gru.py around the matrix products.

Forward: the input projection of every step is one product (cuBLAS), its normalization one
kernel over every step; then per step one product ``h W_hh^T`` and one step kernel (with
projections a second product and a masked copy). Backward: per step one step kernel and one
product ``dz W_hh``, in windows of graphs.window() steps, each followed by what its steps
add to the weights' gradients (one product each) and by the input half's backward of its steps,
so that the gradients with respect to the gates take a window's memory, not the sequence's. The
time loops run through CUDA graphs of a window each (graphs.py): a loop writes only into the
tensors it is given, all allocated here. Inputs and results are those of the operators in
seqnorm/ops/library.py, in the same layout as the C++ kernel's.

Precision: the products run in the weights' dtype (half under autocast, where the wrapper
casts the weights); norms, gates and state in float32 registers; the state and what the
backward keeps in the state's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..library import GRU_GRADS, LSTM_GRADS
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


def _sum_of_products(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum((0, 1))``: a gain's gradient over a window's steps and samples."""
    return (a * b).sum((0, 1))


def input_backward(dgates, x, w_ih, gamma, xhat, stats, mask, norm, groups, training, needs):
    """Gradients of the input half from dL/dgx (``dgates``, which becomes dL/d(x W_ih^T)): x,
    W_ih, the gain, the bias."""
    steps, n, features = dgates.shape
    dtype = dgates.dtype
    dbias = dgates.sum((0, 1)) if needs[3] else None
    dgamma = _sum_of_products(dgates, xhat) if needs[2] and norm != "none" else None
    if not (needs[0] or needs[1]):
        return None, None, dgamma, dbias
    # dL/d(x W_ih^T) over dgates in place: each program reads its tile (a batch-norm block, a
    # row) before it writes it
    if norm == "batch":
        bn, bj = block_columns(n, features)
        input_backward_batch[(steps, triton.cdiv(features, bj))](
            dgates,
            dgates,
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
    elif norm != "none":
        bf = triton.next_power_of_2(features)
        input_backward_rows[(steps * n,)](
            dgates,
            dgates,
            xhat,
            stats,
            gamma,
            features,
            bf,
            _groups(norm, groups),
            ACC=_acc(dtype),
            num_warps=num_warps_for(bf),
        )
    rows = dgates.reshape(steps * n, features)
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
    features = 4 * hidden
    dtype = h0.dtype
    normed, proj, batch = norm != "none", w_hr is not None, norm == "batch"
    bias = None if b_ih is None else b_ih + b_hh
    gx, xhat_ih, stats_ih, batch_ih = input_forward(
        x, w_ih, bias, gamma_ih, running_ih, mask, norm, groups, eps, training, dtype
    )
    # not saved: the backward computes them again (library.recomputes_input_xhat); freed here,
    # before the loop takes its memory
    del xhat_ih, stats_ih
    # what the loop writes: every step's when the backward keeps it, else a ring of two states
    # and one step's activations
    kept = steps if keep else 1
    g = _groups(norm, groups)
    t = {
        "gx": gx,
        "acts": None if keep else gx.new_empty(1, n, features),  # None: gx becomes them
        "hs": gx.new_empty(steps + 1 if keep else 2, n, out_size),
        "cs": gx.new_empty(steps + 1 if keep else 2, n, hidden),
        "out": gx.new_empty(steps, n, out_size),
        "xhat_hh": gx.new_empty(kept if normed else 1, n, features),
        "stats_hh": gx.new_zeros(steps, 2, features) if batch else gx.new_zeros(steps, n, g),
        "xhat_c": gx.new_empty(kept if normed else 1, n, hidden),
        "stats_c": gx.new_zeros(steps, 2, hidden) if batch else gx.new_zeros(steps, n, g),
        "hpre": gx.new_empty(kept if proj else 1, n, hidden),
        "batch_hh": gx.new_zeros(2, steps, features) if batch else None,
        "batch_c": gx.new_zeros(2, steps, hidden) if batch else None,
        "running_hh": running_hh,
        "running_c": running_c,
        "mask": mask,
        "w_hh": w_hh,
        "w_hr": w_hr,
        "gamma_hh": gamma_hh,
        "gamma_c": gamma_c,
        "beta_c": beta_c,
    }
    t["hs"][0].copy_(h0)
    t["cs"][0].copy_(c0)
    config = (norm, groups, eps, training, keep, n, hidden, out_size)
    graphs.run(
        ("lstm_forward", *config),
        lambda s, k: _lstm_loop(s, k, *config),
        t,
        steps,
        timed=_TIMED,
        writes=("gx", *_LSTM_WRITES) if keep else _LSTM_WRITES,
    )
    counts = _counts(mask, steps, n, x.device)
    training_batch = batch and training
    last = steps if keep else steps & 1
    heads = (
        t["out"],
        t["hs"][last].clone(),
        t["cs"][last].clone(),
        *(b if training_batch else _empty(gx) for b in (batch_ih, t["batch_hh"], t["batch_c"])),
    )
    if not keep:
        return (*heads, *(_empty(gx) for _ in LSTMSaved._fields[:-1]), counts)
    saved = LSTMSaved(
        t["hs"],
        t["cs"],
        gx,
        t["xhat_hh"] if normed else _empty(gx),
        t["stats_hh"].view(-1) if normed else _empty(gx),
        t["xhat_c"] if normed else _empty(gx),
        t["stats_c"].view(-1) if normed else _empty(gx),
        t["hpre"] if proj else _empty(gx),
        _empty(gx),  # xhat_ih
        _empty(gx),  # stats_ih
        counts,
    )
    return (*heads, *saved)


# the loops' tensors with a time dimension (the first; the second for the (2, T, F) running and
# batch statistics), and what they write
_TIMED = dict.fromkeys(
    [
        "gx",
        "acts",
        "hs",
        "cs",
        "out",
        "xhat_hh",
        "xhat_c",
        "hpre",
        "stats_hh",
        "stats_c",
        "mask",
        "gh_n",
        "grad_out",
        "x",
        "dx",
    ],
    0,
) | dict.fromkeys(["running_ih", "running_hh", "running_c", "batch_hh", "batch_c"], 1)
_LSTM_WRITES = (
    "acts",
    "hs",
    "cs",
    "out",
    "xhat_hh",
    "stats_hh",
    "xhat_c",
    "stats_c",
    "hpre",
    "batch_hh",
    "batch_c",
)  # and gx, which becomes the activations where every step's are kept
_GRU_WRITES = ("acts", "hs", "out", "gh_n", "xhat_hh", "stats_hh", "batch_hh")


def _rows_apart(batch: Tensor, running: Tensor | None) -> int:
    """The batch-norm step kernels' ``steps``: how many rows of F apart the mean and the variance
    of one step lie in the ``(2, T, F)`` batch and running statistics (T, also for a window)."""
    apart = batch.stride(0) // batch.shape[-1]
    assert running is None or running.stride(0) // running.shape[-1] == apart
    return apart


def _lstm_loop(s, steps, norm, groups, eps, training, keep, n, hidden, out_size) -> None:
    """``steps`` steps of the time loop: every step's product and kernel, from the state in
    ``hs[0]`` and ``cs[0]`` (with ``keep``, every step's state after it in the rows after; without,
    a ring of two: the state after step t at row (t + 1) % 2)."""
    gx, mask, w_hh, w_hr = s["gx"], s["mask"], s["w_hh"], s["w_hr"]
    hs, cs, out, xhat_hh, xhat_c, hpre = (
        s[k] for k in ("hs", "cs", "out", "xhat_hh", "xhat_c", "hpre")
    )
    acts = gx if s["acts"] is None else s["acts"]
    proj, normed, batch = w_hr is not None, norm != "none", norm == "batch"
    dtype = hs.dtype
    g = _groups(norm, groups)
    z = torch.empty(n, 4 * hidden, device=gx.device, dtype=w_hh.dtype)
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
            s["stats_hh"][t],
            xhat_c[k if normed else 0],
            s["stats_c"][t],
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
                s["batch_hh"],
                s["batch_c"],
                t,
                _rows_apart(s["batch_hh"], s["running_hh"]),
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
    xhat_ih,  # empty, as the forward saves neither: computed again, a window at a time
    stats_ih,
    counts,
    running_ih,
    norm,
    groups,
    eps,
    training,
    needs,
    backend,
):
    steps, n, features = acts.shape
    hidden, out_size = features // 4, hs.shape[-1]
    proj = w_hr is not None
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32  # gradients
    wanted = dict(zip(_LSTM_GRADS, needs))
    t = {
        "grad_out": grad_out.contiguous(),
        "dh0": grad_h.to(
            dtype
        ).clone(),  # dL/dh after the last step, and at the end before the first
        "dc0": grad_c.to(dtype).clone(),
        **_sums(wanted, dtype, w_ih, w_hh, w_ih[:, 0], w_hr, gamma_ih, gamma_hh, gamma_c, beta_c),
        "dx": torch.empty_like(x) if wanted["dx"] else None,
        "x": x,
        "acts": acts,
        "hs": hs,
        "cs": cs,
        "hpre": hpre if proj else None,
        "xhat_hh": xhat_hh,
        "stats_hh": _per_step(stats_hh, steps),
        "xhat_c": xhat_c,
        "stats_c": _per_step(stats_c, steps),
        "running_ih": running_ih,
        "mask": mask,
        "w_ih": w_ih,
        "w_hh": w_hh,
        "w_hr": w_hr,
        "gamma_ih": gamma_ih,
        "gamma_hh": gamma_hh,
        "gamma_c": gamma_c,
        "beta_c": beta_c,
    }
    config = (norm, groups, eps, training, n, hidden, out_size)
    graphs.run(
        ("lstm_backward", *config),
        lambda s, k: _lstm_backward_loop(s, k, *config),
        t,
        steps,
        timed=_TIMED,
        writes=_LSTM_GRADS,
        reverse=True,
    )
    grads = tuple(t[name] for name in _LSTM_GRADS)
    likes = (x, grad_h, grad_c, w_ih, w_hh, grad_c, w_hr, gamma_ih, gamma_hh, gamma_c, beta_c)
    return _wanted(grads, likes, needs, x)


# the backward's gradients as the loops name them, in the operators' order
_LSTM_GRADS = tuple(f"d{name}" for name in LSTM_GRADS)
_GRU_GRADS = tuple(f"d{name}" for name in GRU_GRADS)


def _sums(wanted: dict, dtype, *likes) -> dict:
    """Zeros to sum each wanted gradient of a parameter in, window by window (None for the
    others), named as in _LSTM_GRADS and _GRU_GRADS; ``likes`` the parameters, in that order."""
    names = [k for k in wanted if k not in ("dx", "dh0", "dc0")]
    return {
        name: like.new_zeros(like.shape, dtype=dtype) if wanted[name] and like is not None else None
        for name, like in zip(names, likes)
    }


def _lstm_backward_loop(s, steps, norm, groups, eps, training, n, hidden, out_size) -> None:
    """The backward through time of ``steps`` steps, the last first, from dL/dh and dL/dc after
    the last in ``dh`` and ``dc`` (which end as those before the first), in windows of at most
    graphs.window() steps: after each window's steps, what their gradients add to the weights',
    the gains' and the input's, so that dL/dgates is never held for more than a window."""
    features = 4 * hidden
    normed, proj, batch = norm != "none", s["w_hr"] is not None, norm == "batch"
    mask, w_hh, w_hr, acts, cs = s["mask"], s["w_hh"], s["w_hr"], s["acts"], s["cs"]
    grad_out, dh, dc = s["grad_out"], s["dh0"], s["dc0"]
    g = _groups(norm, groups)
    dtype = dh.dtype
    windows = graphs.windows(steps)
    window = min(steps, graphs.window())  # the first window's steps, the most of any
    dgates = torch.empty(window, n, features, device=acts.device, dtype=dtype)
    dz = torch.empty_like(dgates) if normed else dgates
    dnc = dgates.new_empty(window if normed else 1, n, hidden)
    dtotal = dgates.new_empty(window if proj else 1, n, out_size)
    dhpre = dgates.new_empty(n, hidden) if proj else None
    dprev = torch.empty(n, out_size, device=acts.device, dtype=w_hh.dtype)
    bh = triton.next_power_of_2(hidden)
    bn, bj = block_columns(n, hidden)
    for start, k in reversed(windows):
        for t in range(start + k - 1, start - 1, -1):
            j = t - start  # the step within the window
            valid = None if mask is None else mask[t]
            if proj:  # dh of the projected output, through W_hr to h before it
                total = dh + grad_out[t]
                dtotal[j] = total if valid is None else torch.where(valid.unsqueeze(1), total, 0)
                dhpre.copy_(dtotal[j].to(w_hr.dtype) @ w_hr)
            buffers = (
                dh,
                grad_out[t],
                dhpre,
                dc,
                dgates[j],
                dz[j],
                dnc[j if normed else 0],
                acts[t],
                cs[t],
                cs[t + 1],
                s["xhat_c"][t] if normed else cs[t],
                s["stats_c"][t],
                s["xhat_hh"][t] if normed else acts[t],
                s["stats_hh"][t],
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
            torch.mm(dz[j].to(w_hh.dtype), w_hh, out=dprev)
            if valid is None:
                dh.copy_(dprev)
            else:
                dh.copy_(torch.where(valid.unsqueeze(1), dprev.to(dh.dtype), dh))
        # what the window adds to the parameters' gradients, then the input half's
        steps_here = slice(start, start + k)
        _add(s["dw_hh"], _weight_grad, dz[:k], s["hs"][steps_here], w_hh)
        if proj:
            _add(s["dw_hr"], _weight_grad, dtotal[:k], s["hpre"][steps_here], w_hr)
        if normed:
            _add(s["dgamma_hh"], _sum_of_products, dgates[:k], s["xhat_hh"][steps_here])
            _add(s["dgamma_c"], _sum_of_products, dnc[:k], s["xhat_c"][steps_here])
            _add(s["dbeta_c"], torch.sum, dnc[:k], (0, 1))
        _input_window_backward(s, steps_here, dgates[:k], "dbias", norm, groups, eps, training)


def _per_step(stats: Tensor, steps: int) -> Tensor:
    """Statistics saved flat, a row per step (empty rows where there are none)."""
    return stats.view(steps, stats.numel() // max(steps, 1))


def _add(total: Tensor | None, part, *args) -> None:
    """``total += part(*args)`` where the gradient is wanted (``total`` not None)."""
    if total is not None:
        total += part(*args)


def _input_window_backward(
    s, steps_here: slice, dgates, dbias, norm, groups, eps, training
) -> None:
    """What a window's dL/dgx (``dgates``, overwritten) adds to the input half's gradients (the
    bias's named ``dbias``), and dL/dx of its steps."""
    wanted = tuple(s[k] is not None for k in ("dx", "dw_ih", "dgamma_ih", dbias))
    x, mask = s["x"][steps_here], None if s["mask"] is None else s["mask"][steps_here]
    xhat = stats = _empty(dgates)
    if norm != "none":  # as the forward computed them (it saved neither)
        running = s["running_ih"]  # a window's rows, which the kernel takes contiguous
        _, xhat, stats, _ = input_forward(
            x,
            s["w_ih"],
            None,
            s["gamma_ih"],
            None if running is None else running.contiguous(),
            mask,
            norm,
            groups,
            eps,
            training,
            s["acts"].dtype,
        )
    dx, dw_ih, dgamma, db = input_backward(
        dgates, x, s["w_ih"], s["gamma_ih"], xhat, stats, mask, norm, groups, training, wanted
    )
    if dx is not None:
        s["dx"][steps_here].copy_(dx)
    for name, part in (("dw_ih", dw_ih), ("dgamma_ih", dgamma), (dbias, db)):
        if part is not None:
            s[name] += part


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
    features = 3 * hidden
    dtype = h0.dtype
    normed, batch = norm != "none", norm == "batch"
    gx, xhat_ih, stats_ih, batch_ih = input_forward(
        x, w_ih, b_ih, gamma_ih, running_ih, mask, norm, groups, eps, training, dtype
    )
    del xhat_ih, stats_ih  # as in lstm_forward
    kept = steps if keep else 1  # as in lstm_forward
    g = _groups(norm, groups)
    t = {
        "gx": gx,
        "acts": None if keep else gx.new_empty(1, n, features),  # None: gx, as in lstm_forward
        "hs": gx.new_empty(steps + 1 if keep else 2, n, hidden),
        "out": gx.new_empty(steps, n, hidden),
        "gh_n": gx.new_empty(kept, n, hidden),
        "xhat_hh": gx.new_empty(kept if normed else 1, n, features),
        "stats_hh": gx.new_zeros(steps, 2, features) if batch else gx.new_zeros(steps, n, g),
        "batch_hh": gx.new_zeros(2, steps, features) if batch else None,
        "running_hh": running_hh,
        "mask": mask,
        "w_hh": w_hh,
        "b_hh": b_hh,
        "gamma_hh": gamma_hh,
    }
    t["hs"][0].copy_(h0)
    config = (norm, groups, eps, training, keep, n, hidden)
    graphs.run(
        ("gru_forward", *config),
        lambda s, k: _gru_loop(s, k, *config),
        t,
        steps,
        timed=_TIMED,
        writes=("gx", *_GRU_WRITES) if keep else _GRU_WRITES,
    )
    counts = _counts(mask, steps, n, x.device)
    training_batch = batch and training
    heads = (
        t["out"],
        t["hs"][steps if keep else steps & 1].clone(),
        *(b if training_batch else _empty(gx) for b in (batch_ih, t["batch_hh"])),
    )
    if not keep:
        return (*heads, *(_empty(gx) for _ in GRUSaved._fields[:-1]), counts)
    saved = GRUSaved(
        t["hs"],
        gx,
        t["gh_n"],
        t["xhat_hh"] if normed else _empty(gx),
        t["stats_hh"].view(-1) if normed else _empty(gx),
        _empty(gx),  # xhat_ih, as in lstm_forward
        _empty(gx),  # stats_ih
        counts,
    )
    return (*heads, *saved)


def _gru_loop(s, steps, norm, groups, eps, training, keep, n, hidden) -> None:
    """``steps`` steps of the time loop from the state in ``hs[0]``, as _lstm_loop."""
    gx, mask, w_hh = s["gx"], s["mask"], s["w_hh"]
    hs, out, gh_n, xhat_hh = (s[k] for k in ("hs", "out", "gh_n", "xhat_hh"))
    acts = gx if s["acts"] is None else s["acts"]
    stats_hh, batch_hh = s["stats_hh"], s["batch_hh"]
    features = 3 * hidden
    normed, batch = norm != "none", norm == "batch"
    g = _groups(norm, groups)
    dtype = hs.dtype
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
                _rows_apart(s["batch_hh"], s["running_hh"]),
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
    xhat_ih,  # empty, as the forward saves neither: computed again, a window at a time
    stats_ih,
    counts,
    running_ih,
    norm,
    groups,
    eps,
    training,
    needs,
    backend,
):
    steps, n, features = acts.shape
    hidden = features // 3
    dtype = torch.float64 if acts.dtype == torch.float64 else torch.float32  # gradients
    wanted = dict(zip(_GRU_GRADS, needs))
    t = {
        "grad_out": grad_out.contiguous(),
        "dh0": grad_h.to(dtype).clone(),  # as in lstm_backward
        **_sums(wanted, dtype, w_ih, w_hh, w_ih[:, 0], b_hh, gamma_ih, gamma_hh),
        "dx": torch.empty_like(x) if wanted["dx"] else None,
        "x": x,
        "acts": acts,
        "gh_n": ghn,
        "hs": hs,
        "xhat_hh": xhat_hh,
        "stats_hh": _per_step(stats_hh, steps),
        "running_ih": running_ih,
        "mask": mask,
        "w_ih": w_ih,
        "w_hh": w_hh,
        "gamma_ih": gamma_ih,
        "gamma_hh": gamma_hh,
    }
    config = (norm, groups, eps, training, n, hidden)
    graphs.run(
        ("gru_backward", *config),
        lambda s, k: _gru_backward_loop(s, k, *config),
        t,
        steps,
        timed=_TIMED,
        writes=_GRU_GRADS,
        reverse=True,
    )
    grads = tuple(t[name] for name in _GRU_GRADS)
    likes = (x, grad_h, w_ih, w_hh, grad_h, grad_h if b_hh is None else b_hh, gamma_ih, gamma_hh)
    return _wanted(grads, likes, needs, x)


def _gru_backward_loop(s, steps, norm, groups, eps, training, n, hidden) -> None:
    """The backward through time of ``steps`` steps in windows, as _lstm_backward_loop."""
    features = 3 * hidden
    normed, batch = norm != "none", norm == "batch"
    mask, w_hh, acts, hs, dh = s["mask"], s["w_hh"], s["acts"], s["hs"], s["dh0"]
    g = _groups(norm, groups)
    dtype = dh.dtype
    windows = graphs.windows(steps)
    window = min(steps, graphs.window())  # the first window's steps, the most of any
    dgates = torch.empty(window, n, features, device=acts.device, dtype=dtype)
    dgh = torch.empty_like(dgates)
    dz = torch.empty_like(dgates) if normed else dgh
    dprev = torch.empty(n, hidden, device=acts.device, dtype=w_hh.dtype)
    bh = triton.next_power_of_2(hidden)
    bn, bj = block_columns(n, hidden)
    for start, k in reversed(windows):
        for t in range(start + k - 1, start - 1, -1):
            j = t - start  # the step within the window
            valid = None if mask is None else mask[t]
            buffers = (
                dh,
                s["grad_out"][t],
                dgates[j],
                dgh[j],
                dz[j],
                acts[t],
                s["gh_n"][t],
                hs[t],
                s["xhat_hh"][t] if normed else acts[t],
                s["stats_hh"][t],
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
            torch.mm(dz[j].to(w_hh.dtype), w_hh, out=dprev)
            if valid is None:
                dh += dprev
            else:
                dh += torch.where(valid.unsqueeze(1), dprev.to(dh.dtype), 0)
        steps_here = slice(start, start + k)  # as in _lstm_backward_loop
        _add(s["dw_hh"], _weight_grad, dz[:k], hs[steps_here], w_hh)
        _add(s["db_hh"], torch.sum, dgh[:k], (0, 1))
        if normed:
            _add(s["dgamma_hh"], _sum_of_products, dgh[:k], s["xhat_hh"][steps_here])
        _input_window_backward(s, steps_here, dgates[:k], "db_ih", norm, groups, eps, training)
