"""The recurrence as PyTorch operators, registered with ``torch.library``.

``seqnorm::lstm_forward`` and ``seqnorm::gru_forward`` run one direction of one layer (the input
projection of every step and its normalization, then the time loop) and return the outputs, the
final state, batch norm's batch statistics and what the backward needs (:class:`LSTMSaved`,
:class:`GRUSaved`); ``seqnorm::lstm_backward`` and ``seqnorm::gru_backward`` are their
gradients, registered as their autograd formulas. ``seqnorm::update_running_stats`` moves batch
norm's running statistics (its two mutated arguments). Every operator has a fake
implementation, so ``torch.compile`` and ``torch.export`` keep each direction as one node
whatever the sequence length.

Kernels: on CPU the C++ one (:mod:`seqnorm.ops.cpp`), or the Triton one in Triton's interpreter
when the backend argument says ``"triton"``; on CUDA the Triton one. A backward run with grad
mode on (``create_graph=True``: higher-order gradients) or on batched gradients (``vmap``) does
not call the backward operator: it recomputes the direction through the differentiable
reference loop (:mod:`seqnorm.ops.reference`) and differentiates that, so every order of
gradient is exact.
"""

from __future__ import annotations

import inspect
from collections import namedtuple

import torch
from torch import Tensor

from . import cpp, reference
from .types import GRUParams, GRUSaved, LSTMParams, LSTMSaved, NormConfig

_Opt = Tensor | None


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _stats_numel(norm: str, groups: int, steps, n, features) -> int:
    """The statistics a norm keeps per site: rstd (T, N, G), or batch mean and rstd (T, 2, F)."""
    if norm == "batch":
        return steps * 2 * features
    if norm == "none":
        return 0
    return steps * n * (groups if norm == "group" else 1)


def _operator(name: str):
    """``torch.library.custom_op(name)`` for a function without mutated arguments, which also
    gives the operator ``Args``: a named tuple of its arguments in schema order. Its fake and its
    kernels take ``*args`` (the dispatcher passes every argument by position: the schemas have no
    keyword-only ones) and read them through ``Args``, so the argument list is written once, in
    the operator's definition."""

    def register(fn):
        op = torch.library.custom_op(name, mutates_args=())(fn)
        op.Args = namedtuple(f"{fn.__name__}_args", inspect.signature(fn).parameters)
        return op

    return register


# --- LSTM -----------------------------------------------------------------------------------


@_operator("seqnorm::lstm_forward")
def lstm_forward(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: _Opt,
    b_hh: _Opt,
    w_hr: _Opt,
    gamma_ih: _Opt,
    gamma_hh: _Opt,
    gamma_c: _Opt,
    beta_c: _Opt,
    running_mean_ih: _Opt,
    running_var_ih: _Opt,
    running_mean_hh: _Opt,
    running_var_hh: _Opt,
    running_mean_c: _Opt,
    running_var_c: _Opt,
    mask: _Opt,
    norm: str,
    groups: int,
    eps: float,
    training: bool,
    keep: bool,
    backend: str,
) -> tuple[
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
    Tensor,
]:
    """One direction of an LSTM layer.

    ``running_mean_*``, ``running_var_*``: batch norm's running statistics of every step at a
    site, ``(T, F)``.
    ``keep``: a backward will follow (else nothing is saved). Returns ``out`` ``(T, N, P)``,
    ``h_n``, ``c_n``, the batch statistics of the three sites (``(2, T, F)``: mean and biased
    variance; empty unless batch norm in training) and the fields of :class:`LSTMSaved`.
    """
    raise NotImplementedError("seqnorm::lstm_forward has kernels for CPU and CUDA only")


@lstm_forward.register_fake
def _(*args):
    a = lstm_forward.Args(*args)
    steps, n = a.x.shape[:2]
    hidden, out_size = a.c0.shape[-1], a.h0.shape[-1]
    features = 4 * hidden
    batch = a.norm == "batch" and a.training
    state = a.h0.new_empty  # outputs and saved tensors are in the state's dtype
    heads = (
        state(steps, n, out_size),
        state(n, out_size),
        state(n, hidden),
        *(state(2, steps, f) if batch else state(0) for f in (features, features, hidden)),
    )
    counts = a.x.new_empty(steps, dtype=torch.long)
    if not a.keep:
        return (*heads, *(state(0) for _ in LSTMSaved._fields[:-1]), counts)
    normed = a.norm != "none"
    saved = LSTMSaved(
        hs=state(steps + 1, n, out_size),
        cs=state(steps + 1, n, hidden),
        acts=state(steps, n, features),
        xhat_hh=state(steps, n, features) if normed else state(0),
        stats_hh=state(_stats_numel(a.norm, a.groups, steps, n, features)),
        xhat_c=state(steps, n, hidden) if normed else state(0),
        stats_c=state(_stats_numel(a.norm, a.groups, steps, n, hidden)),
        hpre=state(steps, n, hidden) if a.w_hr is not None else state(0),
        **_input_saved(a, state, steps, n, features),
        counts=counts,
    )
    return (*heads, *saved)


@lstm_forward.register_kernel("cpu")
def _(*args):
    a = lstm_forward.Args(*args)
    if a.backend == "triton":
        return _triton().lstm_forward(*_stacked(a))
    cpp.load()
    kernels = torch.ops.seqnorm_cpp
    x, norm, groups, eps, training, keep = a.x, a.norm, a.groups, a.eps, a.training, a.keep
    mask, *running = _contiguous(a.mask, *_running(a))
    bias = None if a.b_ih is None else a.b_ih + a.b_hh
    gx, xhat_ih, stats_ih, batch_ih, _ = kernels.input_forward(
        x, a.w_ih, bias, a.gamma_ih, *running[:2], mask, norm, groups, eps, training, keep
    )
    (
        out,
        h,
        c,
        hs,
        cs,
        acts,
        xhat_hh,
        stats_hh,
        xhat_c,
        stats_c,
        hpre,
        batch_hh,
        batch_c,
        counts,
    ) = kernels.lstm_forward(
        gx,
        a.h0,
        a.c0,
        a.w_hh,
        a.w_hr,
        a.gamma_hh,
        a.gamma_c,
        a.beta_c,
        *running[2:],
        mask,
        norm,
        groups,
        eps,
        training,
        keep,
    )
    batch = norm == "batch" and training
    heads = (out, h, c, *(b if batch else _empty(x) for b in (batch_ih, batch_hh, batch_c)))
    if not keep:
        return (*heads, *(_empty(x) for _ in LSTMSaved._fields[:-1]), counts)
    normed = norm != "none"
    saved = LSTMSaved(
        hs,
        cs,
        acts,
        xhat_hh if normed else _empty(x),
        stats_hh,
        xhat_c if normed else _empty(x),
        stats_c,
        hpre if a.w_hr is not None else _empty(x),
        xhat_ih if normed else _empty(x),
        stats_ih,
        counts,
    )
    return (*heads, *saved)


def recomputes_input_xhat(norm: str, backend: str) -> bool:
    """Whether the forward leaves the input half's x_hat and statistics unsaved (empty), for the
    backward to compute them again from the input (and, for batch norm, the running statistics
    the forward was given, ``running_mean_ih`` and ``running_var_ih``): the Triton kernels do."""
    return backend == "triton" and norm != "none"


def _input_saved(a, state, steps: int, n: int, features: int) -> dict:
    """The fake forward's ``xhat_ih`` and ``stats_ih``."""
    if recomputes_input_xhat(a.norm, a.backend):
        return {"xhat_ih": state(0), "stats_ih": state(0)}
    return {
        "xhat_ih": state(steps, n, features) if a.norm != "none" else state(0),
        "stats_ih": state(_stats_numel(a.norm, a.groups, steps, n, features)),
    }


def _contiguous(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    return tuple(None if t is None else t.contiguous() for t in tensors)


@_operator("seqnorm::lstm_backward")
def lstm_backward(
    grad_out: Tensor,
    grad_h: Tensor,
    grad_c: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    w_hr: _Opt,
    gamma_ih: _Opt,
    gamma_hh: _Opt,
    gamma_c: _Opt,
    beta_c: _Opt,
    mask: _Opt,
    hs: Tensor,
    cs: Tensor,
    acts: Tensor,
    xhat_hh: Tensor,
    stats_hh: Tensor,
    xhat_c: Tensor,
    stats_c: Tensor,
    hpre: Tensor,
    xhat_ih: Tensor,
    stats_ih: Tensor,
    counts: Tensor,
    running_mean_ih: _Opt,
    running_var_ih: _Opt,
    norm: str,
    groups: int,
    eps: float,
    training: bool,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`lstm_forward`: those of ``x, h0, c0, w_ih, w_hh``, the bias
    (``b_ih`` and ``b_hh`` alike), ``w_hr, gamma_ih, gamma_hh, gamma_c, beta_c``, in that order
    (``needs`` says which are wanted; the others are empty). ``running_mean_ih``,
    ``running_var_ih``: the forward's, for a backward that normalizes the input half again
    (:func:`recomputes_input_xhat`)."""
    raise NotImplementedError("seqnorm::lstm_backward has kernels for CPU and CUDA only")


LSTM_GRADS = (
    "x",
    "h0",
    "c0",
    "w_ih",
    "w_hh",
    "bias",
    "w_hr",
    "gamma_ih",
    "gamma_hh",
    "gamma_c",
    "beta_c",
)
"""The gradients of :func:`lstm_backward`, in order (the kernels return them so)."""


@lstm_backward.register_fake
def _(*args):
    a = lstm_backward.Args(*args)
    bias = a.grad_c.new_empty(a.w_hh.shape[0])  # the biases are in the state's dtype
    likes = (a.x, a.grad_h, a.grad_c, a.w_ih, a.w_hh, bias, a.w_hr)
    likes += (a.gamma_ih, a.gamma_hh, a.gamma_c, a.beta_c)
    return _fake_grads(likes, a.needs, a.x)


@lstm_backward.register_kernel("cpu")
def _(*args):
    a = lstm_backward.Args(*args)
    if a.backend == "triton":
        return _triton().lstm_backward(*_stacked(a))
    grads = torch.ops.seqnorm_cpp.lstm_backward(
        a.grad_out,
        a.grad_h,
        a.grad_c,
        [getattr(a, name) for name in LSTMSaved._fields],
        a.x,
        a.w_ih,
        a.w_hh,
        a.w_hr,
        a.gamma_ih,
        a.gamma_hh,
        a.gamma_c,
        a.beta_c,
        *_contiguous(a.mask),
        a.norm,
        a.groups,
        a.eps,
        a.training,
        a.needs,
    )
    return _wanted(grads, a.needs, a.x)


def _fake_grads(likes, needs, like: Tensor) -> tuple[Tensor, ...]:
    """A backward's fake results: a tensor like each wanted gradient's input, empty ones else."""
    return tuple(
        torch.empty_like(t) if need and t is not None else _empty(like)
        for t, need in zip(likes, needs)
    )


def _wanted(grads, needs, like: Tensor) -> tuple[Tensor, ...]:
    """The gradients asked for, empty tensors for the rest (an operator returns no None)."""
    return tuple(
        g if need and g is not None and g.numel() else _empty(like) for g, need in zip(grads, needs)
    )


def _lstm_setup(ctx, inputs, output):
    # Only out, h_n and c_n carry gradients: without this, autograd would hand the backward a
    # zero tensor for every other output (the saved activations: tens of MB at once).
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(*output[3:])
    (x, h0, c0, *rest) = inputs
    params = LSTMParams(*rest[:9])
    running = rest[9:15]
    mask, norm, groups, eps, training, keep, backend = rest[15:]
    ctx.config = NormConfig(norm, groups, eps, training)
    ctx.backend, ctx.has_mask = backend, mask is not None
    ctx.optional = [t is not None for t in (*params, *running)]
    saved = output[6:] if keep else ()
    present = [t for t in (*params, *running) if t is not None]
    ctx.save_for_backward(x, h0, c0, mask, *present, *saved)
    ctx.keep = keep


def _unpack(ctx, fields: type) -> tuple:
    """The forward's inputs and saved results, as saved by a setup function above."""
    x, h0, c0, mask, *rest = ctx.saved_tensors
    present = iter(rest)
    optional = [next(present) if has else None for has in ctx.optional]
    saved = list(present)
    n_params = len(fields._fields)
    return x, h0, c0, mask, fields(*optional[:n_params]), optional[n_params:], saved


def _lstm_backward(ctx, grad_out, grad_h, grad_c, *unused):
    x, h0, c0, mask, params, running, saved = _unpack(ctx, LSTMParams)
    inputs = (x, h0, c0, *params)
    grads = [_zeros_if_none(g, t) for g, t in ((grad_out, None), (grad_h, h0), (grad_c, c0))]
    if grads[0] is None:
        grads[0] = x.new_zeros(x.shape[0], x.shape[1], h0.shape[-1])
    if _recompute(grads) or not ctx.keep:
        with torch.enable_grad():
            out, h, c, _ = reference.lstm(
                x, h0, c0, params, ctx.config, _rows(running), mask if ctx.has_mask else None
            )
        result = _grad_through((out, h, c), grads, inputs, ctx.needs_input_grad)
    else:
        s = LSTMSaved(*saved)
        needs = list(ctx.needs_input_grad[:5])
        needs += [ctx.needs_input_grad[5] or ctx.needs_input_grad[6], *ctx.needs_input_grad[7:12]]
        g = torch.ops.seqnorm.lstm_backward(
            *grads,
            x,
            params.w_ih,
            params.w_hh,
            params.w_hr,
            params.gamma_ih,
            params.gamma_hh,
            params.gamma_c,
            params.beta_c,
            mask if ctx.has_mask else None,
            *s,
            *running[:2],  # the forward's input half's (a copy of the module's rows): for Triton
            *ctx.config,
            needs,
            ctx.backend,
        )
        dbias = g[5] if needs[5] else None
        result = [*g[:5], dbias, dbias, *g[6:]]
        result = _asked(result, ctx.needs_input_grad, inputs)
    return (*result, *(None,) * (len(ctx.needs_input_grad) - len(result)))


lstm_forward.register_autograd(_lstm_backward, setup_context=_lstm_setup)


# --- GRU --------------------------------------------------------------------------------------


@_operator("seqnorm::gru_forward")
def gru_forward(
    x: Tensor,
    h0: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: _Opt,
    b_hh: _Opt,
    gamma_ih: _Opt,
    gamma_hh: _Opt,
    running_mean_ih: _Opt,
    running_var_ih: _Opt,
    running_mean_hh: _Opt,
    running_var_hh: _Opt,
    mask: _Opt,
    norm: str,
    groups: int,
    eps: float,
    training: bool,
    keep: bool,
    backend: str,
) -> tuple[
    Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor
]:
    """One direction of a GRU layer: ``out``, ``h_n``, the batch statistics of the two sites and
    the fields of :class:`GRUSaved` (see :func:`lstm_forward`)."""
    raise NotImplementedError("seqnorm::gru_forward has kernels for CPU and CUDA only")


@gru_forward.register_fake
def _(*args):
    a = gru_forward.Args(*args)
    steps, n = a.x.shape[:2]
    hidden = a.h0.shape[-1]
    features = 3 * hidden
    batch = a.norm == "batch" and a.training
    state = a.h0.new_empty
    heads = (
        state(steps, n, hidden),
        state(n, hidden),
        *(state(2, steps, features) if batch else state(0) for _ in range(2)),
    )
    counts = a.x.new_empty(steps, dtype=torch.long)
    if not a.keep:
        return (*heads, *(state(0) for _ in GRUSaved._fields[:-1]), counts)
    normed = a.norm != "none"
    saved = GRUSaved(
        hs=state(steps + 1, n, hidden),
        acts=state(steps, n, features),
        ghn=state(steps, n, hidden),
        xhat_hh=state(steps, n, features) if normed else state(0),
        stats_hh=state(_stats_numel(a.norm, a.groups, steps, n, features)),
        **_input_saved(a, state, steps, n, features),
        counts=counts,
    )
    return (*heads, *saved)


@gru_forward.register_kernel("cpu")
def _(*args):
    a = gru_forward.Args(*args)
    if a.backend == "triton":
        return _triton().gru_forward(*_stacked(a))
    cpp.load()
    kernels = torch.ops.seqnorm_cpp
    x, norm, groups, eps, training, keep = a.x, a.norm, a.groups, a.eps, a.training, a.keep
    mask, *running = _contiguous(a.mask, *_running(a))
    gx, xhat_ih, stats_ih, batch_ih, _ = kernels.input_forward(
        x, a.w_ih, a.b_ih, a.gamma_ih, *running[:2], mask, norm, groups, eps, training, keep
    )
    out, h, hs, acts, gh_n, xhat_hh, stats_hh, batch_hh, counts = kernels.gru_forward(
        gx, a.h0, a.w_hh, a.b_hh, a.gamma_hh, *running[2:], mask, norm, groups, eps, training, keep
    )
    batch = norm == "batch" and training
    heads = (out, h, *(b if batch else _empty(x) for b in (batch_ih, batch_hh)))
    if not keep:
        return (*heads, *(_empty(x) for _ in GRUSaved._fields[:-1]), counts)
    normed = norm != "none"
    saved = GRUSaved(
        hs,
        acts,
        gh_n,
        xhat_hh if normed else _empty(x),
        stats_hh,
        xhat_ih if normed else _empty(x),
        stats_ih,
        counts,
    )
    return (*heads, *saved)


@_operator("seqnorm::gru_backward")
def gru_backward(
    grad_out: Tensor,
    grad_h: Tensor,
    x: Tensor,
    w_ih: Tensor,
    w_hh: Tensor,
    b_hh: _Opt,
    gamma_ih: _Opt,
    gamma_hh: _Opt,
    mask: _Opt,
    hs: Tensor,
    acts: Tensor,
    ghn: Tensor,
    xhat_hh: Tensor,
    stats_hh: Tensor,
    xhat_ih: Tensor,
    stats_ih: Tensor,
    counts: Tensor,
    running_mean_ih: _Opt,
    running_var_ih: _Opt,
    norm: str,
    groups: int,
    eps: float,
    training: bool,
    needs: list[bool],
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`gru_forward`: those of ``x, h0, w_ih, w_hh, b_ih, b_hh,
    gamma_ih, gamma_hh``, in that order (``needs`` says which are wanted)."""
    raise NotImplementedError("seqnorm::gru_backward has kernels for CPU and CUDA only")


GRU_GRADS = ("x", "h0", "w_ih", "w_hh", "b_ih", "b_hh", "gamma_ih", "gamma_hh")
"""The gradients of :func:`gru_backward`, in order (the kernels return them so)."""


@gru_backward.register_fake
def _(*args):
    a = gru_backward.Args(*args)
    b_ih = a.grad_h.new_empty(a.w_hh.shape[0])  # in the state's dtype
    likes = (a.x, a.grad_h, a.w_ih, a.w_hh, b_ih, a.b_hh, a.gamma_ih, a.gamma_hh)
    return _fake_grads(likes, a.needs, a.x)


@gru_backward.register_kernel("cpu")
def _(*args):
    a = gru_backward.Args(*args)
    if a.backend == "triton":
        return _triton().gru_backward(*_stacked(a))
    grads = torch.ops.seqnorm_cpp.gru_backward(
        a.grad_out,
        a.grad_h,
        [getattr(a, name) for name in GRUSaved._fields],
        a.x,
        a.w_ih,
        a.w_hh,
        a.b_hh,
        a.gamma_ih,
        a.gamma_hh,
        *_contiguous(a.mask),
        a.norm,
        a.groups,
        a.eps,
        a.training,
        a.needs,
    )
    return _wanted(grads, a.needs, a.x)


def _gru_setup(ctx, inputs, output):
    ctx.set_materialize_grads(False)  # as for the LSTM
    ctx.mark_non_differentiable(*output[2:])
    x, h0, *rest = inputs
    params = GRUParams(*rest[:6])
    running = rest[6:10]
    mask, norm, groups, eps, training, keep, backend = rest[10:]
    ctx.config = NormConfig(norm, groups, eps, training)
    ctx.backend, ctx.has_mask, ctx.keep = backend, mask is not None, keep
    ctx.optional = [t is not None for t in (*params, *running)]
    saved = output[4:] if keep else ()
    present = [t for t in (*params, *running) if t is not None]
    ctx.save_for_backward(x, h0, h0, mask, *present, *saved)  # h0 twice: the LSTM's c0 slot


def _gru_backward(ctx, grad_out, grad_h, *unused):
    x, h0, _, mask, params, running, saved = _unpack(ctx, GRUParams)
    inputs = (x, h0, *params)
    grads = [_zeros_if_none(grad_out, None), _zeros_if_none(grad_h, h0)]
    if grads[0] is None:
        grads[0] = x.new_zeros(x.shape[0], x.shape[1], h0.shape[-1])
    if _recompute(grads) or not ctx.keep:
        with torch.enable_grad():
            out, h, _ = reference.gru(
                x, h0, params, ctx.config, _rows(running), mask if ctx.has_mask else None
            )
        result = _grad_through((out, h), grads, inputs, ctx.needs_input_grad)
    else:
        needs = list(ctx.needs_input_grad[:8])
        g = torch.ops.seqnorm.gru_backward(
            *grads,
            x,
            params.w_ih,
            params.w_hh,
            params.b_hh,
            params.gamma_ih,
            params.gamma_hh,
            mask if ctx.has_mask else None,
            *GRUSaved(*saved),
            *running[:2],  # as for the LSTM
            *ctx.config,
            needs,
            ctx.backend,
        )
        result = _asked(g, needs, inputs)
    return (*result, *(None,) * (len(ctx.needs_input_grad) - len(result)))


gru_forward.register_autograd(_gru_backward, setup_context=_gru_setup)


# --- shared -----------------------------------------------------------------------------------


def _zeros_if_none(grad: Tensor | None, like: Tensor | None) -> Tensor | None:
    if grad is None and like is not None:
        return torch.zeros_like(like)
    return grad


def _recompute(grads) -> bool:
    """Whether the backward must go through the differentiable reference: a graph of the
    gradient is wanted (higher-order gradients), or the gradients are batched (vmap). (So does
    a backward of a forward that kept nothing, ``keep=False``.)"""
    if torch.is_grad_enabled():
        return True
    batched = torch._C._functorch.is_batchedtensor
    return any(g is not None and batched(g) for g in grads)


def _rows(running) -> tuple:
    """The (mean, var) rows per site from the forward's running inputs (a mean and a variance
    per site, in turn)."""
    return tuple(None if m is None else (m, v) for m, v in zip(running[::2], running[1::2]))


def _running(args) -> list:
    """An operator's running statistics arguments (its ``Args``), in order."""
    return [value for name, value in zip(args._fields, args) if name.startswith("running_")]


def _stacked(args) -> list:
    """An operator's arguments (its ``Args``) as the Triton kernels take them: each site's
    running mean and variance as one ``(2, T, F)`` tensor, in the mean's place."""
    taken = []
    for name, value in zip(args._fields, args):
        if name.startswith("running_mean_"):
            var = getattr(args, "running_var_" + name.removeprefix("running_mean_"))
            taken.append(None if value is None else _pair(value, var))
        elif not name.startswith("running_var_"):
            taken.append(value)
    return taken


def _pair(mean: Tensor, var: Tensor) -> Tensor:
    """``mean`` and ``var`` ``(T, F)`` as one ``(2, T, F)`` tensor: a view where ``var`` follows
    ``mean`` in memory (as ``seqnorm.ops._running_rows`` lays out the rows a backward keeps), so
    that neither the forward nor the backward copies them again; else a copy."""
    steps, features = mean.shape
    if (
        mean.is_contiguous()
        and var.is_contiguous()
        and var.shape == mean.shape
        and var.dtype == mean.dtype
        and var.device == mean.device
        and var.untyped_storage().data_ptr() == mean.untyped_storage().data_ptr()
        and var.storage_offset() == mean.storage_offset() + steps * features
    ):
        return mean.as_strided((2, steps, features), (steps * features, features, 1))
    return torch.stack((mean, var))


def _asked(results, needs, inputs) -> list:
    """The kernel's gradients that autograd asked for (the kernel returns an empty tensor for one
    it did not compute). An input with no elements (a batch of 0 samples) gets an empty gradient
    of its shape, as in torch.nn, not None."""
    asked = []
    for r, need, t in zip(results, needs, inputs):
        if need and t is not None and t.numel() == 0:
            asked.append(torch.zeros_like(t))
        else:
            asked.append(r if need and r.numel() else None)
    return asked


def _grad_through(outputs, grads, inputs, needs) -> list:
    wanted = [t for t, need in zip(inputs, needs) if need and t is not None]
    computed = iter(
        torch.autograd.grad(
            outputs, wanted, grads, create_graph=torch.is_grad_enabled(), allow_unused=True
        )
        if wanted
        else ()
    )
    result = [next(computed) if need and t is not None else None for t, need in zip(inputs, needs)]
    return [
        torch.zeros_like(t) if r is None and need and t is not None else r
        for r, t, need in zip(result, inputs, needs)
    ]


def _triton():
    from . import triton_kernels

    return triton_kernels


def _on_cuda(op, name: str):
    """The Triton implementation of operator ``op`` (the function ``name`` of
    :mod:`.triton_kernels`, which takes the arguments as :func:`_stacked` gives them), run with
    its GPU inputs' device current:
    Triton launches on the current device, so a model on cuda:1 while cuda:0 is current would
    otherwise run its kernels on the wrong GPU (an error, or wrong values where the GPUs can read
    each other's memory)."""

    def kernel(*args):
        device = next(a.device for a in args if isinstance(a, Tensor) and a.device.type != "cpu")
        with torch.cuda.device(device):
            return getattr(_triton(), name)(*_stacked(op.Args(*args)))

    return kernel


# On CUDA the Triton kernels, whatever the backend argument says (it is "triton" there).
for _op, _name in (
    (lstm_forward, "lstm_forward"),
    (lstm_backward, "lstm_backward"),
    (gru_forward, "gru_forward"),
    (gru_backward, "gru_backward"),
):
    _op.register_kernel("cuda")(_on_cuda(_op, _name))


@torch.library.custom_op(
    "seqnorm::update_running_stats", mutates_args=("running_mean", "running_var")
)
def update_running_stats(
    running_mean: Tensor, running_var: Tensor, batch: Tensor, counts: Tensor, momentum: float
) -> None:
    """Move batch norm's ``(S, F)`` running statistics towards the batch statistics of steps
    ``0 .. T-1`` (``batch`` ``(2, T, F)``: mean and biased variance; ``counts`` ``(T,)``)."""
    _update_running(running_mean, running_var, batch, counts, momentum)


def _update_running(running_mean, running_var, batch, counts, momentum) -> None:
    from ..functional import BatchStats, update_running

    update_running(running_mean, running_var, BatchStats(batch[0], batch[1], counts), 0, momentum)


_CPP_STATS = (torch.float32, torch.float64)  # what the C++ loop takes


@update_running_stats.register_kernel("cpu")
def _(running_mean, running_var, batch, counts, momentum):
    # the C++ loop (some twenty tensor operations fewer) once the forward has loaded the C++
    # kernels, for float statistics; else, as after Triton's interpreter, the tensor operations
    stats = (running_mean, running_var)
    if cpp.loaded() and all(s.dtype in _CPP_STATS and s.is_contiguous() for s in stats):
        torch.ops.seqnorm_cpp.update_running_stats(
            running_mean, running_var, batch, counts, momentum
        )
    else:
        _update_running(running_mean, running_var, batch, counts, momentum)


@update_running_stats.register_fake
def _(running_mean, running_var, batch, counts, momentum):
    return None
