"""Which implementation of the recurrence runs: ``SEQNORM_BACKEND`` and the per-layer choice.

``auto`` (the default) picks the C++ kernel on CPU and the Triton kernels on CUDA, and the
readable Python loop where neither applies, saying why once per reason in a warning. ``cpp``,
``triton`` and ``python`` ask for one; asking for one that cannot run these inputs (or cannot be
built) is an error that says why, so that a test or a benchmark never measures a silent
fallback. Calls that only the differentiable loop computes correctly (``torch.func``
transforms, forward-mode AD, batch norm synchronized across processes) take it whatever was
asked for, with the same warning. ``triton`` on
CPU tensors runs the Triton kernels in Triton's interpreter, which needs ``TRITON_INTERPRET=1``
set before Triton is first imported.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor

from ..functional import static_size

BACKENDS = ("auto", "cpp", "triton", "python")
_warned: set[str] = set()
_unavailable: dict[str, str] = {}  # backend -> why it cannot run in this process


def configured() -> str:
    """``SEQNORM_BACKEND``, checked (``auto`` when unset)."""
    value = os.environ.get("SEQNORM_BACKEND", "auto")
    check(value, "the environment variable SEQNORM_BACKEND")
    return value


def check(value, name: str = "argument `backend`") -> None:
    if value not in BACKENDS:
        raise ValueError(
            f"Expected {name} to be one of {', '.join(map(repr, BACKENDS))}, got {value!r}"
        )


def choose(
    requested: str | None,
    x: Tensor,
    tensors: Iterable[Tensor | None],
    synced: bool,
    hidden: int = 0,
    norm: str = "none",
    groups: int = 1,
) -> str:
    """The backend that runs a direction: ``"cpp"``, ``"triton"``, ``"python"`` (or ``"scan"``
    while exporting to ONNX).

    Args:
        requested: the layer's own choice, or None for :func:`configured`.
        x: the direction's input; tensors: its state and parameters.
        synced: batch norm takes its statistics over every process (only the Python loop can).
        hidden, norm, groups: the layer's, for the limits of the Triton kernels.
    """
    requested = configured() if requested is None else requested
    check(requested)
    if torch.onnx.is_in_onnx_export():
        # ONNX has no seqnorm operator: the exporter records the reference's steps, as a Scan
        # (torch.export-based exporter), or unrolled at the example's length (TorchScript's).
        return "python" if unrolled_export() else "scan"
    if requested == "python":
        return "python"
    tensors = [t for t in tensors if t is not None]
    # Semantics first: these calls need the differentiable loop whatever was asked for.
    reason = _python_only(x, tensors, synced)
    if reason is None:
        backend = _native(x) if requested == "auto" else requested
        reason = _why_not(backend, x, tensors, hidden, norm, groups)
        if reason is None:
            return backend
        if requested != "auto":
            raise RuntimeError(f"backend={requested!r} cannot run here: {reason}")
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"seqnorm runs the per-step Python loop because {reason}", RuntimeWarning, stacklevel=4
        )
    return "python"


def unrolled_export() -> bool:
    """Whether TorchScript's ONNX exporter (``torch.onnx.export(..., dynamo=False)``) is tracing:
    it records the Python loop's steps, unrolled at the example's sequence length."""
    return torch.onnx.is_in_onnx_export() and torch.jit.is_tracing()


def pin_length(x: Tensor) -> Tensor:
    """``x`` ``(T, N, H_in)`` for :func:`unrolled_export`: reshaped to the example's T as a
    constant, so that the exported model fails at any other length (ONNX Runtime's Reshape
    error, even with ``dynamic_axes`` on the time dimension) rather than running T steps of a
    longer input, or reading past a shorter one. Warns at every such export."""
    steps = static_size(x, 0)
    warnings.warn(
        f"TorchScript's ONNX exporter (dynamo=False) unrolls seqnorm's time loop at the example's "
        f"sequence length ({steps} steps): the exported model runs at that length only and "
        "refuses any other. torch.onnx.export's default exporter (dynamo=True) records the loop "
        "for every length.",
        UserWarning,
        stacklevel=4,
    )
    return x.reshape(steps, *x.shape[1:])


HALF = (torch.bfloat16, torch.float16)


def cpp_dtype(x: Tensor, tensors: Iterable[Tensor]) -> torch.dtype | None:
    """The dtype the C++ kernel computes a call in, or None if it cannot: the dtype of the input
    and every state and parameter where they share float32 or float64; float32 where they share a
    half-precision dtype (the results are rounded back to it), and under CPU autocast for any mix
    of float32 and half precision."""
    dtypes = {x.dtype, *(t.dtype for t in tensors)}
    if len(dtypes) == 1 and x.dtype in (torch.float32, torch.float64):
        return x.dtype
    if len(dtypes) == 1 and x.dtype in HALF:
        return torch.float32
    if torch.is_autocast_enabled("cpu") and dtypes <= {torch.float32, *HALF}:
        return torch.float32
    return None


def _native(x: Tensor) -> str:
    return "cpp" if x.device.type == "cpu" else "triton"


def _python_only(x: Tensor, tensors: list[Tensor], synced: bool) -> str | None:
    """Why only the differentiable Python loop computes this call correctly, if it must."""
    if torch.compiler.is_compiling():
        return None  # compiling traces the operator; the checks below would break the graph
    if synced:
        return "batch norm synchronizes its statistics across processes"
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform (vmap, grad, jacrev, jvp, ...) is active"
    if torch.autograd.forward_ad._current_level >= 0 and any(
        torch.autograd.forward_ad.unpack_dual(t).tangent is not None for t in (x, *tensors)
    ):
        return "forward-mode automatic differentiation is active"
    return None


def _why_not(backend: str, x: Tensor, tensors: list[Tensor], hidden, norm, groups) -> str | None:
    """Why ``backend`` cannot run this call, or None if it can."""
    device = x.device.type
    if backend == "cpp":
        if device != "cpu":
            return f"the C++ kernel runs on CPU tensors, got {device}"
        if x.dtype not in (torch.float32, torch.float64, *HALF):
            return (
                "the C++ kernel runs in float32 and float64 (half precision in float32), "
                f"got {x.dtype}"
            )
        if cpp_dtype(x, tensors) is None:
            return "the C++ kernel needs the input and every parameter in one dtype"
    if backend == "triton":
        if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
            return "the Triton kernels run on CUDA, or on CPU with TRITON_INTERPRET=1"
        if device not in ("cpu", "cuda"):
            return f"the Triton kernels run on CUDA tensors, got {device}"
        unavailable = _unavailable_reason(backend)
        if unavailable is not None:
            return unavailable
        from . import triton_kernels

        return triton_kernels.unsupported(x, tensors, hidden, norm, groups)
    return _unavailable_reason(backend)


@torch.compiler.assume_constant_result  # run eagerly when compiling, not traced
def _unavailable_reason(backend: str) -> str | None:
    """Why ``backend`` cannot be built or imported in this process (cached), or None."""
    if backend not in _unavailable:
        try:
            if backend == "cpp":
                from . import cpp

                cpp.load()
            else:
                from . import triton_kernels  # noqa: F401
            _unavailable[backend] = ""
        except Exception as error:
            _unavailable[backend] = f"the {backend} kernels are unavailable ({error})"
    return _unavailable[backend] or None
