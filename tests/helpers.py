"""What the tests share: model factories, the cases every test runs through, and the backends."""

from __future__ import annotations

import torch

import seqnorm

NORM_CASES = ["none", "layer", "group", "batch"]

BACKENDS = ["python", "cpp", "triton"]
"""The implementations every reference test runs on: the readable loop, the C++ kernel and the
Triton kernels (in Triton's interpreter on CPU tensors where there is no GPU: tests/conftest.py).
Each is required: a kernel that does not build, or a missing Triton, fails these tests."""


def make(
    cls_name, norm, *, input_size=5, hidden_size=8, dtype=torch.float64, seed=0, backend=None, **kw
):
    """A seqnorm module with non-trivial norm gains and shifts (so that they are tested too)."""
    torch.manual_seed(seed)
    groups = 4 if norm == "group" else 1
    model = getattr(seqnorm, cls_name)(
        input_size, hidden_size, norm=norm, groups=groups, dtype=dtype, **kw
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith("norm_"):
                p.uniform_(0.5, 1.5) if name.endswith("weight") else p.uniform_(-0.5, 0.5)
    if backend is not None:
        model.backend = backend
    return model


def flat(outputs) -> list[torch.Tensor]:
    """The tensors of a layer's result (or of any nesting of tuples), in order: a PackedSequence
    gives its data."""
    if isinstance(outputs, torch.Tensor):
        return [outputs]
    if isinstance(outputs, torch.nn.utils.rnn.PackedSequence):
        return [outputs.data]
    return [t for o in outputs for t in flat(o)]


@torch.no_grad()
def randomize_running(model: torch.nn.Module) -> None:
    """Batch norm's running statistics away from 0 and 1 (means ~ N(0, 1), variances in
    [0.5, 1.5)), so that eval mode is tested on statistics of its own."""
    for name, buf in model.named_buffers():
        if "running_mean" in name:
            buf.copy_(torch.randn_like(buf))
        elif "running_var" in name:
            buf.copy_(torch.rand_like(buf) + 0.5)
