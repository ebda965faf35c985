"""The math of seqnorm, written once.

Normalizations (DESIGN.md §1) and the LSTM/GRU step equations (§2). Modules in ``norms``,
``cells`` and ``rnn`` own the parameters and call these functions.

Every normalization computes ``x_hat = (x - mean) / sqrt(var + eps)`` with the biased variance,
then ``y = gamma * x_hat + beta``. Statistics are taken in at least float32, so that half and
bfloat16 inputs (autocast) are normalized in float32, as ``torch.nn.functional.layer_norm`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Norm = Callable[[Tensor], Tensor]
"""A normalization already bound to its parameters (and, for batch norm, to its time step)."""


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


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
        ``(N, C, *)``, in float32 when ``x`` is half or bfloat16.

    Example:
        >>> x = torch.randn(2, 4, 3)
        >>> torch.allclose(group_norm(x, 4), torch.nn.functional.instance_norm(x), atol=1e-6)
        True
    """
    xs = x.to(_stats_dtype(x))
    cast = lambda p: None if p is None else p.to(xs.dtype)
    if x.dim() == 2:  # the same statistics; ATen's layer norm is the faster kernel
        if groups == 1:
            return F.layer_norm(xs, xs.shape[1:], cast(weight), cast(bias), eps)
        x_hat = F.layer_norm(xs.reshape(x.shape[0], groups, -1), (x.shape[1] // groups,), eps=eps)
        return _affine(x_hat.reshape(x.shape), weight, bias, channel_dim=1)
    return F.group_norm(xs, groups, cast(weight), cast(bias), eps)


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
        mean, var = running_mean, running_var
    shape = [1, -1] + [1] * (x.dim() - 2)
    x_hat = (xs - mean.reshape(shape)) * torch.rsqrt(var.reshape(shape) + eps)
    return _affine(x_hat, weight, bias, channel_dim=1)


def recurrent_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    mask: Tensor | None = None,
    start: int = 0,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Recurrent batch normalization (Cooijmans et al., 2016) with per-step statistics.

    Step ``t`` of ``x`` is time step ``start + t``. Its mean and biased variance are taken per
    feature over the samples valid at that step (``mask``), so padding never enters them; its
    running statistics live in row ``min(start + t, S - 1)`` of the ``(S, F)`` buffers. A step
    with fewer than two valid samples uses its running statistics. In eval mode every step uses
    its running statistics.

    Args:
        x: ``(T, N, F)``.
        running_mean, running_var: ``(S, F)``, updated in place in training.
        weight, bias: ``(F,)`` or None.
        mask: ``(T, N)`` bool, True where a sample is valid; None means all valid.
        all_reduce: sums a tensor over processes (in place or not, differentiably) to take the
            statistics over the global batch under data parallelism; None for local statistics.

    Returns:
        ``(T, N, F)``.
    """
    steps = running_mean.shape[0]
    slot = (torch.arange(x.shape[0], device=x.device) + start).clamp_(max=steps - 1)  # (T,)
    run_mean, run_var = running_mean[slot], running_var[slot]  # (T, F)
    xs = x.to(_stats_dtype(x))
    if mask is None and all_reduce is None:
        running = (running_mean, running_var, slot, momentum)
        return _batch_norm_all_valid(xs, run_mean, run_var, running, weight, bias, training, eps)
    if not training:
        mean, var = run_mean, run_var
    else:
        valid = torch.ones_like(xs[..., 0]) if mask is None else mask.to(xs.dtype)
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
        with torch.no_grad():
            unbiased = batch_var * count / (count - 1).clamp(min=1)
            _update_running(running_mean, batch_mean, use_batch, slot, momentum)
            _update_running(running_var, unbiased, use_batch, slot, momentum)
    x_hat = (xs - mean.unsqueeze(1)) * torch.rsqrt(var.unsqueeze(1) + eps)
    return _affine(x_hat, weight, bias, channel_dim=2)


def _batch_norm_all_valid(xs, run_mean, run_var, running, weight, bias, training, eps):
    """:func:`recurrent_batch_norm` without padding: one call of ATen's batch norm with a channel
    per (step, feature), which saves only its input for the backward."""
    steps, n, f = xs.shape
    use_batch = training and n >= 2
    if use_batch:
        with torch.no_grad():
            var, mean = torch.var_mean(xs, dim=1, correction=0)  # (T, F)
            running_mean, running_var, slot, momentum = running
            use = torch.ones(steps, 1, dtype=torch.bool, device=xs.device)
            _update_running(running_mean, mean, use, slot, momentum)
            _update_running(running_var, var * n / (n - 1), use, slot, momentum)
    channels = xs.permute(0, 2, 1).reshape(1, steps * f, n)  # statistics over the samples
    tile = lambda p: None if p is None else p.to(xs.dtype).repeat(steps)
    y = F.batch_norm(
        channels,
        None if use_batch else run_mean.reshape(-1),
        None if use_batch else run_var.reshape(-1),
        tile(weight),
        tile(bias),
        training=use_batch,
        eps=eps,
    )
    return y.reshape(steps, f, n).permute(0, 2, 1)


def _update_running(running: Tensor, batch: Tensor, use: Tensor, slot: Tensor, momentum: float):
    """Move rows ``slot`` of ``running`` towards ``batch`` where ``use``, as if step by step.

    Steps past the last row share it; each moves it in turn, so a whole sequence updates the
    statistics exactly as one call per step would: a step followed by ``k`` later updates of the
    same row keeps weight ``momentum * (1 - momentum) ** k``. Only the touched range of rows is
    read and written, so a one-step call costs O(F), not O(S F).
    """
    lo = int(slot[0])
    rows = running[lo : int(slot[-1]) + 1]  # (R, F), a view
    index = slot - lo
    used = use.squeeze(1).to(rows.dtype)  # (T,)
    hits = rows.new_zeros(rows.shape[0]).index_add_(0, index, used)  # (R,)
    # Slots never decrease along the steps, so the updates after step t that hit its row are
    # the row's hits minus those up to and including t.
    upto = torch.cumsum(used, 0) - torch.cumsum(hits, 0)[index] + hits[index]  # (T,)
    later = hits[index] - upto
    keep = 1 - momentum
    weight = used * momentum * keep**later  # (T,)
    moved = torch.zeros_like(rows).index_add_(0, index, batch.to(rows.dtype) * weight.unsqueeze(1))
    rows.copy_(rows * (keep**hits).unsqueeze(1) + moved)


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
    return gx if bias is None else gx.add_(bias)  # in place: gx is the norm's own new tensor


def lstm_step(
    gx: Tensor, h: Tensor, c: Tensor, weight_hh: Tensor, norm_hh: Norm | None, norm_c: Norm | None
) -> tuple[Tensor, Tensor]:
    """One LSTM step given the input half of its gates (Ba et al., 2016, eqs. 20-22).

    ``gates = gx + Nh(h W_hh^T)``, split as ``i, f, g, o`` (torch's order);
    ``c' = sig(f) * c + sig(i) * tanh(g)``; ``h' = sig(o) * tanh(Nc(c'))``.
    The carried ``c'`` is not normalized.

    Args:
        gx: ``(N, 4H)`` from :func:`lstm_input`.
        h, c: ``(N, H)``.

    Returns:
        ``(h', c')``, each ``(N, H)``.
    """
    gh = F.linear(h, weight_hh)  # (N, 4H)
    gates = gx + (gh if norm_hh is None else norm_hh(gh))
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c if norm_c is None else norm_c(c))
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
    return gx if bias_ih is None else gx.add_(bias_ih)  # in place: gx is the norm's new tensor


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
