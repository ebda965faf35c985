"""The four normalizations as modules, and their per-step forms for recurrent cells.

``BatchNorm``, ``LayerNorm``, ``InstanceNorm`` and ``GroupNorm`` work on ``(N, C, *)`` tensors
with a per-channel gain and shift (DESIGN.md §1). Inside a cell the vector at one time step is
``(N, F)``: ``RecurrentGroupNorm`` (layer norm for one group) normalizes each sample on its own,
``RecurrentBatchNorm`` each feature over the batch with statistics kept per time step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from . import functional as SF
from .checks import check_groups, check_int, check_momentum, check_step


class _ChannelNorm(nn.Module):
    """Shared parameters of the ``(N, C, *)`` normalizations: a per-channel gain and shift."""

    def __init__(self, num_channels: int, eps: float, affine: bool, bias: bool, device, dtype):
        super().__init__()
        check_int(num_channels, "num_channels", 0)
        if not eps > 0:
            raise ValueError(f"Expected argument `eps` to be positive, got {eps!r}")
        self.num_channels, self.eps = num_channels, eps
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_channels, **kw)) if affine else None
        self.bias = nn.Parameter(torch.empty(num_channels, **kw)) if affine and bias else None
        self.gain_init = 1.0

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.constant_(self.weight, self.gain_init)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _check(self, x: Tensor) -> None:
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise ValueError(
                f"Expected input of shape (N, {self.num_channels}, *), got {tuple(x.shape)}"
            )

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}, affine={self.weight is not None}"


class GroupNorm(_ChannelNorm):
    """Group normalization over ``(N, C, *)``: one mean and variance per sample and group.

    Wu & He, "Group Normalization", 2018. ``num_groups=1`` is layer norm and
    ``num_groups=num_channels`` is instance norm.

    Args:
        num_groups: G, which must divide ``num_channels``.
        num_channels: C.
        eps: added to the variance.
        affine: learn a per-channel gain (initialized to 1) and shift (to 0).
        bias: with ``affine``, also learn the shift.

    Example:
        >>> norm = GroupNorm(2, 4)
        >>> norm(torch.randn(3, 4, 5)).shape
        torch.Size([3, 4, 5])
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(num_channels, eps, affine, bias, device, dtype)
        check_groups(num_groups, num_channels, "num_channels")
        self.num_groups = num_groups
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        return SF.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {super().extra_repr()}"


class LayerNorm(GroupNorm):
    """Layer normalization over ``(N, C, *)``: one mean and variance per sample (Ba et al., 2016).

    Unlike ``torch.nn.LayerNorm`` the gain and shift are per channel, as for the other three.

    Example:
        >>> LayerNorm(4)(torch.randn(3, 4)).shape
        torch.Size([3, 4])
    """

    def __init__(
        self, num_channels: int, eps=1e-5, affine=True, bias=True, device=None, dtype=None
    ):
        super().__init__(1, num_channels, eps, affine, bias, device, dtype)

    def extra_repr(self) -> str:
        return _ChannelNorm.extra_repr(self)


class InstanceNorm(GroupNorm):
    """Instance normalization over ``(N, C, *)``: one mean and variance per sample and channel.

    Ulyanov et al., 2016. Needs at least one ``*`` axis: over ``(N, C)`` alone every output would
    be 0.

    Example:
        >>> InstanceNorm(4)(torch.randn(3, 4, 10)).shape
        torch.Size([3, 4, 10])
    """

    def __init__(
        self, num_channels: int, eps=1e-5, affine=True, bias=True, device=None, dtype=None
    ):
        super().__init__(num_channels, num_channels, eps, affine, bias, device, dtype)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 3:
            raise ValueError(
                f"Expected input of shape (N, C, L, ...) for instance norm, got {tuple(x.shape)}: "
                "without a spatial or time axis each statistic covers a single number"
            )
        return super().forward(x)

    def extra_repr(self) -> str:
        return _ChannelNorm.extra_repr(self)


class BatchNorm(_ChannelNorm):
    """Batch normalization over ``(N, C, *)``: one mean and variance per channel.

    Ioffe & Szegedy, 2015. Running statistics as in ``torch.nn.BatchNorm1d``.

    Example:
        >>> BatchNorm(4)(torch.randn(8, 4, 5)).shape
        torch.Size([8, 4, 5])
    """

    def __init__(
        self,
        num_channels: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        bias: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
    ):
        super().__init__(num_channels, eps, affine, bias, device, dtype)
        check_momentum(momentum)
        self.momentum = momentum
        kw = {"device": device, "dtype": dtype}
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_channels, **kw))
            self.register_buffer("running_var", torch.ones(num_channels, **kw))
        else:
            self.running_mean = self.running_var = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.running_mean is not None:
            self.running_mean.zero_()
            self.running_var.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        if self.training and x.numel() // self.num_channels < 2:
            raise ValueError(
                f"Expected more than one value per channel in training, got input {tuple(x.shape)}"
            )
        return SF.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training,
            self.momentum,
            self.eps,
        )


class RecurrentGroupNorm(GroupNorm):
    """Layer or group normalization of the features at each step of a recurrent cell.

    Normalizes the last axis: input ``(*, F)``, each leading index a separate sample, so it works
    at batch size 1 and never mixes samples or steps. The ``step`` and ``mask`` arguments of
    :class:`RecurrentBatchNorm` are accepted and need nothing here.

    Example:
        >>> RecurrentGroupNorm(4, 8)(torch.randn(5, 3, 8)).shape
        torch.Size([5, 3, 8])
    """

    def forward(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        if x.dim() < 1 or x.shape[-1] != self.num_channels:
            raise ValueError(
                f"Expected input of shape (*, {self.num_channels}), got {tuple(x.shape)}"
            )
        rows = x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)
        y = SF.group_norm(rows, self.num_groups, self.weight, self.bias, self.eps)
        return y.reshape(x.shape)


class RecurrentBatchNorm(_ChannelNorm):
    """Batch normalization with separate statistics for each time step (Cooijmans et al., 2016).

    Input ``(T, N, F)`` holds steps ``step, ..., step + T - 1`` (or ``(N, F)``, one step). In
    training each step is normalized with the mean and variance over its valid samples; each of
    the first ``max_steps`` steps keeps its own running statistics, later steps share the last.
    A step with fewer than two valid samples uses its running statistics; eval mode uses them
    always. Gains start at 0.1, as the paper recommends.

    Args:
        num_features: F.
        max_steps: how many steps keep their own running statistics.
        momentum: as in ``torch.nn.BatchNorm1d``.
        bias: learn a shift (the cells' input and recurrent projections rely on the RNN biases).
        sync: under an initialized ``torch.distributed`` process group, take the statistics over
            the global batch (like ``torch.nn.SyncBatchNorm``).

    Example:
        >>> bn = RecurrentBatchNorm(8, max_steps=100)
        >>> bn(torch.randn(20, 4, 8)).shape
        torch.Size([20, 4, 8])
    """

    def __init__(
        self,
        num_features: int,
        max_steps: int = 1000,
        eps: float = 1e-5,
        momentum: float = 0.1,
        bias: bool = True,
        sync: bool = False,
        device=None,
        dtype=None,
    ):
        super().__init__(num_features, eps, True, bias, device, dtype)
        check_int(max_steps, "max_steps")
        check_momentum(momentum)
        self.max_steps, self.momentum, self.sync = max_steps, momentum, sync
        self.gain_init = 0.1
        kw = {"device": device, "dtype": dtype}
        self.register_buffer("running_mean", torch.zeros(max_steps, num_features, **kw))
        self.register_buffer("running_var", torch.ones(max_steps, num_features, **kw))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        super().reset_parameters()
        self.running_mean.zero_()
        self.running_var.fill_(1)

    def forward(self, x: Tensor, step: int = 0, mask: Tensor | None = None) -> Tensor:
        check_step(step)
        if x.dim() not in (2, 3) or x.shape[-1] != self.num_channels:
            raise ValueError(
                f"Expected input of shape (T, N, {self.num_channels}) or (N, {self.num_channels}),"
                f" got {tuple(x.shape)}"
            )
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1]):
            raise ValueError(
                f"Expected argument `mask` to be a bool tensor of shape {tuple(x.shape[:-1])}, "
                f"True where a sample is valid, got dtype {mask.dtype} and shape "
                f"{tuple(mask.shape)}"
            )
        one_step = x.dim() == 2
        if one_step:
            x = x.unsqueeze(0)
            mask = None if mask is None else mask.unsqueeze(0)
        if self.training and x.shape[1] < 2 and not self.synchronized:
            raise ValueError(
                "Expected a batch of more than one sample for batch norm in training, got batch "
                f"size {x.shape[1]}: there are no batch statistics. Use norm='layer' or "
                "norm='group', or call .eval() to use the running statistics"
            )
        y, stats = SF.recurrent_batch_norm(
            x,
            SF.running_rows(self.running_mean, step, x.shape[0]),
            SF.running_rows(self.running_var, step, x.shape[0]),
            self.weight,
            self.bias,
            mask=mask,
            training=self.training,
            eps=self.eps,
            all_reduce=all_reduce_sum if self.synchronized else None,
        )
        if stats is not None:
            self.update_running(stats, step)
        return y.squeeze(0) if one_step else y

    def update_running(self, stats: SF.BatchStats, step: int = 0) -> None:
        """Move the running statistics of steps ``step, step + 1, ...`` towards ``stats``."""
        SF.update_running(self.running_mean, self.running_var, stats, step, self.momentum)

    @property
    def synchronized(self) -> bool:
        """Whether the statistics are taken over every process (``sync`` under an initialized
        ``torch.distributed`` process group, in training)."""
        dist = torch.distributed
        return self.sync and self.training and dist.is_available() and dist.is_initialized()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, max_steps={self.max_steps}, sync={self.sync}"


@torch.no_grad()
def update_bn(
    loader: Iterable,
    model: nn.Module,
    device: torch.device | str | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> None:
    """Recompute the running statistics of every batch norm in ``model`` from one pass over
    ``loader``, as ``torch.optim.swa_utils.update_bn`` does for torch's (which skips seqnorm's):
    after averaging weights (SWA), or whenever the running statistics no longer fit the weights.

    Each running statistic becomes the equal-weight average of the batch statistics that reach
    it in the pass: per step for :class:`RecurrentBatchNorm` (in layers and cells; a step with
    fewer than two valid samples counts for nothing, steps past ``max_steps`` all count for the
    last row, and a row no step reached gets mean 0 and variance 1), per call for
    :class:`BatchNorm` and torch's batch norms (``momentum=None``). The model runs in training
    mode without gradients; each module gets its mode back, and momenta are unchanged after.

    Args:
        loader: batches; as in torch's, the input is a batch's first element if it is a list or
            tuple, else the batch.
        model: the model (a ``torch.compile``'d one is run through its original module).
        device: where each input goes first (None: where it is).
        forward: ``forward(model, batch)`` runs the model on a batch instead (for inputs with
            ``lengths``, for example); then ``device`` is not used.

    Example:
        >>> model = nn.Sequential(nn.Linear(3, 3), BatchNorm(3))
        >>> update_bn([torch.randn(4, 3) for _ in range(2)], model)
    """
    model = getattr(model, "_orig_mod", model)
    recurrent = [m for m in model.modules() if isinstance(m, RecurrentBatchNorm)]
    per_call = [
        m for m in model.modules() if isinstance(m, BatchNorm) and m.running_mean is not None
    ]
    torch_bn = [
        m
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    if not (recurrent or per_call or torch_bn):
        return
    momenta = {m: m.momentum for m in per_call + torch_bn}
    calls = dict.fromkeys(per_call, 0)

    def cumulative(module, args):  # the k-th call moves the statistics by 1/k: their mean
        calls[module] += 1
        module.momentum = 1.0 / calls[module]

    for m in recurrent + per_call:  # as reset (steps with one valid sample normalize with them)
        m.running_mean.zero_()
        m.running_var.fill_(1)
    for m in torch_bn:
        m.reset_running_stats()
        m.momentum = None
    hooks = [m.register_forward_pre_hook(cumulative) for m in per_call]
    modes = {m: m.training for m in model.modules()}  # each module's, frozen parts included
    model.train()
    try:
        with SF.averaging([m.running_mean for m in recurrent]) as averages:
            for batch in loader:
                if forward is not None:
                    forward(model, batch)
                    continue
                x = batch[0] if isinstance(batch, (list, tuple)) else batch
                model(x if device is None else x.to(device))
    finally:
        for hook in hooks:
            hook.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training
    for m in recurrent:
        averages[id(m.running_mean)].write(m.running_mean, m.running_var)


def all_reduce_sum(x: Tensor) -> Tensor:
    """``x`` summed over every process of the default group, differentiably."""
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(x)


def step_norm(
    norm: str,
    features: int,
    groups: int,
    *,
    bias: bool,
    eps: float,
    max_steps: int,
    sync: bool = False,
    device=None,
    dtype=None,
) -> nn.Module | None:
    """The normalization of ``features`` per step that a cell with ``norm`` applies (None: none)."""
    kw = {"eps": eps, "bias": bias, "device": device, "dtype": dtype}
    if norm == "none":
        return None
    if norm == "batch":
        return RecurrentBatchNorm(features, max_steps, sync=sync, **kw)
    return RecurrentGroupNorm(groups if norm == "group" else 1, features, **kw)


def uses_batch_statistics(module: nn.Module) -> bool:
    """Whether ``module`` holds a recurrent batch norm in training mode: batch norm takes the
    statistics of each batch by its own mode, as ``torch.nn.BatchNorm1d`` does inside a model
    (normally the layer's, which ``train()``/``eval()`` hand down)."""
    return any(m.training for m in module.modules() if isinstance(m, RecurrentBatchNorm))


def at_step(
    norm: nn.Module | None, step: int, mask: Tensor | None
) -> Callable[[Tensor], Tensor] | None:
    """``norm`` bound to a time step: only batch norm needs to know which step and samples."""
    if isinstance(norm, RecurrentBatchNorm):
        return lambda x: norm(x, step=step, mask=mask)
    return norm
