"""Normalized LSTM and GRU cells with the ``torch.nn.LSTMCell``/``GRUCell`` contract."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from . import functional as SF
from .checks import (
    NORMS,
    ShapeError,
    check_cell_args,
    check_device,
    check_dtype,
    check_state_dtype,
)
from .norms import at_step, step_norm, uses_batch_statistics


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
    proj_size: int = 0,
) -> list[str]:
    """Register one cell's weights under torch's names, and its norms beside them.

    ``weight_ih{suffix}`` ``(gates*H, H_in)``, ``weight_hh{suffix}`` ``(gates*H, P)``,
    ``bias_ih{suffix}``/``bias_hh{suffix}`` ``(gates*H,)`` and, with ``proj_size`` P > 0,
    ``weight_hr{suffix}`` ``(P, H)``; ``norm_ih{suffix}`` and ``norm_hh{suffix}`` (gain only, the
    biases shift) and, if ``cell_norm``, ``norm_c{suffix}`` on the cell state (gain and shift).
    With ``norm="none"`` the norms are None. Returns the weights' names in torch's order.
    """
    features = gates * hidden_size

    def param(*shape):
        return nn.Parameter(torch.empty(*shape, **factory))

    names = [f"weight_ih{suffix}", f"weight_hh{suffix}"]
    setattr(module, names[0], param(features, input_size))
    setattr(module, names[1], param(features, proj_size or hidden_size))
    for name in (f"bias_ih{suffix}", f"bias_hh{suffix}"):
        setattr(module, name, param(features) if bias else None)
        if bias:
            names.append(name)
    if proj_size:
        names.append(f"weight_hr{suffix}")
        setattr(module, names[-1], param(proj_size, hidden_size))
    kw = {"eps": eps, "max_steps": max_steps, **factory}
    setattr(module, f"norm_ih{suffix}", step_norm(norm, features, groups, bias=False, **kw))
    setattr(module, f"norm_hh{suffix}", step_norm(norm, features, groups, bias=False, **kw))
    if cell_norm:
        setattr(module, f"norm_c{suffix}", step_norm(norm, hidden_size, groups, bias=True, **kw))
    return names


def reset_cell_parameters(module: nn.Module, hidden_size: int) -> None:
    """torch's initialization for weights and biases (uniform in +-1/sqrt(H)); norms their own."""
    bound = 1 / math.sqrt(hidden_size) if hidden_size > 0 else 0
    for name, p in module.named_parameters(recurse=False):
        if name.startswith(("weight_", "bias_")):
            nn.init.uniform_(p, -bound, bound)
    for child in module.children():
        if hasattr(child, "reset_parameters"):
            child.reset_parameters()


class NormRecord:
    """Records in the state dict what changes the computation but not the parameters' shapes
    (``norm``, ``groups``, ``eps``), and refuses a state dict recorded otherwise.

    The record is a small float64 tensor ``[index of norm in NORMS, groups, eps]``, so that the
    state dict holds tensors only (safetensors, ``torch.jit`` and ONNX tooling assume so). A state
    dict without it (``torch.nn``'s, or one saved before seqnorm kept it) loads as before: its
    keys decide.
    """

    norm: str
    groups: int
    eps: float

    def get_extra_state(self) -> Tensor:
        return torch.tensor([NORMS.index(self.norm), self.groups, self.eps], dtype=torch.float64)

    def set_extra_state(self, state) -> None:
        if not isinstance(state, Tensor) or state.shape != (3,):
            raise RuntimeError(
                f"Expected the state dict's `_extra_state` of {type(self).__name__} to be a "
                f"record of (norm, groups, eps), got {state!r}"
            )
        code, groups, eps = state.tolist()
        theirs = {"norm": NORMS[int(code)], "groups": int(groups), "eps": eps}
        mine = {"norm": self.norm, "groups": self.groups, "eps": self.eps}
        if self.norm == "none" and theirs["norm"] == "none":
            mine.pop("eps"), theirs.pop("eps")  # eps does nothing without a norm
        if mine != theirs:
            describe = lambda d: ", ".join(f"{k}={v!r}" for k, v in d.items())
            raise RuntimeError(
                f"Expected a state dict of a {type(self).__name__} with {describe(mine)}, got one "
                f"saved with {describe(theirs)}: its parameters fit, but it computes something "
                f"else. Build the model with {describe(theirs)} to load it"
            )

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors
    ):
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing, unexpected, errors
        )
        if prefix + "_extra_state" in missing:
            missing.remove(prefix + "_extra_state")  # no record to check: the keys decide


def refuse_script(module: nn.Module):
    """``__prepare_scriptable__`` of the cells and layers: ``torch.jit.script`` cannot compile
    their Python (norm dispatch, the operator's glue), so it gets a clear error instead of one
    from deep inside."""
    raise RuntimeError(
        f"seqnorm.{type(module).__name__} cannot be compiled by torch.jit.script (TorchScript "
        "compiles a subset of Python that seqnorm's layers do not keep to). Use torch.jit.trace, "
        "torch.export.export or torch.compile: each runs seqnorm's operator at every length"
    )


class _CellBase(NormRecord, nn.Module):
    _gates: int
    _cell_norm: bool
    __prepare_scriptable__ = refuse_script

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
        check_cell_args(input_size, hidden_size, bias, norm, groups, eps, max_steps, layer=False)
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
        name = type(self).__name__
        if input.dim() not in (1, 2):
            raise ValueError(f"{name}: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if input.shape[-1] != self.input_size:
            raise ShapeError(
                f"input has inconsistent input_size: got {input.shape[-1]} expected "
                f"{self.input_size} (argument `input` of {name}({self.input_size}, "
                f"{self.hidden_size}) must be (N, {self.input_size}) or ({self.input_size},))"
            )
        check_device(input, self.weight_ih, "input")
        check_dtype(input, self.weight_ih, name)
        batched = input.dim() == 2
        x = input if batched else input.unsqueeze(0)
        if self.norm == "batch" and x.shape[0] < 2 and uses_batch_statistics(self):
            raise ValueError(
                f"Expected a batch of more than one sample for norm='batch' in training, got "
                f"input of shape {tuple(input.shape)}. Use norm='layer' or 'group', or .eval()"
            )
        return x, batched

    def _check_state(self, state, index: int, name: str, n: int, torch_name: str) -> Tensor:
        """A state ``(N, H)`` (``(H,)`` for unbatched input), checked as torch checks it
        (``torch_name``: what torch's messages call it)."""
        if not isinstance(state, Tensor):
            raise TypeError(
                f"Expected argument `{name}` to be a Tensor, got {type(state).__name__}"
            )
        if state.dim() not in (1, 2):
            raise ValueError(
                f"Expected {torch_name} to be 1D or 2D, got {state.dim()}D instead (argument "
                f"`{name}` of shape {tuple(state.shape)})"
            )
        check_device(state, self.weight_hh, name)
        check_state_dtype(state, self.weight_hh, name)
        state = state if state.dim() == 2 else state.unsqueeze(0)
        if state.shape[0] != n:
            raise ShapeError(
                f"Input batch size {n} doesn't match hidden{index} batch size {state.shape[0]} "
                f"(argument `{name}`)"
            )
        if state.shape[1] != self.hidden_size:
            raise ShapeError(
                f"hidden{index} has inconsistent hidden_size: got {state.shape[1]}, expected "
                f"{self.hidden_size} (argument `{name}`)"
            )
        return state


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
            h = c = x.new_zeros(n, self.hidden_size, dtype=self.weight_hh.dtype)
        else:
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(
                    f"Expected argument `hx` to be a tuple (h, c), got {type(hx).__name__}"
                )
            h = self._check_state(hx[0], 0, "hx[0]", n, "hx[0]")
            c = self._check_state(hx[1], 1, "hx[1]", n, "hx[1]")
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
        if hx is None:
            h = x.new_zeros(n, self.hidden_size, dtype=self.weight_hh.dtype)
        else:
            h = self._check_state(hx, 0, "hx", n, "hidden")
        gx = SF.gru_input(x, self.weight_ih, self.bias_ih, at_step(self.norm_ih, step, None))
        h = SF.gru_step(gx, h, self.weight_hh, self.bias_hh, at_step(self.norm_hh, step, None))
        return h if batched else h.squeeze(0)
