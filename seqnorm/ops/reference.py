"""The recurrence in readable Python: the step equations of :mod:`seqnorm.functional`, one step
at a time.

This is the ``python`` backend, the fallback where no kernel applies, and the differentiable path
that higher-order gradients and ``torch.func`` transforms take (:mod:`seqnorm.ops.library`).
Every kernel is tested against it. A direction's padding is a mask: a sample that is not valid
at a step keeps its state, outputs zero and takes no part in batch statistics.

:func:`lstm_scan` and :func:`gru_scan` run the same steps as one ``scan`` (a higher-order
operator): ``torch.onnx.export`` records it as an ONNX ``Scan``, whose length follows the
input's, where a Python loop would be unrolled at the example's length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch._higher_order_ops.scan import scan

from .. import functional as SF
from .types import GRUParams, LSTMParams, NormConfig

Rows = tuple[Tensor, Tensor]
"""Batch norm's running mean and variance of every step of a direction, ``(T, F)`` each."""


class SiteNorm:
    """The normalization at one site of a direction (input projection, recurrent projection or
    cell state): its kind and parameters and, for batch norm, the running statistics a step
    falls back to; it collects the batch statistics it computes."""

    def __init__(
        self,
        config: NormConfig,
        weight: Tensor | None,
        bias: Tensor | None,
        rows: Rows | None,
        mask: Tensor | None,
        all_reduce: Callable[[Tensor], Tensor] | None = None,
    ):
        self.config, self.weight, self.bias, self.rows = config, weight, bias, rows
        self.mask, self.all_reduce = mask, all_reduce
        self._stats: list[SF.BatchStats] = []

    @property
    def active(self) -> bool:
        return self.config.norm != "none"

    def all_steps(self, v: Tensor) -> Tensor:
        """Normalize ``v`` ``(T, N, F)``, every step at once."""
        return self._apply(v, slice(None))

    def at(self, t: int) -> Callable[[Tensor], Tensor] | None:
        """The normalization of step ``t``, for ``(N, F)`` values (None without a norm)."""
        if not self.active:
            return None
        return lambda v: self._apply(v.unsqueeze(0), slice(t, t + 1)).squeeze(0)

    def _apply(self, v: Tensor, steps: slice) -> Tensor:
        c = self.config
        if c.norm != "batch":
            groups = c.groups if c.norm == "group" else 1
            y = SF.group_norm(v.flatten(0, -2), groups, self.weight, self.bias, c.eps)
            return y.reshape(v.shape)
        mean, var = self.rows
        y, stats = SF.recurrent_batch_norm(
            v,
            mean[steps],
            var[steps],
            self.weight,
            self.bias,
            mask=None if self.mask is None else self.mask[steps],
            training=c.training,
            eps=c.eps,
            all_reduce=self.all_reduce,
        )
        if stats is not None:
            self._stats.append(stats)
        return y

    @property
    def stats(self) -> SF.BatchStats | None:
        """The batch statistics of every step computed so far (training batch norm), in order."""
        if not self._stats:
            return None
        return SF.BatchStats(*(torch.cat(parts) for parts in zip(*self._stats)))


def _recur(steps: int, mask: Tensor | None, state: tuple[Tensor, ...], step) -> tuple:
    """``state = step(t, state)`` over the steps, kept where ``mask`` is off; returns the
    ``(T, N, H)`` outputs (zero at padding) and the final state."""
    outputs = []
    for t in range(steps):
        new = step(t, state)
        if mask is None:
            outputs.append(new[0])
        else:
            valid = mask[t].unsqueeze(1)  # (N, 1)
            new = tuple(torch.where(valid, a, b) for a, b in zip(new, state))
            outputs.append(torch.where(valid, new[0], 0))
        state = new
    if not outputs:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    return torch.stack(outputs), state


def lstm(
    x: Tensor,
    h0: Tensor,
    c0: Tensor,
    params: LSTMParams,
    config: NormConfig,
    rows: tuple[Rows | None, Rows | None, Rows | None],
    mask: Tensor | None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor, tuple[SF.BatchStats | None, ...]]:
    """One direction of an LSTM layer.

    Args:
        x: ``(T, N, H_in)``; h0: ``(N, P)``; c0: ``(N, H)``.
        rows: batch norm's running statistics of every step at the input projection, the
            recurrent projection and the cell state (None for the other norms).
        mask: ``(T, N)`` bool, True where a sample is valid, or None.
        all_reduce: sums over processes, for batch statistics over the global batch.

    Returns:
        ``(T, N, P)`` outputs, ``h_n``, ``c_n`` and the batch statistics of each site.
    """
    p = params
    norm_ih, norm_hh, norm_c = (
        SiteNorm(config, weight, bias, r, mask, all_reduce)
        for (weight, bias), r in zip(
            ((p.gamma_ih, None), (p.gamma_hh, None), (p.gamma_c, p.beta_c)), rows
        )
    )
    gx = SF.lstm_input(x, p.w_ih, p.b_ih, p.b_hh, norm_ih.all_steps if norm_ih.active else None)

    def step(t, state):
        h, c = state
        return SF.lstm_step(gx[t], h, c, p.w_hh, norm_hh.at(t), norm_c.at(t), p.w_hr)

    out, (h, c) = _recur(x.shape[0], mask, (h0, c0), step)
    return out, h, c, (norm_ih.stats, norm_hh.stats, norm_c.stats)


def gru(
    x: Tensor,
    h0: Tensor,
    params: GRUParams,
    config: NormConfig,
    rows: tuple[Rows | None, Rows | None],
    mask: Tensor | None,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, tuple[SF.BatchStats | None, ...]]:
    """One direction of a GRU layer, as :func:`lstm`: returns the outputs, ``h_n`` and the batch
    statistics of the input and recurrent projections."""
    p = params
    norm_ih = SiteNorm(config, p.gamma_ih, None, rows[0], mask, all_reduce)
    norm_hh = SiteNorm(config, p.gamma_hh, None, rows[1], mask, all_reduce)
    gx = SF.gru_input(x, p.w_ih, p.b_ih, norm_ih.all_steps if norm_ih.active else None)

    def step(t, state):
        return (SF.gru_step(gx[t], state[0], p.w_hh, p.b_hh, norm_hh.at(t)),)

    out, (h,) = _recur(x.shape[0], mask, (h0,), step)
    return out, h, (norm_ih.stats, norm_hh.stats)


def _step_norm(config: NormConfig, weight, bias, v: Tensor, mean_t, var_t, valid_t) -> Tensor:
    """One step's normalization of ``v`` ``(N, F)`` (batch norm: with its running rows and the
    valid samples of the step)."""
    if config.norm == "none":
        return v
    if config.norm != "batch":
        groups = config.groups if config.norm == "group" else 1
        return SF.group_norm(v, groups, weight, bias, config.eps)
    y, _ = SF.recurrent_batch_norm(
        v.unsqueeze(0),
        mean_t.unsqueeze(0),
        var_t.unsqueeze(0),
        weight,
        bias,
        mask=None if valid_t is None else valid_t.unsqueeze(0),
        training=config.training,
        eps=config.eps,
    )
    return y.squeeze(0)


def _scan_inputs(gx: Tensor, mask: Tensor | None, rows: tuple) -> tuple[list[Tensor], Callable]:
    """The per-step inputs of a scan (gates' input half, mask, running rows of each site) and a
    function that splits one step's slice of them back into (gx_t, valid_t, rows_t)."""
    batch_rows = [r for site in rows if site is not None for r in site]
    xs = [gx, *([] if mask is None else [mask]), *batch_rows]

    def split(sliced):
        gx_t, rest = sliced[0], list(sliced[1:])
        valid_t = rest.pop(0) if mask is not None else None
        per_site = []
        for site in rows:
            per_site.append((rest.pop(0), rest.pop(0)) if site is not None else (None, None))
        return gx_t, valid_t, per_site

    return xs, split


def _masked(valid_t, new: tuple, old: tuple) -> tuple[tuple, Tensor]:
    if valid_t is None:
        return new, new[0].clone()  # a scan's output may not alias its carry
    keep = valid_t.unsqueeze(1)
    new = tuple(torch.where(keep, a, b) for a, b in zip(new, old))
    return new, torch.where(keep, new[0], 0)


def lstm_scan(x, h0, c0, params: LSTMParams, config: NormConfig, rows, mask) -> tuple:
    """:func:`lstm` as a scan (for export): returns the outputs, ``h_n`` and ``c_n``; batch norm's
    running statistics are read, not moved."""
    p = params
    norm_ih = SiteNorm(config, p.gamma_ih, None, rows[0], mask)
    gx = SF.lstm_input(x, p.w_ih, p.b_ih, p.b_hh, norm_ih.all_steps if norm_ih.active else None)
    xs, split = _scan_inputs(gx, mask, rows[1:])

    def step(carry, sliced):
        h, c = carry
        gx_t, valid_t, ((mean_hh, var_hh), (mean_c, var_c)) = split(sliced)
        norm_hh = lambda v: _step_norm(config, p.gamma_hh, None, v, mean_hh, var_hh, valid_t)
        norm_c = lambda v: _step_norm(config, p.gamma_c, p.beta_c, v, mean_c, var_c, valid_t)
        new = SF.lstm_step(gx_t, h, c, p.w_hh, norm_hh, norm_c, p.w_hr)
        new, out = _masked(valid_t, new, (h, c))
        return new, out

    (h, c), out = scan(step, (h0, c0), xs)
    return out, h, c


def gru_scan(x, h0, params: GRUParams, config: NormConfig, rows, mask) -> tuple:
    """:func:`gru` as a scan (for export): returns the outputs and ``h_n``."""
    p = params
    norm_ih = SiteNorm(config, p.gamma_ih, None, rows[0], mask)
    gx = SF.gru_input(x, p.w_ih, p.b_ih, norm_ih.all_steps if norm_ih.active else None)
    xs, split = _scan_inputs(gx, mask, rows[1:])

    def step(carry, sliced):
        (h,) = carry
        gx_t, valid_t, ((mean_hh, var_hh),) = split(sliced)
        norm_hh = lambda v: _step_norm(config, p.gamma_hh, None, v, mean_hh, var_hh, valid_t)
        new, out = _masked(valid_t, (SF.gru_step(gx_t, h, p.w_hh, p.b_hh, norm_hh),), (h,))
        return new, out

    (h,), out = scan(step, (h0,), xs)
    return out, h
