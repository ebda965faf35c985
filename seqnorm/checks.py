"""Argument and input checks shared by the cells and layers.

Every error names the argument, the value and what was expected. Where ``torch.nn`` refuses the
same thing, the error has torch's type and contains torch's phrase, so that code written for
``torch.nn.LSTM`` (``except RuntimeError``, tests matching the message) keeps working.
"""

from __future__ import annotations

import torch
from torch import Tensor

NORMS = ("none", "layer", "group", "batch")
"""The choices for a cell's ``norm`` argument."""


class ShapeError(RuntimeError, ValueError):
    """A tensor of the wrong shape or length.

    ``torch.nn`` raises RuntimeError for these and seqnorm raised ValueError, so this error is
    both: ``except RuntimeError`` and ``except ValueError`` both catch it.
    """


def check_bool(value, name: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} should be of type bool, got: {type(value).__name__} {value!r}")


def check_int(value, name: str, minimum: int = 1) -> None:
    """An int (not a bool) of at least ``minimum`` (1: "greater than zero", 0: "non-negative")."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} should be of type int, got: {type(value).__name__} {value!r}")
    if value < minimum:
        what = {0: "non-negative", 1: "greater than zero"}.get(minimum, f"at least {minimum}")
        raise ValueError(f"{name} must be {what}, got {value}")


def check_momentum(momentum) -> None:
    """A running statistics' momentum: a number in [0, 1]."""
    if (
        isinstance(momentum, bool)
        or not isinstance(momentum, (int, float))
        or not 0 <= momentum <= 1
    ):
        raise ValueError(
            f"Expected argument `momentum` to be a number in [0, 1], got {momentum!r} (torch's "
            "momentum=None, a cumulative average, has no per-step form here)"
        )


def check_step(step) -> None:
    """A time step (the first of the input's, for batch norm's statistics): a non-negative int,
    or an integer tensor of one element, whose value is not read (that would wait for the
    device)."""
    if isinstance(step, Tensor):
        if (
            step.numel() != 1
            or step.is_floating_point()
            or step.is_complex()
            or step.dtype == torch.bool
        ):
            raise TypeError(
                f"Expected argument `step` to be an integer, got a tensor of dtype {step.dtype} "
                f"and shape {tuple(step.shape)}"
            )
        return
    if isinstance(step, torch.SymInt):  # an int that torch.compile made dynamic
        return
    check_int(step, "step", 0)


def check_norm(norm) -> None:
    """Reject anything a recurrent cell cannot use, saying what it can."""
    choices = ", ".join(map(repr, NORMS))
    if norm == "instance":
        raise ValueError(
            f"Expected argument `norm` to be one of {choices}, got 'instance': at one time step "
            "each sample and feature is a single number, so instance norm would always output 0. "
            "Use norm='layer' (one group) or norm='group'"
        )
    if norm not in NORMS:
        raise ValueError(f"Expected argument `norm` to be one of {choices}, got {norm!r}")


def check_groups(groups, features: int, features_name: str) -> None:
    check_int(groups, "groups")
    if features % groups:
        raise ValueError(
            f"Expected argument `groups` to divide {features_name}={features}, got groups={groups}"
        )


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"Expected argument `eps` to be a positive number, got {eps!r}")


def check_cell_args(input_size, hidden_size, bias, norm, groups, eps, max_steps, *, layer: bool):
    """The arguments every cell and layer shares, validated before anything is built.

    A layer needs sizes of at least 1, as ``torch.nn.LSTM``; a cell accepts 0, as
    ``torch.nn.LSTMCell`` does (its outputs are then empty).
    """
    check_int(input_size, "input_size", 1 if layer else 0)
    check_int(hidden_size, "hidden_size", 1 if layer else 0)
    check_bool(bias, "bias")
    check_norm(norm)
    check_groups(groups, hidden_size, "hidden_size")
    if groups != 1 and norm != "group":
        raise ValueError(
            f"Expected argument `groups` to be 1 unless norm='group', got groups={groups} with "
            f"norm={norm!r}"
        )
    check_eps(eps)
    check_int(max_steps, "max_steps")


def check_dropout(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout <= 1:
        raise ValueError(
            "dropout should be a number in range [0, 1] representing the probability of an "
            f"element being zeroed, got {dropout!r}"
        )


def check_proj_size(proj_size, hidden_size: int) -> None:
    if isinstance(proj_size, bool) or not isinstance(proj_size, int):
        raise TypeError(
            f"proj_size should be of type int, got: {type(proj_size).__name__} {proj_size!r}"
        )
    if proj_size < 0:
        raise ValueError(
            "proj_size should be a positive integer or zero to disable projections, got "
            f"{proj_size}"
        )
    if proj_size >= hidden_size:
        raise ValueError(
            f"proj_size has to be smaller than hidden_size, got proj_size={proj_size} and "
            f"hidden_size={hidden_size}"
        )


_AUTOCAST_MIX = frozenset((torch.float32, torch.float16, torch.bfloat16))


def _dtypes_meet(value: Tensor, weight: Tensor) -> bool:
    """The weights' dtype, or under autocast float32 and half precision in any mix (an autocast
    layer's half-precision output feeds float32 weights); float64 needs float64."""
    if value.dtype == weight.dtype:
        return True
    autocast = torch.is_autocast_enabled(value.device.type)
    return autocast and {value.dtype, weight.dtype} <= _AUTOCAST_MIX


def check_dtype(input: Tensor, weight: Tensor, what: str = "RNN") -> None:
    """The input's floating dtype must be the weights', as in ``torch.nn`` (see
    :func:`_dtypes_meet` for autocast)."""
    if not _dtypes_meet(input, weight):
        # A model can take a real floating dtype only: for any other, convert the input.
        model = input.dtype.is_floating_point and not input.dtype.is_complex
        raise ValueError(
            f"{what} input dtype ({input.dtype}) does not match weight dtype ({weight.dtype}). "
            f"Convert input: input.to({weight.dtype})"
            + (f", or convert model: model.to({input.dtype})" if model else "")
        )


def check_state_dtype(state: Tensor, weight: Tensor, name: str) -> None:
    """An initial state's dtype must be the weights', as the input's (``torch.nn`` fails inside
    its kernel instead)."""
    if not _dtypes_meet(state, weight):
        raise ValueError(
            f"Expected argument `{name}` to have the weights' dtype ({weight.dtype}), got "
            f"{state.dtype}: convert it with .to({weight.dtype})"
        )


def check_device(value: Tensor, weight: Tensor, name: str) -> None:
    """An input or initial state must be on the weights' device (a RuntimeError, as in
    ``torch.nn``; the kernels would fail on it with a less clear message, or not at all)."""
    if value.device != weight.device:
        raise RuntimeError(
            f"Expected argument `{name}` on the weights' device ({weight.device}), got it on "
            f"{value.device}: move it with .to('{weight.device}'), or the model with "
            f".to('{value.device}')"
        )


def check_lengths(lengths, n: int, steps: int, *, values: bool = True) -> Tensor:
    """``lengths`` as a 1-D int64 tensor of ``n`` entries in ``[1, steps]``.

    ``values=False`` checks the type and shape only: reading the values would synchronize with
    the device and, under ``torch.compile``, break the graph.
    """
    lengths = torch.as_tensor(lengths)
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"Expected argument `lengths` to hold integers, got dtype {lengths.dtype}")
    if lengths.dim() != 1:
        raise ShapeError(f"Expected argument `lengths` to be 1-D, got shape {tuple(lengths.shape)}")
    if lengths.numel() != n:
        raise ShapeError(
            f"Expected argument `lengths` to hold one length per sample ({n}), got "
            f"{lengths.numel()}"
        )
    if values and n:
        low, high = int(lengths.min()), int(lengths.max())
        if low < 1 or high > steps:
            bad = low if low < 1 else high
            raise ValueError(
                f"Expected every entry of argument `lengths` to be in [1, {steps}] (the sequence "
                f"length), got {bad}"
            )
    return lengths.long()
