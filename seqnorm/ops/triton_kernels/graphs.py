"""CUDA graphs of the time loops: a loop of two to four launches per step, captured once per
shape and replayed, so that no step pays Python's launch overhead.

A loop is captured the second time its key (shapes, dtypes, configuration) is seen, so that
one-off shapes never hold a graph's memory, into one of ``SEQNORM_CUDA_GRAPHS`` places (default
4; 0 turns graphs off; a lower count applies at the next call, releasing the graphs beyond it,
least recently used first). When they are taken, a key is captured only in place of the graph
seen least often, and only if it has been seen more often than that one: with more shapes than
places taking turns (a classifier's batches padded to their longest sentence), a
least-recently-used cache would capture again at nearly every call, and a capture runs the loop
twice. Replaying copies the inputs into the graph's own buffers and clones its outputs, which the
next replay overwrites. Inside someone else's capture (for example
``torch.compile(mode="reduce-overhead")``) the loop simply runs: it is captured there.

A loop must hand back everything it writes as one of its results: a replay writes into
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

_graphs: OrderedDict = OrderedDict()  # key -> (graph, its inputs, its outputs), oldest use first
_sightings: dict = {}  # key -> how often run has seen it
_REMEMBERED = 4096  # keys counted; beyond, the counts of keys without a graph are forgotten
_streams: dict = {}  # device -> the side stream every capture on it warms up and captures on


def capacity() -> int:
    return int(os.environ.get("SEQNORM_CUDA_GRAPHS", "4"))


def clear() -> None:
    """Release every captured graph (and the memory its buffers hold)."""
    _graphs.clear()
    _sightings.clear()


def run(key: tuple, loop: Callable[[Tensors], Tensors], inputs: Tensors) -> Tensors:
    """``loop(inputs)``, through a CUDA graph where one applies."""
    device = next(t.device for t in inputs.values() if t is not None)
    places = capacity()
    while len(_graphs) > max(places, 0):  # SEQNORM_CUDA_GRAPHS lowered since (0 included)
        _graphs.popitem(last=False)
    if places <= 0 or not _applies(device):
        return loop(inputs)
    signature = tuple(
        (name, None if t is None else (tuple(t.shape), t.dtype, t.stride()))
        for name, t in inputs.items()
    )
    full_key = (key, device, signature)
    if len(_sightings) >= _REMEMBERED:
        for k in [k for k in _sightings if k not in _graphs]:
            del _sightings[k]
    seen = _sightings[full_key] = _sightings.get(full_key, 0) + 1
    entry = _graphs.get(full_key)
    if entry is None:
        if not _admit(seen, places):
            return loop(inputs)
        entry = _capture(loop, inputs)
        _graphs[full_key] = entry
    else:
        _graphs.move_to_end(full_key)
    graph, static, outputs = entry
    for name, t in inputs.items():
        if t is not None:
            static[name].copy_(t)
    graph.replay()
    return {name: None if t is None else t.clone() for name, t in outputs.items()}


def _admit(seen: int, places: int) -> bool:
    """Whether to capture a key seen ``seen`` times (this time included) into one of ``places``,
    making room for it."""
    if seen < 2:
        return False
    if len(_graphs) < places:
        return True
    coldest = min(_graphs, key=_sightings.__getitem__)  # the least recently used of equals
    if _sightings[coldest] >= seen:
        return False
    del _graphs[coldest]
    return True


def _applies(device: torch.device) -> bool:
    return device.type == "cuda" and not torch.cuda.is_current_stream_capturing()


def _capture(loop, inputs: Tensors):
    """Warm up and capture on one side stream per device, the same for every capture: cuBLAS
    keeps a workspace (tens of MiB) for each stream it has run on until the process ends, so a
    new stream per capture would leave one behind per capture."""
    static = {name: None if t is None else t.clone() for name, t in inputs.items()}
    device = next(t.device for t in static.values() if t is not None)
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the capture (cuBLAS workspace, kernels)
        loop(static)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        outputs = loop(static)
    return graph, static, outputs
