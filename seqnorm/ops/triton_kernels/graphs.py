"""CUDA graphs of the time loops: a loop of two to four launches per step, captured once per
shape and replayed, so that no step pays Python's launch overhead.

A loop is captured the second time its key (shapes, dtypes, configuration) is seen, so that
one-off shapes never hold a graph's memory; the last ``SEQNORM_CUDA_GRAPHS`` graphs are kept
(default 4; 0 turns graphs off). Replaying copies the inputs into the graph's own buffers and
clones its outputs, which the next replay overwrites. Inside someone else's capture (for
example ``torch.compile(mode="reduce-overhead")``) the loop simply runs: it is captured there.

A loop must therefore hand back everything it writes as one of its results: a replay writes into
the graph's copies of the inputs, never into the caller's tensors (tests/test_triton.py replays
the loops on CPU to check this).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

Tensors = dict[str, Tensor | None]

_graphs: OrderedDict = OrderedDict()
_seen: set = set()


def capacity() -> int:
    return int(os.environ.get("SEQNORM_CUDA_GRAPHS", "4"))


def clear() -> None:
    """Release every captured graph (and the memory its buffers hold)."""
    _graphs.clear()
    _seen.clear()


def run(key: tuple, loop: Callable[[Tensors], Tensors], inputs: Tensors) -> Tensors:
    """``loop(inputs)``, through a CUDA graph where one applies."""
    device = next(t.device for t in inputs.values() if t is not None)
    if not _applies(device):
        return loop(inputs)
    signature = tuple(
        (name, None if t is None else (tuple(t.shape), t.dtype, t.stride()))
        for name, t in inputs.items()
    )
    full_key = (key, device, signature)
    entry = _graphs.get(full_key)
    if entry is None:
        if full_key not in _seen:  # first sighting: run it as it is
            _seen.add(full_key)
            return loop(inputs)
        entry = _capture(loop, inputs)
        _graphs[full_key] = entry
        while len(_graphs) > capacity():
            _graphs.popitem(last=False)
    else:
        _graphs.move_to_end(full_key)
    graph, static, outputs = entry
    for name, t in inputs.items():
        if t is not None:
            static[name].copy_(t)
    graph.replay()
    return {name: None if t is None else t.clone() for name, t in outputs.items()}


def _applies(device: torch.device) -> bool:
    return device.type == "cuda" and capacity() > 0 and not torch.cuda.is_current_stream_capturing()


def _capture(loop, inputs: Tensors):
    static = {name: None if t is None else t.clone() for name, t in inputs.items()}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture (cuBLAS handles, kernels)
        loop(static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = loop(static)
    return graph, static, outputs
