"""The recurrence operator: one direction of one layer, on every device.

:func:`lstm` and :func:`gru` run the input projection of every step and its normalization, then
the time loop, through the ``seqnorm::lstm_forward`` / ``seqnorm::gru_forward`` operators
(:mod:`.library`): the C++ kernel on CPU (:mod:`.cpp`, ``csrc/``), Triton kernels on CUDA
(:mod:`.triton_kernels`), or the readable Python loop (:mod:`.reference`) that every kernel is
tested against. :mod:`.backend` chooses among them (``SEQNORM_BACKEND``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import Tensor

from .. import functional as SF
from . import library, reference  # noqa: F401  (library registers the operators)
from .backend import BACKENDS, HALF, choose, cpp_dtype
from .types import GRUParams, LSTMParams, NormConfig, Running

__all__ = [
    "BACKENDS",
    "GRUParams",
    "LSTMParams",
    "NormConfig",
    "Running",
    "cache_info",
    "choose",
    "empty_cache",
    "gru",
    "lstm",
    "set_cache_limit",
]

AllReduce = Callable[[Tensor], Tensor] | None


def lstm(
    x: Tensor,
    state: tuple[Tensor, Tensor],
    params: LSTMParams,
    config: NormConfig,
    running: tuple[Running | None, Running | None, Running | None],
    mask: Tensor | None,
    backend: str,
    all_reduce: AllReduce = None,
) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """One direction of an LSTM layer, as :func:`seqnorm.functional.lstm_input` and a loop of
    :func:`seqnorm.functional.lstm_step` compute it.

    Args:
        x: ``(T, N, H_in)``; state: ``(h_0, c_0)``, ``(N, P)`` and ``(N, H)``.
        running: batch norm's running statistics at the input projection, the recurrent
            projection and the cell state, moved in training (None for the other norms).
        mask: ``(T, N)`` bool, True where a sample is valid, or None.
        backend: ``"cpp"``, ``"triton"``, ``"python"`` or ``"scan"`` (see :func:`choose`).
        all_reduce: sums over processes (synchronized batch norm; the Python loop only).

    Returns:
        ``(T, N, P)`` outputs (zero at padding) and ``(h_n, c_n)``.
    """
    h0, c0 = state
    if backend == "scan":
        rows = tuple(_rows(r, x.shape[0]) for r in running)
        out, h, c = reference.lstm_scan(x, h0, c0, params, config, rows, mask)
        return out, (h, c)
    if backend == "python":
        rows = tuple(_rows(r, x.shape[0]) for r in running)
        out, h, c, stats = reference.lstm(x, h0, c0, params, config, rows, mask, all_reduce)
        _update(running, stats)
        return out, (h, c)
    keep = _keep(x, h0, c0, *params)
    rows = _running_rows(running, x.shape[0], keep)
    p = _Precision(backend, x, (h0, c0, *rows), params)
    with p.context:
        result = torch.ops.seqnorm.lstm_forward(
            p.x, *p.tensors[:2], *p.params, *p.tensors[2:], mask, *config, keep, backend
        )
    if config.norm == "batch" and config.training:
        _update_op(running, result[3:6], result[-1])
    return p.back(result[0]), (p.back(result[1]), p.back(result[2]))


def gru(
    x: Tensor,
    h0: Tensor,
    params: GRUParams,
    config: NormConfig,
    running: tuple[Running | None, Running | None],
    mask: Tensor | None,
    backend: str,
    all_reduce: AllReduce = None,
) -> tuple[Tensor, Tensor]:
    """One direction of a GRU layer, as :func:`lstm` (``h0`` ``(N, H)``): returns the outputs
    and ``h_n``."""
    if backend == "scan":
        rows = tuple(_rows(r, x.shape[0]) for r in running)
        return reference.gru_scan(x, h0, params, config, rows, mask)
    if backend == "python":
        rows = tuple(_rows(r, x.shape[0]) for r in running)
        out, h, stats = reference.gru(x, h0, params, config, rows, mask, all_reduce)
        _update(running, stats)
        return out, h
    keep = _keep(x, h0, *params)
    rows = _running_rows(running, x.shape[0], keep)
    p = _Precision(backend, x, (h0, *rows), params)
    with p.context:
        result = torch.ops.seqnorm.gru_forward(
            p.x, p.tensors[0], *p.params, *p.tensors[1:], mask, *config, keep, backend
        )
    if config.norm == "batch" and config.training:
        _update_op(running, result[2:4], result[-1])
    return p.back(result[0]), p.back(result[1])


class _Precision:
    """The operator's inputs in the dtypes its kernel takes, the context to run it in, and
    ``back``, which returns a result in the dtype the caller expects.

    Under autocast the Triton kernels take the input and the weights in the autocast dtype (the
    products run in half precision) and keep the norms' parameters and the state in theirs
    (float32). The C++ kernel computes in float32 or float64 (:func:`.backend.cpp_dtype`): half
    precision (parameters converted with ``.to(torch.bfloat16)``, or inputs under CPU autocast)
    is converted to float32 for it, and the results go back to the parameters' half dtype, or stay
    float32 under autocast. The operator then runs with autocast off.

    Args:
        tensors: the state and the running means and variances (None where absent).
    """

    def __init__(self, backend: str, x: Tensor, tensors: tuple, params):
        self.x, self.tensors, self.params = x, tensors, params
        self.context, self.dtype = contextlib.nullcontext(), None  # dtype: that of the results
        device = x.device.type
        autocast = torch.is_autocast_enabled(device)
        if backend == "triton" and autocast:
            half = torch.get_autocast_dtype(device)
            cast = {
                name: getattr(params, name).to(half)
                for name in ("w_ih", "w_hh", "w_hr")
                if getattr(params, name, None) is not None
            }
            self.x, self.params = x.to(half), params._replace(**cast)
        elif backend == "cpp" and (autocast or x.dtype in HALF):
            dtype = cpp_dtype(x, [t for t in (*tensors, *params) if t is not None])
            self.dtype = None if autocast else x.dtype
            self.x = x.to(dtype)
            self.tensors = tuple(None if t is None else t.to(dtype) for t in tensors)
            self.params = params._make(None if t is None else t.to(dtype) for t in params)
        if autocast:
            self.context = torch.autocast(device, enabled=False)

    def back(self, result: Tensor) -> Tensor:
        return result if self.dtype is None else result.to(self.dtype)


def _keep(*tensors: Tensor | None) -> bool:
    """Whether a backward can follow, so that the forward must keep what it needs. Always under
    ``torch.jit.trace``: its graph serves training and inference alike (and its check reruns the
    graph without gradients, which must record the same call)."""
    if torch.jit.is_tracing():
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _rows(running: Running | None, steps) -> reference.Rows | None:
    if running is None:
        return None
    return SF.running_rows(running.mean, 0, steps), SF.running_rows(running.var, 0, steps)


def _running_rows(running, steps, keep: bool) -> tuple[Tensor | None, ...]:
    """Each site's running mean and variance of ``steps`` steps, ``(steps, F)`` each, in turn
    (two Nones for a site without batch norm). In eager mode, when every step has its own row,
    the module's own rows, sliced (a gather of them took 4-5x as long at 100 steps); traced or
    compiled, where ``steps`` may vary, always the gather. Where a backward may follow
    (``keep``), a copy, since autograd keeps them for it and a training forward moves the
    module's rows in place: one ``(2, steps, F)`` tensor, mean then variance, which the Triton
    kernels read as it is (:func:`.library._stacked`)."""
    sliced = (
        isinstance(steps, int) and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
    )
    rows = []
    for r in running:
        if r is None:
            rows += (None, None)
            continue
        in_place = sliced and steps <= r.mean.shape[0]
        pair = (r.mean[:steps], r.var[:steps]) if in_place else _rows(r, steps)
        rows += torch.stack(pair).unbind() if keep else pair
    return tuple(rows)


def _update(running, stats) -> None:
    for r, s in zip(running, stats):
        if r is not None and s is not None:
            SF.update_running(r.mean, r.var, s, 0, r.momentum)


@torch.no_grad()
def _update_op(running, batches, counts) -> None:
    for r, batch in zip(running, batches):
        average = SF._average_of(r.mean)
        if average is not None:  # seqnorm.update_bn is averaging instead
            average.add(SF.BatchStats(batch[0], batch[1], counts))
            continue
        torch.ops.seqnorm.update_running_stats(r.mean, r.var, batch, counts, r.momentum)


def cache_info() -> dict[str, int]:
    """The C++ kernel's buffer cache: bytes ``cached`` (freed, kept for reuse), ``in_use`` and
    the ``limit`` on cached bytes (see ``docs/kernels.md``). Builds the kernel if needed."""
    from . import cpp

    cpp.load()
    cached, in_use, limit = torch.ops.seqnorm_cpp.cache_info()
    return {"cached": cached, "in_use": in_use, "limit": limit}


def set_cache_limit(nbytes: int) -> None:
    """Keep at most ``nbytes`` of the C++ kernel's freed step buffers for reuse (default
    1 GiB; 0 caches none and releases what is kept)."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"nbytes={nbytes!r}: expected a whole number of bytes >= 0")
    from . import cpp

    cpp.load()
    torch.ops.seqnorm_cpp.set_cache_limit(nbytes)


def empty_cache() -> None:
    """Release the freed step buffers the C++ kernel keeps for reuse (those in use stay)."""
    from . import cpp

    cpp.load()
    torch.ops.seqnorm_cpp.empty_cache()
