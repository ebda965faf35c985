"""Multi-layer, bidirectional normalized LSTM and GRU with the ``torch.nn.LSTM``/``GRU`` contract.

The input projection and its normalization are computed for all steps at once, outside the time
loop; only the recurrent projection, its normalization and the gate arithmetic run per step.
Padding (``lengths`` or a ``PackedSequence``) is handled with a mask: a padded step leaves the
state as it was, outputs zeros and never enters batch statistics. The reverse direction reads
each sample backwards from its own last valid step.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from . import functional as SF
from . import fused
from .cells import add_cell_parameters, check_cell_args, reset_cell_parameters
from .norms import at_step, check_positive_int

State = tuple[Tensor, ...]


class _RNNBase(nn.Module):
    _gates: int
    _cell_norm: bool
    _num_states: int
    use_fused: bool = True
    """Run the time loop in the fused C++ kernel where it applies (see :mod:`seqnorm.fused`);
    set to False on an instance to run the readable per-step Python loop."""

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
    ):
        super().__init__()
        check_cell_args(input_size, hidden_size, norm, groups, eps, max_steps)
        check_positive_int(num_layers, "num_layers")
        if (
            isinstance(dropout, bool)
            or not isinstance(dropout, (int, float))
            or not 0 <= dropout <= 1
        ):
            raise ValueError(
                f"Expected argument `dropout` to be a number in [0, 1], got {dropout!r}"
            )
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                f"dropout={dropout} acts between layers, so with num_layers=1 it does nothing",
                stacklevel=2,
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional = bidirectional
        self.norm, self.groups, self.eps, self.max_steps = norm, groups, eps, max_steps
        directions = 2 if bidirectional else 1
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for suffix in self._suffixes(layer):
                add_cell_parameters(
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
                )
        self.reset_parameters()

    def _suffixes(self, layer: int) -> list[str]:
        return [f"_l{layer}", f"_l{layer}_reverse"][: 2 if self.bidirectional else 1]

    def reset_parameters(self) -> None:
        reset_cell_parameters(self, self.hidden_size)

    def flatten_parameters(self) -> None:
        """Nothing to do: kept so that code written for ``torch.nn.LSTM`` runs unchanged."""

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
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

    def _forward(self, input, hx, lengths) -> tuple[Tensor | PackedSequence, State]:
        x, lengths, batched, packed = self._check_input(input, lengths)
        steps, n = x.shape[:2]
        state = self._check_hx(hx, n, batched, x)
        if self.norm == "batch" and self.training and n < 2:
            raise ValueError(
                f"Expected a batch of more than one sample for norm='batch' in training, got batch "
                f"size {n}: there are no batch statistics. Use norm='layer' or 'group', or .eval()"
            )
        mask = reverse = None
        if lengths is not None and bool((lengths < steps).any()):
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

    def _recur(self, gx: Tensor, mask: Tensor | None, state: State, step) -> tuple[Tensor, State]:
        """The time loop: ``state = step(gx[t], state, t, mask[t])``, kept where ``mask`` is off.

        Returns the ``(T, N, H)`` outputs (zero at padding) and the state after the last step.
        """
        outputs = []
        for t in range(gx.shape[0]):
            valid = None if mask is None else mask[t].unsqueeze(1)  # (N, 1)
            new = step(gx[t], state, t, None if mask is None else mask[t])
            if valid is None:
                outputs.append(new[0])
            else:
                new = tuple(torch.where(valid, a, b) for a, b in zip(new, state))
                outputs.append(torch.where(valid, new[0], 0))
            state = new
        return torch.stack(outputs), state

    def _check_input(self, input, lengths):
        """Return ``(T, N, H_in)`` input, validated lengths or None, batched, the PackedSequence."""
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
                f"Expected argument `input` to be 3-D {layout} or 2-D unbatched (L, H_in), got "
                f"{input.dim()}-D of shape {tuple(input.shape)}"
            )
        self._check_features(input)
        batched = input.dim() == 3
        if not batched:
            x = input.unsqueeze(1)
        else:
            x = input.transpose(0, 1) if self.batch_first else input
        if lengths is not None:
            lengths = _check_lengths(lengths, x.shape[1], x.shape[0])
        return x, lengths, batched, None

    def _check_features(self, x: Tensor) -> None:
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"Expected argument `input` to have input_size={self.input_size} features in its "
                f"last axis, got shape {tuple(x.shape)}"
            )

    def _check_hx(self, hx, n: int, batched: bool, x: Tensor) -> State:
        layers = self.num_layers * (2 if self.bidirectional else 1)
        shape = (layers, n, self.hidden_size) if batched else (layers, self.hidden_size)
        if hx is None:
            zeros = x.new_zeros(layers, n, self.hidden_size)
            return (zeros,) * self._num_states
        parts = (hx,) if self._num_states == 1 else hx
        if self._num_states > 1 and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(
                f"Expected argument `hx` to be a tuple (h_0, c_0), got {type(hx).__name__}"
            )
        names = ["hx"] if self._num_states == 1 else ["hx[0] (h_0)", "hx[1] (c_0)"]
        for part, name in zip(parts, names):
            if not isinstance(part, Tensor):
                raise TypeError(
                    f"Expected argument `{name}` to be a Tensor, got {type(part).__name__}"
                )
            if tuple(part.shape) != shape:
                raise ValueError(
                    f"Expected argument `{name}` of shape {shape} (num_layers * num_directions, "
                    f"{'N, ' if batched else ''}hidden_size), got {tuple(part.shape)}"
                )
        return tuple(p if batched else p.unsqueeze(1) for p in parts)


def _check_lengths(lengths, n: int, steps: int) -> Tensor:
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"Expected argument `lengths` to hold integers, got dtype {lengths.dtype}")
    if lengths.dim() != 1:
        raise ValueError(f"Expected argument `lengths` to be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.numel() != n:
        raise ValueError(
            f"Expected argument `lengths` to hold one length per sample ({n}), got "
            f"{lengths.numel()}"
        )
    low, high = int(lengths.min()), int(lengths.max())
    if low < 1 or high > steps:
        bad = low if low < 1 else high
        raise ValueError(
            f"Expected every entry of argument `lengths` to be in [1, {steps}] (the sequence "
            f"length), got {bad}"
        )
    return lengths.long()


def _reversed(x: Tensor, reverse: Tensor | None) -> Tensor:
    """``x`` ``(T, N, F)`` with each sample's valid steps in reverse order (an involution)."""
    if reverse is None:
        return x.flip(0)
    return x.gather(0, reverse.unsqueeze(-1).expand_as(x))


class LSTM(_RNNBase):
    """A multi-layer LSTM with layer, group or batch normalization inside every cell.

    Drop-in for ``torch.nn.LSTM``: the same arguments, parameter names, shapes and outputs, plus
    ``norm`` (``"none"``, ``"layer"``, ``"group"``, ``"batch"``), ``groups``, ``eps`` and
    ``max_steps``. Layer norm: Ba et al., "Layer Normalization", 2016 (eqs. 20-22); batch norm:
    Cooijmans et al., "Recurrent Batch Normalization", 2016; group norm: Wu & He, 2018.

    Shapes: ``input`` ``(L, N, H_in)`` (``(N, L, H_in)`` if ``batch_first``), ``(L, H_in)``
    unbatched, or a ``PackedSequence``; ``hx = (h_0, c_0)``, each ``(D * num_layers, N, H)``.
    ``lengths`` ``(N,)``: steps at or after a sample's length are padding.

    Returns:
        ``output`` ``(L, N, D * H)`` (zero at padding; packed if the input was) and
        ``(h_n, c_n)``, each ``(D * num_layers, N, H)``, from each sample's last valid step.

    Example:
        >>> lstm = LSTM(10, 20, num_layers=2, norm="layer")
        >>> output, (h_n, c_n) = lstm(torch.randn(5, 3, 10), lengths=torch.tensor([5, 2, 4]))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 20]), torch.Size([2, 3, 20]))
    """

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
        weight_ih, weight_hh = (
            getattr(self, f"weight_ih{suffix}"),
            getattr(self, f"weight_hh{suffix}"),
        )
        bias_ih, bias_hh = getattr(self, f"bias_ih{suffix}"), getattr(self, f"bias_hh{suffix}")
        norm_ih, norm_hh = getattr(self, f"norm_ih{suffix}"), getattr(self, f"norm_hh{suffix}")
        norm_c = getattr(self, f"norm_c{suffix}")
        if self.use_fused and fused.applies(
            x, *state, weight_ih, weight_hh, bias_ih, bias_hh, norms=(norm_ih, norm_hh, norm_c)
        ):
            bias = None if bias_ih is None else bias_ih + bias_hh
            return fused.lstm(
                x, weight_ih, bias, norm_ih, (state[0], state[1]), weight_hh, norm_hh, norm_c, mask
            )
        gx = SF.lstm_input(x, weight_ih, bias_ih, bias_hh, at_step(norm_ih, 0, mask))  # (T, N, 4H)

        def step(gx_t, state, t, valid):
            h, c = state
            return SF.lstm_step(
                gx_t, h, c, weight_hh, at_step(norm_hh, t, valid), at_step(norm_c, t, valid)
            )

        return self._recur(gx, mask, state, step)


class GRU(_RNNBase):
    """A multi-layer GRU with layer, group or batch normalization of its projections.

    Drop-in for ``torch.nn.GRU``, with ``norm``, ``groups``, ``eps`` and ``max_steps`` as in
    :class:`LSTM`. ``hx`` is ``h_0`` ``(D * num_layers, N, H)``.

    Returns:
        ``output`` ``(L, N, D * H)`` and ``h_n`` ``(D * num_layers, N, H)``.

    Example:
        >>> gru = GRU(10, 20, bidirectional=True, norm="group", groups=4)
        >>> output, h_n = gru(torch.randn(5, 3, 10))
        >>> output.shape, h_n.shape
        (torch.Size([5, 3, 40]), torch.Size([2, 3, 20]))
    """

    _gates, _cell_norm, _num_states = 3, False, 1

    def forward(
        self,
        input: Tensor | PackedSequence,
        hx: Tensor | None = None,
        lengths: Tensor | None = None,
    ) -> tuple[Tensor | PackedSequence, Tensor]:
        output, (h_n,) = self._forward(input, hx, lengths)
        return output, h_n

    def _direction(self, x, mask, state, suffix):
        weight_ih, weight_hh = (
            getattr(self, f"weight_ih{suffix}"),
            getattr(self, f"weight_hh{suffix}"),
        )
        bias_ih, bias_hh = getattr(self, f"bias_ih{suffix}"), getattr(self, f"bias_hh{suffix}")
        norm_ih, norm_hh = getattr(self, f"norm_ih{suffix}"), getattr(self, f"norm_hh{suffix}")
        if self.use_fused and fused.applies(
            x, state[0], weight_ih, weight_hh, bias_ih, bias_hh, norms=(norm_ih, norm_hh)
        ):
            out, h = fused.gru(
                x, weight_ih, bias_ih, norm_ih, state[0], weight_hh, bias_hh, norm_hh, mask
            )
            return out, (h,)
        gx = SF.gru_input(x, weight_ih, bias_ih, at_step(norm_ih, 0, mask))  # (T, N, 3H)

        def step(gx_t, state, t, valid):
            return (SF.gru_step(gx_t, state[0], weight_hh, bias_hh, at_step(norm_hh, t, valid)),)

        return self._recur(gx, mask, state, step)
