"""CUDA graphs of the time loops: a loop of two to four launches per step, captured once per
shape and replayed, so that no step pays Python's launch overhead.

A graph covers a window of at most ``SEQNORM_TRITON_WINDOW`` steps (default 32; the backward
sums its gradients in the same windows, with graphs or without), and a longer loop replays it
window by window: a graph's buffers are its own copies of what the loop reads and writes, so a
graph of the whole sequence would double the memory of the activations and gradients (it did:
3.4-7.6x cuDNN's peak on an H100, against 2.2-2.4x without graphs); a window's copies are a
window's steps of them, whatever the length. Each window copies its steps in, replays, and
copies what the loop wrote back out; the weights are copied into a graph once per call.

A graph is captured the second time its key (window length, shapes, dtypes, configuration) is
seen, so that one-off shapes never hold one, into one of ``SEQNORM_CUDA_GRAPHS`` places (default
8: the forward, backward and inference loops of a shape take two each, a full window and the
rest; 0 turns graphs off; a lower count applies at the next call, releasing the graphs beyond it,
least recently used first). When they are taken, a key is captured only in place of the graph
seen least often, and only if it has been seen more often than that one: with more shapes than
places taking turns (a classifier's batches padded to their longest sentence), a
least-recently-used cache would capture again at nearly every call, and a capture runs the loop
twice. Inside someone else's capture (for example ``torch.compile(mode="reduce-overhead")``) the
loop simply runs, on the whole sequence: it is captured there.

A loop writes only into the tensors it is given and names them in ``writes``: a replay writes
into the graph's copies, and only those are copied back (tests/test_triton.py replays the loops
on CPU, with ``emulated_capture``, to check this).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping

import torch
from torch import Tensor

Tensors = dict[str, Tensor | None]

WINDOW = 32
"""The most steps one graph covers unless ``SEQNORM_TRITON_WINDOW`` says otherwise."""

_graphs: OrderedDict = OrderedDict()  # key -> (graph, its tensors), oldest use first
_sightings: dict = {}  # key -> how often run has seen it
_REMEMBERED = 4096  # keys counted; beyond, the counts of keys without a graph are forgotten
_streams: dict = {}  # device -> the side stream every capture on it warms up and captures on


def capacity() -> int:
    return int(os.environ.get("SEQNORM_CUDA_GRAPHS", "8"))


def window() -> int:
    """Steps per window (``SEQNORM_TRITON_WINDOW``): even, so that a ring of two states ends a
    window where the next one starts."""
    value = os.environ.get("SEQNORM_TRITON_WINDOW", str(WINDOW))
    steps = int(value) if value.strip().isdigit() else 0
    if steps < 2 or steps % 2:
        raise ValueError(
            f"SEQNORM_TRITON_WINDOW: expected an even number of steps >= 2, got {value!r}"
        )
    return steps


def windows(steps: int) -> list[tuple[int, int]]:
    """(first step, steps) of every window of a loop of ``steps`` steps, in order."""
    size = window()
    return [(start, min(size, steps - start)) for start in range(0, steps, size)]


def clear() -> None:
    """Release every captured graph (and the memory its buffers hold)."""
    _graphs.clear()
    _sightings.clear()


def run(
    key: tuple,
    loop: Callable[[Tensors, int], None],
    tensors: Tensors,
    steps: int,
    timed: Mapping[str, int],
    writes: Collection[str],
    reverse: bool = False,
) -> None:
    """``loop(tensors, steps)``, through CUDA graphs where they apply, window by window
    (``reverse``: the last window first, for a backward through time). ``timed`` gives the time
    dimension of the tensors that have one: those of ``steps`` (or ``steps + 1``, a state before
    every step and after the last) along it are cut into windows; every other tensor is passed
    whole. ``loop(part, k)`` runs ``k`` steps on such a part, and writes only the tensors named
    in ``writes``; a state carried between windows is written at the end of one and read at the
    start of the next."""
    device = next(t.device for t in tensors.values() if t is not None)
    places = capacity()
    while len(_graphs) > max(places, 0):  # SEQNORM_CUDA_GRAPHS lowered since (0 included)
        _graphs.popitem(last=False)
    if places <= 0 or not _applies(device):
        loop(tensors, steps)
        return
    loaded = set()  # graphs whose copies of the whole, unwritten tensors (weights) are current
    for start, k in reversed(windows(steps)) if reverse else windows(steps):
        part = {name: _window(t, timed.get(name), steps, start, k) for name, t in tensors.items()}
        full_key = (key, k, device, _signature(part))
        entry = _graph_for(full_key, loop, part, k, places)
        if entry is None:
            loop(part, k)
            continue
        graph, static = entry
        for name, t in part.items():
            if t is not None and (name in timed or name in writes or full_key not in loaded):
                static[name].copy_(t)
        loaded.add(full_key)
        graph.replay()
        for name in writes:
            if part[name] is not None:
                part[name].copy_(static[name])


def _window(t: Tensor | None, dim: int | None, steps: int, start: int, k: int) -> Tensor | None:
    if t is None or dim is None or t.shape[dim] not in (steps, steps + 1):
        return t
    return t.narrow(dim, start, k + t.shape[dim] - steps)


def _signature(part: Tensors) -> tuple:
    return tuple(
        (name, None if t is None else (tuple(t.shape), t.dtype)) for name, t in part.items()
    )


def _graph_for(full_key: tuple, loop, part: Tensors, k: int, places: int):
    """The (graph, its tensors) of a key, captured now if it is admitted; None if not."""
    if len(_sightings) >= _REMEMBERED:
        for key in [key for key in _sightings if key not in _graphs]:
            del _sightings[key]
    seen = _sightings[full_key] = _sightings.get(full_key, 0) + 1
    entry = _graphs.get(full_key)
    if entry is not None:
        _graphs.move_to_end(full_key)
        return entry
    if not _admit(seen, places):
        return None
    # the graph's own tensors: contiguous, so that the shapes and dtypes alone key it
    static = {name: None if t is None else t.contiguous().clone() for name, t in part.items()}
    entry = _graphs[full_key] = (_capture(lambda s: loop(s, k), static), static)
    return entry


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


def _capture(work: Callable[[Tensors], None], static: Tensors):
    """Warm up and capture ``work(static)`` on one side stream per device, the same for every
    capture: cuBLAS keeps a workspace (tens of MiB) for each stream it has run on until the
    process ends, so a new stream per capture would leave one behind per capture."""
    device = next(t.device for t in static.values() if t is not None)
    stream = _streams.get(device)
    if stream is None:
        stream = _streams[device] = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):  # warm-up outside the capture (cuBLAS workspace, kernels)
        work(static)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        work(static)
    return graph


class _Emulated:
    """A captured graph's work without a GPU: a replay runs the work again on the same tensors."""

    def __init__(self, work: Callable[[Tensors], None], static: Tensors):
        self.work, self.static = work, static
        work(static)  # as the warm-up does

    def replay(self) -> None:
        self.work(self.static)


def emulated_capture(work: Callable[[Tensors], None], static: Tensors) -> _Emulated:
    """Stands for ``_capture`` on CPU (tests, benchmarks/bench_triton_memory.py): the same
    copies in and out, windows and places, with the graph's work run again at each replay."""
    return _Emulated(work, static)
