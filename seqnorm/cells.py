"""Normalized LSTM and GRU cells with the ``torch.nn.LSTMCell``/``GRUCell`` contract."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as SF
from .norms import at_step, check_groups, check_norm, check_positive_int, step_norm


def check_cell_args(input_size, hidden_size, norm, groups, eps, max_steps) -> None:
    """Validate the arguments every cell and layer shares, before anything is built."""
    check_positive_int(input_size, "input_size")
    check_positive_int(hidden_size, "hidden_size")
    check_norm(norm)
    check_groups(groups, hidden_size, "hidden_size")
    if groups != 1 and norm != "group":
        raise ValueError(
            f"Expected argument `groups` to be 1 unless norm='group', got groups={groups} with "
            f"norm={norm!r}"
        )
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"Expected argument `eps` to be a positive number, got {eps!r}")
    check_positive_int(max_steps, "max_steps")


def add_cell_parameters(
    module: nn.Module,
    suffix: str,
    input_size: int,
    hidden_size: int,
    gates: int,
    bias: bool,
    norm: str,
    groups: int,
    eps: float,
    max_steps: int,
    cell_norm: bool,
    factory: dict,
) -> None:
    """Register one cell's weights under torch's names, and its norms beside them.

    ``weight_ih{suffix}`` ``(gates*H, H_in)``, ``weight_hh{suffix}`` ``(gates*H, H)``,
    ``bias_ih{suffix}``/``bias_hh{suffix}`` ``(gates*H,)``; ``norm_ih{suffix}`` and
    ``norm_hh{suffix}`` (gain only, the biases shift) and, if ``cell_norm``, ``norm_c{suffix}``
    on the cell state (gain and shift). With ``norm="none"`` the norms are None.
    """
    features = gates * hidden_size

    def param(*shape):
        return nn.Parameter(torch.empty(*shape, **factory))

    setattr(module, f"weight_ih{suffix}", param(features, input_size))
    setattr(module, f"weight_hh{suffix}", param(features, hidden_size))
    setattr(module, f"bias_ih{suffix}", param(features) if bias else None)
    setattr(module, f"bias_hh{suffix}", param(features) if bias else None)
    kw = {"eps": eps, "max_steps": max_steps, **factory}
    setattr(module, f"norm_ih{suffix}", step_norm(norm, features, groups, bias=False, **kw))
    setattr(module, f"norm_hh{suffix}", step_norm(norm, features, groups, bias=False, **kw))
    if cell_norm:
        setattr(module, f"norm_c{suffix}", step_norm(norm, hidden_size, groups, bias=True, **kw))


def reset_cell_parameters(module: nn.Module, hidden_size: int) -> None:
    """torch's initialization for weights and biases (uniform in +-1/sqrt(H)); norms their own."""
    bound = 1 / math.sqrt(hidden_size)
    for name, p in module.named_parameters(recurse=False):
        if name.startswith(("weight_", "bias_")):
            nn.init.uniform_(p, -bound, bound)
    for child in module.children():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()


class _CellBase(nn.Module):
    _gates: int
    _cell_norm: bool

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        bias: bool = True,
        norm: str = "layer",
        groups: int = 1,
        eps: float = 1e-5,
        max_steps: int = 1000,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_cell_args(input_size, hidden_size, norm, groups, eps, max_steps)
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        self.norm, self.groups, self.eps, self.max_steps = norm, groups, eps, max_steps
        add_cell_parameters(
            self,
            "",
            input_size,
            hidden_size,
            self._gates,
            bias,
            norm,
            groups,
            eps,
            max_steps,
            self._cell_norm,
            {"device": device, "dtype": dtype},
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_cell_parameters(self, self.hidden_size)

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}, norm={self.norm!r}"
        if not self.bias:
            s += ", bias=False"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s

    def _check_input(self, input: Tensor) -> tuple[Tensor, bool]:
        """Return ``(N, H_in)`` input and whether it was batched."""
        if not isinstance(input, Tensor):
            raise TypeError(f"Expected argument `input` to be a Tensor, got {type(input).__name__}")
        if input.dim() not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"Expected argument `input` of shape (N, {self.input_size}) or "
                f"({self.input_size},), got {tuple(input.shape)}"
            )
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if self.norm == "batch" and self.training and x.shape[0] < 2:
            raise ValueError(
                f"Expected a batch of more than one sample for norm='batch' in training, got "
                f"input of shape {tuple(input.shape)}. Use norm='layer' or 'group', or .eval()"
            )
        return x, batched

    def _check_state(self, state: Tensor, name: str, n: int, batched: bool) -> Tensor:
        shape = (n, self.hidden_size) if batched else (self.hidden_size,)
        if not isinstance(state, Tensor) or tuple(state.shape) != shape:
            got = tuple(state.shape) if isinstance(state, Tensor) else type(state).__name__
            raise ValueError(f"Expected argument `{name}` of shape {shape}, got {got}")
        return state if batched else state.unsqueeze(0)


class LSTMCell(_CellBase):
    """An LSTM cell with layer, group or batch normalization.

    Layer norm: Ba et al., 2016 (eqs. 20-22); batch norm: Cooijmans et al., 2016.

    ``gates = Nx(x W_ih^T) + Nh(h W_hh^T) + b_ih + b_hh``; ``c' = sig(f) c + sig(i) tanh(g)``;
    ``h' = sig(o) tanh(Nc(c'))``. Arguments and parameter names are those of
    ``torch.nn.LSTMCell`` plus ``norm`` (``"none"``, ``"layer"``, ``"group"``, ``"batch"``),
    ``groups``, ``eps`` and ``max_steps`` (steps with their own batch-norm statistics).

    Shapes: input ``(N, H_in)`` or ``(H_in,)``; ``hx = (h, c)``, each ``(N, H)`` or ``(H,)``.
    ``step`` is the time step, used by ``norm="batch"`` to pick its statistics.

    Example:
        >>> cell = LSTMCell(10, 20)
        >>> h, c = cell(torch.randn(3, 10))
        >>> h, c = cell(torch.randn(3, 10), (h, c))
        >>> h.shape
        torch.Size([3, 20])
    """

    _gates, _cell_norm = 4, True

    def forward(
        self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None, *, step: int = 0
    ) -> tuple[Tensor, Tensor]:
        x, batched = self._check_input(input)
        n = x.shape[0]
        if hx is None:
            h = c = x.new_zeros(n, self.hidden_size)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(
                    f"Expected argument `hx` to be a tuple (h, c), got {type(hx).__name__}"
                )
            h = self._check_state(hx[0], "hx[0]", n, batched)
            c = self._check_state(hx[1], "hx[1]", n, batched)
        gx = SF.lstm_input(
            x, self.weight_ih, self.bias_ih, self.bias_hh, at_step(self.norm_ih, step, None)
        )
        h, c = SF.lstm_step(
            gx,
            h,
            c,
            self.weight_hh,
            at_step(self.norm_hh, step, None),
            at_step(self.norm_c, step, None),
        )
        return (h, c) if batched else (h.squeeze(0), c.squeeze(0))


class GRUCell(_CellBase):
    """A GRU cell with layer, group or batch normalization of its input and recurrent projections.

    ``gx = Nx(x W_ih^T) + b_ih``, ``gh = Nh(h W_hh^T) + b_hh``; ``r = sig(gx_r + gh_r)``,
    ``z = sig(gx_z + gh_z)``, ``n = tanh(gx_n + r gh_n)``, ``h' = (1 - z) n + z h``. Arguments
    and parameter names are those of ``torch.nn.GRUCell`` plus ``norm``, ``groups``, ``eps`` and
    ``max_steps``, as for :class:`LSTMCell`.

    Example:
        >>> cell = GRUCell(10, 20, norm="group", groups=4)
        >>> cell(torch.randn(3, 10)).shape
        torch.Size([3, 20])
    """

    _gates, _cell_norm = 3, False

    def forward(self, input: Tensor, hx: Tensor | None = None, *, step: int = 0) -> Tensor:
        x, batched = self._check_input(input)
        n = x.shape[0]
        h = (
            x.new_zeros(n, self.hidden_size)
            if hx is None
            else self._check_state(hx, "hx", n, batched)
        )
        gx = SF.gru_input(x, self.weight_ih, self.bias_ih, at_step(self.norm_ih, step, None))
        h = SF.gru_step(gx, h, self.weight_hh, self.bias_hh, at_step(self.norm_hh, step, None))
        return h if batched else h.squeeze(0)
