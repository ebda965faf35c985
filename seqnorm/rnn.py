"""Multi-layer, bidirectional normalized LSTM and GRU with the ``torch.nn.LSTM``/``GRU`` contract.

Each direction of each layer is one call of the recurrence operator (:mod:`seqnorm.ops`): the
input projection and its normalization for all steps at once, then the time loop. Padding
(``lengths`` or a ``PackedSequence``) is a mask: a padded step leaves the state as it was,
outputs zeros and never enters batch statistics. The reverse direction reads each sample
backwards from its own last valid step.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import ops
from .cells import NormRecord, add_cell_parameters, refuse_script, reset_cell_parameters
from .checks import (
    ShapeError,
    check_bool,
    check_cell_args,
    check_device,
    check_dropout,
    check_dtype,
    check_int,
    check_lengths,
    check_proj_size,
    check_state_dtype,
)
from .norms import RecurrentBatchNorm, all_reduce_sum, uses_batch_statistics

State = tuple[Tensor, ...]


class _RNNBase(NormRecord, nn.Module):
    _gates: int
    _cell_norm: bool
    _num_states: int
    __prepare_scriptable__ = refuse_script
    backend: str | None = None
    """Which implementation runs the recurrence (``"auto"``, ``"cpp"``, ``"triton"``,
    ``"python"``; see :mod:`seqnorm.ops.backend`); None follows ``SEQNORM_BACKEND``. Set it on an
    instance, e.g. ``rnn.backend = "python"`` for the readable per-step loop."""

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        norm: str = "layer",
        groups: int = 1,
        eps: float = 1e-5,
        max_steps: int = 1000,
        device=None,
        dtype=None,
    ):
        super().__init__()
        check_cell_args(input_size, hidden_size, bias, norm, groups, eps, max_steps, layer=True)
        check_int(num_layers, "num_layers")
        check_bool(batch_first, "batch_first")
        check_bool(bidirectional, "bidirectional")
        check_dropout(dropout)
        check_proj_size(proj_size, hidden_size)
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero "
                f"dropout expects num_layers greater than 1, but got dropout={dropout} and "
                f"num_layers={num_layers}",
                stacklevel=3,
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.norm, self.groups, self.eps, self.max_steps = norm, groups, eps, max_steps
        directions = 2 if bidirectional else 1
        self._all_weights: list[list[str]] = []
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else (proj_size or hidden_size) * directions
            for suffix in self._suffixes(layer):
                names = add_cell_parameters(
                    self,
                    suffix,
                    layer_input,
                    hidden_size,
                    self._gates,
                    bias,
                    norm,
                    groups,
                    eps,
                    max_steps,
                    self._cell_norm,
                    {"device": device, "dtype": dtype},
                    proj_size,
                )
                self._all_weights.append(names)
        self._flat_weights_names = [name for names in self._all_weights for name in names]
        self.reset_parameters()

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: 2 if self.bidirectional else 1]

    @property
    def all_weights(self) -> list[list[Tensor]]:
        """torch's weights of each layer and direction (``weight_ih``, ``weight_hh``, the biases,
        ``weight_hr``), as in ``torch.nn.LSTM.all_weights``; the norms' parameters are not here."""
        return [[getattr(self, name) for name in names] for names in self._all_weights]

    @property
    def _flat_weights(self) -> list[Tensor | None]:
        """torch's weights in ``_flat_weights_names`` order, read afresh on every access, so that a
        parametrization (weight norm) or a pruning mask is always seen, as the forward sees it."""
        return [getattr(self, name, None) for name in self._flat_weights_names]

    def reset_parameters(self) -> None:
        reset_cell_parameters(self, self.hidden_size)

    def flatten_parameters(self) -> None:
        """Nothing to do: kept so that code written for ``torch.nn.LSTM`` runs unchanged."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        if self.proj_size:
            s += f", proj_size={self.proj_size}"
        if self.num_layers != 1:
            s += f", num_layers={self.num_layers}"
        if not self.bias:
            s += ", bias=False"
        if self.batch_first:
            s += ", batch_first=True"
        if self.dropout:
            s += f", dropout={self.dropout}"
        if self.bidirectional:
            s += ", bidirectional=True"
        s += f", norm={self.norm!r}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        return s

    def _direction(
        self, x: Tensor, mask: Tensor | None, state: State, suffix: str
    ) -> tuple[Tensor, State]:
        """Run one direction of one layer over ``x`` ``(T, N, H_in)``; return ``(T, N, H)`` and
        the final state."""
        raise NotImplementedError

    def _site(self, name: str) -> tuple[nn.Module | None, ops.Running | None]:
        """A norm module of a direction and, for batch norm, its running statistics."""
        norm = getattr(self, name, None)
        if isinstance(norm, RecurrentBatchNorm):
            return norm, ops.Running(norm.running_mean, norm.running_var, norm.momentum)
        return norm, None

    def _config(self) -> ops.NormConfig:
        training = uses_batch_statistics(self) if self.norm == "batch" else self.training
        return ops.NormConfig(self.norm, self.groups, self.eps, training)

    def _forward(self, input, hx, lengths) -> tuple[Tensor | PackedSequence, State]:
        x, lengths, batched, packed = self._check_input(input, lengths)
        steps, n = x.shape[:2]
        state = self._check_hx(hx, n, batched, x)
        if self.norm == "batch" and n < 2 and uses_batch_statistics(self):
            raise ValueError(
                f"Expected a batch of more than one sample for norm='batch' in training, got batch "
                f"size {n}: there are no batch statistics. Use norm='layer' or 'group', or .eval()"
            )
        mask = reverse = None
        if ops.backend.unrolled_export():
            x = ops.backend.pin_length(x)
        # A traced or compiled graph keeps the mask whatever the example's lengths were.
        graph = torch.jit.is_tracing() or torch.compiler.is_compiling()
        if lengths is not None and (graph or bool((lengths < steps).any())):
            t = torch.arange(steps, device=x.device).unsqueeze(1)  # (T, 1)
            lengths = lengths.to(x.device)
            mask = t < lengths  # (T, N)
            # Reverse each sample inside its own length; padded steps stay where they are.
            reverse = torch.where(mask, lengths - 1 - t, t)  # (T, N)

        finals: list[State] = []
        layer_input = x
        for layer in range(self.num_layers):
            outputs = []
            for d, suffix in enumerate(self._suffixes(layer)):
                first = tuple(s[len(finals)] for s in state)
                if d == 0:
                    out, last = self._direction(layer_input, mask, first, suffix)
                else:
                    out, last = self._direction(
                        _reversed(layer_input, reverse), mask, first, suffix
                    )
                    out = _reversed(out, reverse)
                outputs.append(out)
                finals.append(last)
            layer_input = torch.cat(outputs, dim=-1) if len(outputs) > 1 else outputs[0]
            if self.dropout and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)

        output = layer_input
        final = tuple(torch.stack(s) for s in zip(*finals))  # each (D * num_layers, N, H)
        if packed is not None:
            order = packed.sorted_indices
            out_sorted = output if order is None else output.index_select(1, order)
            lengths_sorted = lengths.cpu() if order is None else lengths.cpu()[order.cpu()]
            data = pack_padded_sequence(out_sorted, lengths_sorted).data
            output = PackedSequence(
                data, packed.batch_sizes, packed.sorted_indices, packed.unsorted_indices
            )
        elif not batched:
            output, final = output.squeeze(1), tuple(s.squeeze(1) for s in final)
        elif self.batch_first:
            output = output.transpose(0, 1)
        return output, final

    def _check_input(self, input, lengths):
        """Return ``(T, N, H_in)`` input, validated lengths or None, batched, the PackedSequence."""
        name = type(self).__name__
        if isinstance(input, PackedSequence):
            if lengths is not None:
                raise ValueError(
                    "Expected argument `lengths` to be None for a PackedSequence input, "
                    "which carries its own lengths"
                )
            x, lengths = pad_packed_sequence(input)
            self._check_features(x)
            return x, lengths, True, input
        if not isinstance(input, Tensor):
            raise TypeError(
                "Expected argument `input` to be a Tensor or PackedSequence, got "
                f"{type(input).__name__}"
            )
        if input.dim() not in (2, 3):
            layout = "(N, L, H_in)" if self.batch_first else "(L, N, H_in)"
            raise ValueError(
                f"{name}: Expected input to be 2D or 3D, got {input.dim()}D instead (argument "
                f"`input` must be 3-D {layout} or 2-D unbatched (L, H_in), got shape "
                f"{tuple(input.shape)})"
            )
        self._check_features(input)
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        if x.shape[0] == 0:
            raise ShapeError(
                f"Expected sequence length to be larger than 0 in RNN, got input of shape "
                f"{tuple(input.shape)}"
            )
        if lengths is not None:
            compiling = torch.compiler.is_compiling()
            lengths = check_lengths(lengths, x.shape[1], x.shape[0], values=not compiling)
        return x, lengths, batched, None

    def _check_features(self, x: Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise ShapeError(
                f"input.size(-1) must be equal to input_size. Expected {self.input_size}, got "
                f"{x.shape[-1]} (argument `input` of shape {tuple(x.shape)})"
            )
        check_device(x, self.weight_ih_l0, "input")
        check_dtype(x, self.weight_ih_l0)

    def _state_sizes(self) -> tuple[int, ...]:
        """The last axis of each state: h (proj_size or hidden_size), and c for the LSTM."""
        return ((self.proj_size or self.hidden_size), self.hidden_size)[: self._num_states]

    def _check_hx(self, hx, n: int, batched: bool, x: Tensor) -> State:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        sizes = self._state_sizes()
        if hx is None:
            return tuple(
                x.new_zeros(layers, n, size, dtype=self.weight_hh_l0.dtype) for size in sizes
            )
        lstm = self._num_states == 2
        if lstm and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(
                f"Expected argument `hx` to be a tuple (h_0, c_0), got {type(hx).__name__}"
            )
        parts = tuple(hx) if lstm else (hx,)
        for part, name in zip(parts, ("hx[0] (h_0)", "hx[1] (c_0)") if lstm else ("hx",)):
            if not isinstance(part, Tensor):
                raise TypeError(
                    f"Expected argument `{name}` to be a Tensor, got {type(part).__name__}"
                )
            check_device(part, self.weight_hh_l0, name)
            check_state_dtype(part, self.weight_hh_l0, name)
        dims = [p.dim() for p in parts]
        want = 3 if batched else 2
        if any(d != want for d in dims):
            kind = "batched 3-D" if batched else "unbatched 2-D"
            got = f"({dims[0]}-D, {dims[1]}-D) tensors" if lstm else f"{dims[0]}-D tensor"
            what = "hx and cx" if lstm else "hx"
            raise ShapeError(f"For {kind} input, {what} should also be {want}-D but got {got}")
        for i, (part, size) in enumerate(zip(parts, sizes)):
            shape = (layers, n, size) if batched else (layers, size)
            if tuple(part.shape) != shape:
                which = f"hidden[{i}]" if lstm else "hidden"
                raise ShapeError(
                    f"Expected {which} size {shape}, got {list(part.shape)} (argument `hx"
                    f"{f'[{i}]' if lstm else ''}` is (num_layers * num_directions, "
                    f"{'N, ' if batched else ''}{'proj_size or ' if i == 0 and lstm else ''}"
                    "hidden_size))"
                )
        return tuple(p if batched else p.unsqueeze(1) for p in parts)

    def _backend(self, x: Tensor, tensors, norms) -> str:
        synced = any(isinstance(m, RecurrentBatchNorm) and m.synchronized for m in norms)
        return ops.choose(
            self.backend, x, tensors, synced, self.hidden_size, self.norm, self.groups
        )

    @staticmethod
    def _all_reduce(norms):
        synced = any(isinstance(m, RecurrentBatchNorm) and m.synchronized for m in norms)
        return all_reduce_sum if synced else None


def _reversed(x: Tensor, reverse: Tensor | None) -> Tensor:
    """``x`` ``(T, N, F)`` with each sample's valid steps in reverse order (an involution)."""
    if reverse is None:
        return x.flip(0)
    return x.gather(0, reverse.unsqueeze(-1).expand_as(x))


class LSTM(_RNNBase):
    """A multi-layer LSTM with layer, group or batch normalization inside every cell.

    Drop-in for ``torch.nn.LSTM``: the same arguments (``proj_size`` included), parameter names,
    shapes and outputs, plus ``norm`` (``"none"``, ``"layer"``, ``"group"``, ``"batch"``),
    ``groups``, ``eps`` and ``max_steps``. Layer norm: Ba et al., "Layer Normalization", 2016
    (eqs. 20-22); batch norm: Cooijmans et al., "Recurrent Batch Normalization", 2016; group
    norm: Wu & He, 2018.

    Shapes: ``input`` ``(L, N, H_in)`` (``(N, L, H_in)`` if ``batch_first``), ``(L, H_in)``
    unbatched, or a ``PackedSequence``; ``hx = (h_0, c_0)``, ``(D * num_layers, N, P)`` and
    ``(D * num_layers, N, H)`` with P = ``proj_size`` or H. ``lengths`` ``(N,)``: steps at or
    after a sample's length are padding.

    Returns:
        ``output`` ``(L, N, D * P)`` (zero at padding; packed if the input was) and
        ``(h_n, c_n)`` from each sample's last valid step.

    Example:
        >>> lstm = LSTM(10, 20, num_layers=2, norm="layer")
        >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10), lengths=torch.tensor([5, 2, 4]))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

    mode = "LSTM"  # torch.nn.LSTM's attribute, read by code that handles several RNN kinds
    _gates, _cell_norm, _num_states = 4, True, 2

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: tuple[Tensor, Tensor] | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, tuple[Tensor, Tensor]]:
        output, (h_n, c_n) = self._forward(input, hx, lengths)
        return output, (h_n, c_n)

    def _direction(self, x, mask, state, suffix):
        (norm_ih, run_ih), (norm_hh, run_hh), (norm_c, run_c) = (
            self._site(f"{site}{suffix}") for site in ("norm_ih", "norm_hh", "norm_c")
        )
        params = ops.LSTMParams(
            getattr(self, f"weight_ih{suffix}"),
            getattr(self, f"weight_hh{suffix}"),
            getattr(self, f"bias_ih{suffix}"),
            getattr(self, f"bias_hh{suffix}"),
            getattr(self, f"weight_hr{suffix}", None),
            *(None if m is None else m.weight for m in (norm_ih, norm_hh, norm_c)),
            None if norm_c is None else norm_c.bias,
        )
        norms = (norm_ih, norm_hh, norm_c)
        backend = self._backend(x, (*state, *params), norms)
        out, (h, c) = ops.lstm(
            x,
            state,
            params,
            self._config(),
            (run_ih, run_hh, run_c),
            mask,
            backend,
            self._all_reduce(norms),
        )
        return out, (h, c)


class GRU(_RNNBase):
    """A multi-layer GRU with layer, group or batch normalization of its projections.

    Drop-in for ``torch.nn.GRU``, with ``norm``, ``groups``, ``eps`` and ``max_steps`` as in
    :class:`LSTM`. ``hx`` is ``h_0`` ``(D * num_layers, N, H)``. As in ``torch.nn.GRU``,
    ``proj_size`` is refused.

    Returns:
        ``output`` ``(L, N, D * H)`` and ``h_n`` ``(D * num_layers, N, H)``.

    Example:
        >>> gru = GRU(10, 20, bidirectional=True, norm="group", groups=4)
        >>> output, h_n = gru(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 40]), torch.Size([2, 3, 20]))
    """

    mode = "GRU"
    _gates, _cell_norm, _num_states = 3, False, 1

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        norm: str = "layer",
        groups: int = 1,
        eps: float = 1e-5,
        max_steps: int = 1000,
        device=None,
        dtype=None,
        **kwargs,
    ):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        if kwargs:
            raise TypeError(f"GRU got unexpected keyword arguments {sorted(kwargs)}")
        super().__init__(
            input_size,
            hidden_size,
            num_layers,
            bias,
            batch_first,
            dropout,
            bidirectional,
            0,
            norm,
            groups,
            eps,
            max_steps,
            device,
            dtype,
        )

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, hx, lengths)
        return output, h_n

    def _direction(self, x, mask, state, suffix):
        (norm_ih, run_ih), (norm_hh, run_hh) = (
            self._site(f"{site}{suffix}") for site in ("norm_ih", "norm_hh")
        )
        params = ops.GRUParams(
            getattr(self, f"weight_ih{suffix}"),
            getattr(self, f"weight_hh{suffix}"),
            getattr(self, f"bias_ih{suffix}"),
            getattr(self, f"bias_hh{suffix}"),
            *(None if m is None else m.weight for m in (norm_ih, norm_hh)),
        )
        norms = (norm_ih, norm_hh)
        backend = self._backend(x, (*state, *params), norms)
        out, h = ops.gru(
            x,
            state[0],
            params,
            self._config(),
            (run_ih, run_hh),
            mask,
            backend,
            self._all_reduce(norms),
        )
        return out, (h,)
