"""The math of seqnorm, written once.

Normalizations (DESIGN.md §1) and the LSTM/GRU step equations (§2). Modules in ``norms``,
``cells`` and ``rnn`` own the parameters and call these functions; the fused kernels in
:mod:`seqnorm.ops` are tested against them.

Every normalization computes ``x_hat = (x - mean) / sqrt(var + eps)`` with the biased variance,
then ``y = gamma * x_hat + beta``. Statistics are taken in float64, so that they neither lose
precision in half precision nor overflow (the squares of float32 values of 1e19 and more do:
ATen's float32 layer norm then returns zeros or NaN, depending on the row's length); the
kernels agree, computing them in float32 where that is exact enough and in double where it
overflows. The result has the dtype that ``x * gamma + beta`` has (the input's when the
parameters share it, float32 under autocast, where the parameters stay float32).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .checks import check_groups

Norm = Callable[[Tensor], Tensor]
"""A normalization already bound to its parameters (and, for batch norm, to its time step)."""


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.float32 if x.device.type == "mps" else torch.float64  # MPS has no float64


def _result_dtype(x: Tensor, *params: Tensor | None) -> torch.dtype:
    """The dtype of ``x * gamma + beta``: the input's, promoted by the parameters'. ``x`` must be
    floating point: normalized integers would be rounded back to a few integers."""
    if not x.is_floating_point():
        raise TypeError(f"Expected argument `x` to be a floating-point tensor, got dtype {x.dtype}")
    dtype = x.dtype
    for p in params:
        if p is not None:
            dtype = torch.promote_types(dtype, p.dtype)
    return dtype


def static_size(x: Tensor, dim: int) -> int:
    """``x.shape[dim]`` as a Python int: under ``torch.jit.trace`` a constant of the graph (as
    ``nn.LayerNorm``'s normalized shape is) rather than a traced size, which TorchScript's ONNX
    exporter cannot turn into a norm's shape once the batch or time axis is dynamic."""
    if not torch.jit.is_tracing():
        return x.shape[dim]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # a constant is what we want
        return int(x.shape[dim])


def _affine(x_hat: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int) -> Tensor:
    """Per-channel ``gamma * x_hat + beta``, with the channel axis at ``channel_dim``."""
    shape = [1] * x_hat.dim()
    shape[channel_dim] = -1
    if weight is not None:
        x_hat = x_hat * weight.reshape(shape)
    if bias is not None:
        x_hat = x_hat + bias.reshape(shape)
    return x_hat


def group_norm(
    x: Tensor,
    groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """Group normalization (Wu & He, 2018): statistics over C/G channels and ``*`` per sample.

    Args:
        x: ``(N, C, *)``.
        groups: G, which must divide C. G=1 is layer norm, G=C is instance norm.
        weight, bias: ``(C,)`` per-channel gain and shift, or None.
        eps: added to the variance.

    Returns:
        ``(N, C, *)`` in the dtype of ``x * weight + bias``; statistics in float64.

    Example:
        >>> x = torch.randn(2, 4, 3)
        >>> torch.allclose(group_norm(x, 4), torch.nn.functional.instance_norm(x), atol=1e-6)
        True
    """
    out = _result_dtype(x, weight, bias)
    if x.dim() < 2:
        raise ValueError(f"Expected argument `x` of shape (N, C, *), got shape {tuple(x.shape)}")
    channels = static_size(x, 1)
    check_groups(groups, channels, "the channels of x (N, C, *), C")
    xs = x.to(_stats_dtype(x))
    cast = lambda p: None if p is None else p.to(xs.dtype)
    if x.dim() == 2:  # the same statistics; ATen's layer norm is the faster kernel
        if groups == 1:
            return F.layer_norm(xs, (channels,), cast(weight), cast(bias), eps).to(out)
        rows = xs.reshape(x.shape[0], groups, channels // groups)  # -1 is ambiguous at N = 0
        x_hat = F.layer_norm(rows, (channels // groups,), eps=eps)
        return _affine(x_hat.reshape(x.shape), cast(weight), cast(bias), channel_dim=1).to(out)
    return F.group_norm(xs, groups, cast(weight), cast(bias), eps).to(out)


def layer_norm(x: Tensor, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Layer normalization (Ba et al., 2016): statistics over C and ``*`` per sample.

    ``x`` is ``(N, C, *)``; gain and shift are per channel. See :func:`group_norm`.
    """
    return group_norm(x, 1, weight, bias, eps)


def instance_norm(x: Tensor, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    """Instance normalization (Ulyanov et al., 2016): statistics over ``*`` per sample and channel.

    ``x`` is ``(N, C, *)``; see :func:`group_norm`.
    """
    return group_norm(x, x.shape[1], weight, bias, eps)


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Batch normalization (Ioffe & Szegedy, 2015): statistics over N and ``*`` per channel.

    In training, batch statistics are used and the running ones (if given) move towards them
    by ``momentum``, with the unbiased variance, as in ``torch.nn.BatchNorm1d``. In eval mode the
    running statistics are used.

    Args:
        x: ``(N, C, *)``.
        running_mean, running_var: ``(C,)`` buffers updated in place, or None.
    """
    out = _result_dtype(x, weight, bias)
    dims = [0, *range(2, x.dim())]
    xs = x.to(_stats_dtype(x))
    if training or running_mean is None:
        var, mean = torch.var_mean(xs, dim=dims, correction=0)  # (C,)
        if training and running_mean is not None:
            count = x.numel() // x.shape[1]
            with torch.no_grad():
                running_mean.lerp_(mean.to(running_mean.dtype), momentum)
                running_var.lerp_((var * count / max(count - 1, 1)).to(running_var.dtype), momentum)
    else:
        mean, var = running_mean.to(xs.dtype), running_var.to(xs.dtype)
    shape = [1, -1] + [1] * (x.dim() - 2)
    x_hat = (xs - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    cast = lambda p: None if p is None else p.to(xs.dtype)
    return _affine(x_hat, cast(weight), cast(bias), channel_dim=1).to(out)


class BatchStats(NamedTuple):
    """The batch statistics of every step of a recurrent batch norm, for its running ones."""

    mean: Tensor
    """``(T, F)``: each step's mean over its valid samples."""
    var: Tensor
    """``(T, F)``: each step's biased variance over its valid samples."""
    count: Tensor
    """``(T,)`` int64: each step's valid samples; steps with fewer than two used running ones."""


def recurrent_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    training: bool = True,
    eps: float = 1e-5,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, BatchStats | None]:
    """Recurrent batch normalization (Cooijmans et al., 2016) with per-step statistics.

    Each step's mean and biased variance are taken per feature over the samples valid at that
    step (``mask``), so padding never enters them. A step with fewer than two valid samples, and
    every step in eval mode, uses its running statistics instead.

    Args:
        x: ``(T, N, F)``.
        running_mean, running_var: ``(T, F)``, the running statistics of each step (see
            :func:`running_rows`); read, never written.
        weight, bias: ``(F,)`` or None.
        mask: ``(T, N)`` bool, True where a sample is valid; None means all valid.
        all_reduce: sums a tensor over processes (differentiably) to take the statistics over
            the global batch under data parallelism; None for local statistics.

    Returns:
        ``(T, N, F)`` and, in training, the batch statistics (for :func:`update_running`).
    """
    out = _result_dtype(x, weight, bias)
    xs = x.to(_stats_dtype(x))
    cast = lambda p: None if p is None else p.to(xs.dtype)
    if training and mask is None and all_reduce is None and x.shape[1] >= 2 and x.shape[2]:
        return _batch_norm_all_valid(xs, cast(weight), cast(bias), eps, out)
    run_mean, run_var = running_mean.to(xs.dtype), running_var.to(xs.dtype)
    stats = None
    if not training:
        mean, var = run_mean, run_var
    else:
        valid = xs.new_ones(xs.shape[:2]) if mask is None else mask.to(xs.dtype)
        w = valid.unsqueeze(-1)  # (T, N, 1)
        count, total = w.sum(1), (xs * w).sum(1)  # (T, 1), (T, F)
        if all_reduce is not None:
            count, total = all_reduce(count), all_reduce(total)
        batch_mean = total / count.clamp(min=1)
        squares = ((xs - batch_mean.unsqueeze(1)).square() * w).sum(1)  # (T, F)
        if all_reduce is not None:
            squares = all_reduce(squares)
        batch_var = squares / count.clamp(min=1)
        use_batch = count >= 2  # (T, 1)
        mean = torch.where(use_batch, batch_mean, run_mean)
        var = torch.where(use_batch, batch_var, run_var)
        stats = BatchStats(batch_mean.detach(), batch_var.detach(), count.squeeze(1).long())
    x_hat = (xs - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + eps)
    return _affine(x_hat, cast(weight), cast(bias), channel_dim=2).to(out), stats


def _batch_norm_all_valid(xs, weight, bias, eps, out) -> tuple[Tensor, BatchStats]:
    """:func:`recurrent_batch_norm` in training without padding (every step uses its batch
    statistics): one call of ATen's batch norm with a channel per (step, feature), which saves
    only its input for the backward."""
    steps, n, f = xs.shape
    with torch.no_grad():
        var, mean = torch.var_mean(xs, dim=1, correction=0)  # (T, F)
    channels = xs.permute(0, 2, 1).reshape(1, steps * f, n)  # statistics over the samples
    tile = lambda p: None if p is None else p.repeat(steps)
    y = F.batch_norm(channels, None, None, tile(weight), tile(bias), training=True, eps=eps)
    count = torch.full((steps,), n, dtype=torch.long, device=xs.device)
    return y.reshape(steps, f, n).permute(0, 2, 1).to(out), BatchStats(mean, var, count)


def step_rows(start, steps: int, rows: int, device) -> Tensor:
    """The row of ``rows`` running statistics that each of ``steps`` steps from ``start`` uses,
    ``min(start + t, rows - 1)``: steps past the last row share it."""
    return (torch.arange(steps, device=device) + start).clamp_(max=rows - 1)


def unbiased_var(stats: BatchStats) -> tuple[Tensor, Tensor]:
    """Each step's unbiased variance ``(T, F)`` (as ``torch.nn.BatchNorm1d`` moves its running
    variance by) and whether the step had the two valid samples it needs ``(T, 1)``, in the
    statistics' dtype."""
    count = stats.count.to(stats.var.device, stats.var.dtype).unsqueeze(1)  # (T, 1)
    return stats.var * count / (count - 1).clamp(min=1), count >= 2


def running_rows(running: Tensor, start, steps) -> Tensor:
    """Rows ``start .. start + steps - 1`` of ``(S, F)`` running statistics, as ``(T, F)``:
    steps past the last row share it."""
    return running[step_rows(start, steps, running.shape[0], running.device)]


@torch.no_grad()
def update_running(
    running_mean: Tensor, running_var: Tensor, stats: BatchStats, start: int, momentum: float
) -> None:
    """Move the running statistics towards each step's batch statistics, as if step by step.

    Step ``t`` moves row ``min(start + t, S - 1)`` by ``momentum`` (mean, and the unbiased
    variance as in ``torch.nn.BatchNorm1d``) if it had at least two valid samples. Steps past the
    last row share it and move it in turn, so a whole sequence updates the statistics exactly as
    one call per step would: a step followed by ``k`` later updates of the same row keeps weight
    ``momentum * (1 - momentum) ** k``. Only the touched range of rows is read and written, so a
    one-step call costs O(F), not O(S F).

    Raises:
        RuntimeError: under ``torch.func.vmap``, if the batch statistics are batched (one per
            vmapped input) and the running statistics are not: an in-place update cannot write
            several results into one tensor.
    """
    average = _average_of(running_mean)
    if average is not None:  # seqnorm.update_bn is averaging instead
        average.add(stats, start)
        return
    if not torch.compiler.is_compiling() and _batched(stats.mean) and not _batched(running_mean):
        raise RuntimeError(
            "Batch norm in training got batch statistics batched by torch.func.vmap, but the "
            "running statistics (running_mean, running_var) that they move in place are not "
            "batched. Call .eval() to normalize with the running statistics, or give each "
            "vmapped input its own running statistics: torch.func.functional_call with the "
            "module's buffers stacked along the vmapped dimension"
        )
    rows_total = running_mean.shape[0]
    steps = stats.mean.shape[0]
    slot = step_rows(start, steps, rows_total, running_mean.device)
    unbiased, used = unbiased_var(stats)
    used = used.to(running_mean.device, running_mean.dtype).squeeze(1)  # (T,)
    lo = min(start, rows_total - 1)
    hi = min(start + steps - 1, rows_total - 1) + 1
    index = slot - lo
    hits = used.new_zeros(hi - lo).index_add_(0, index, used)  # (R,)
    # Slots never decrease along the steps, so the updates after step t that hit its row are
    # the row's hits minus those up to and including t.
    upto = torch.cumsum(used, 0) - torch.cumsum(hits, 0)[index] + hits[index]  # (T,)
    later = hits[index] - upto
    keep = 1 - momentum
    weight = used * momentum * keep**later  # (T,)
    for running, batch in ((running_mean, stats.mean), (running_var, unbiased)):
        rows = running[lo:hi]  # (R, F), a view
        moved = torch.zeros_like(rows).index_add_(
            0, index, batch.to(rows.dtype) * weight.unsqueeze(1)
        )
        rows.copy_(rows * (keep**hits).unsqueeze(1) + moved)


class RunningAverage:
    """Equal-weight averages of the batch statistics that reach one recurrent batch norm's
    running statistics ``(S, F)``, per row: step ``t`` of a call from ``start`` counts for row
    ``min(start + t, S - 1)`` if it had at least two valid samples (the steps that would have
    moved the row), with the unbiased variance. Sums in float64."""

    def __init__(self, running_mean: Tensor):
        kw = {"dtype": torch.float64, "device": running_mean.device}
        self.mean = torch.zeros(running_mean.shape, **kw)
        self.var = torch.zeros(running_mean.shape, **kw)
        self.hits = torch.zeros(running_mean.shape[0], **kw)

    def add(self, stats: BatchStats, start: int = 0) -> None:
        slot = step_rows(start, stats.mean.shape[0], self.hits.shape[0], self.hits.device)
        unbiased, used = unbiased_var(stats)
        used = used.to(self.hits.device)  # the other steps' statistics may be NaN: never read
        self.hits.index_add_(0, slot, used.squeeze(1).double())
        self.mean.index_add_(0, slot, torch.where(used, stats.mean.double(), 0.0))
        self.var.index_add_(0, slot, torch.where(used, unbiased.double(), 0.0))

    def write(self, running_mean: Tensor, running_var: Tensor) -> None:
        """The averages into the running statistics; a row no step reached gets mean 0 and
        variance 1, as a reset batch norm has."""
        hit = (self.hits > 0).unsqueeze(1)
        hits = self.hits.clamp(min=1).unsqueeze(1)
        running_mean.copy_(torch.where(hit, self.mean / hits, 0.0))
        running_var.copy_(torch.where(hit, self.var / hits, 1.0))


_averages: dict[int, tuple[Tensor, RunningAverage]] | None = None
"""While ``seqnorm.update_bn`` runs: the average that takes each running mean's (by id) batch
statistics instead of the running statistics moving."""


@contextlib.contextmanager
def averaging(running_means: list[Tensor]):
    """Within, the batch statistics that would move these running statistics (each given by its
    ``running_mean`` buffer) are averaged instead: yields ``{id(running_mean): RunningAverage}``.
    For ``seqnorm.update_bn``."""
    global _averages
    if _averages is not None:
        raise RuntimeError("seqnorm.update_bn is already running (it does not nest)")
    _averages = {id(r): (r, RunningAverage(r)) for r in running_means}
    try:
        yield {k: average for k, (_, average) in _averages.items()}
    finally:
        _averages = None


def _average_of(running_mean: Tensor) -> RunningAverage | None:
    """The average taking ``running_mean``'s statistics while ``seqnorm.update_bn`` runs."""
    if _averages is None:
        return None
    found = _averages.get(id(running_mean))
    return found[1] if found is not None and found[0] is running_mean else None


def _batched(t: Tensor) -> bool:
    """Whether ``t`` is batched by ``torch.func.vmap`` (below any other transform's wrappers)."""
    functorch = torch._C._functorch
    while functorch.is_functorch_wrapped_tensor(t):
        if functorch.is_batchedtensor(t):
            return True
        t = functorch.get_unwrapped(t)
    return False


def lstm_input(
    x: Tensor,
    weight_ih: Tensor,
    bias_ih: Tensor | None,
    bias_hh: Tensor | None,
    norm_ih: Norm | None,
) -> Tensor:
    """The input half of the LSTM gates, for all steps at once: ``Nx(x W_ih^T) + b_ih + b_hh``.

    Args:
        x: ``(T, N, H_in)`` or ``(N, H_in)``.

    Returns:
        ``(T, N, 4H)`` or ``(N, 4H)``.
    """
    bias = None if bias_ih is None else bias_ih + bias_hh
    if norm_ih is None:
        return F.linear(x, weight_ih, bias)  # (..., 4H)
    gx = norm_ih(F.linear(x, weight_ih))
    return gx if bias is None else gx + bias


def lstm_step(
    gx: Tensor,
    h: Tensor,
    c: Tensor,
    weight_hh: Tensor,
    norm_hh: Norm | None,
    norm_c: Norm | None,
    weight_hr: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step given the input half of its gates (Ba et al., 2016, eqs. 20-22).

    ``gates = gx + Nh(h W_hh^T)``, split as ``i, f, g, o`` (torch's order);
    ``c' = sig(f) * c + sig(i) * tanh(g)``; ``h' = sig(o) * tanh(Nc(c'))``, projected to
    ``h' W_hr^T`` when the LSTM has projections (``proj_size`` P > 0). The carried ``c'`` is not
    normalized.

    Args:
        gx: ``(N, 4H)`` from :func:`lstm_input`.
        h: ``(N, H)``, or ``(N, P)`` with projections; c: ``(N, H)``.
        weight_hr: ``(P, H)`` or None.

    Returns:
        ``(h', c')``.
    """
    gh = F.linear(h, weight_hh)  # (N, 4H)
    gates = gx + (gh if norm_hh is None else norm_hh(gh))
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c if norm_c is None else norm_c(c))  # (N, H)
    if weight_hr is not None:
        h = F.linear(h, weight_hr)  # (N, P)
    return h, c


def gru_input(x: Tensor, weight_ih: Tensor, bias_ih: Tensor | None, norm_ih: Norm | None) -> Tensor:
    """The input half of the GRU, for all steps at once: ``gx = Nx(x W_ih^T) + b_ih``.

    Args:
        x: ``(T, N, H_in)`` or ``(N, H_in)``.

    Returns:
        ``(T, N, 3H)`` or ``(N, 3H)``.
    """
    if norm_ih is None:
        return F.linear(x, weight_ih, bias_ih)  # (..., 3H)
    gx = norm_ih(F.linear(x, weight_ih))
    return gx if bias_ih is None else gx + bias_ih


def gru_step(
    gx: Tensor, h: Tensor, weight_hh: Tensor, bias_hh: Tensor | None, norm_hh: Norm | None
) -> Tensor:
    """One GRU step given its input half.

    ``gh = Nh(h W_hh^T) + b_hh``, both halves split as ``r, z, n`` (torch's order);
    ``r = sig(gx_r + gh_r)``, ``z = sig(gx_z + gh_z)``, ``n = tanh(gx_n + r * gh_n)``,
    ``h' = (1 - z) * n + z * h``.

    Args:
        gx: ``(N, 3H)`` from :func:`gru_input`.
        h: ``(N, H)``.

    Returns:
        ``h'``, ``(N, H)``.
    """
    gh = F.linear(h, weight_hh)  # (N, 3H)
    if norm_hh is not None:
        gh = norm_hh(gh)
    if bias_hh is not None:
        gh = gh + bias_hh
    xr, xz, xn = gx.chunk(3, dim=1)
    hr, hz, hn = gh.chunk(3, dim=1)
    r = torch.sigmoid(xr + hr)
    z = torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return (1 - z) * n + z * h
