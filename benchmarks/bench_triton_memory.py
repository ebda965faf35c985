"""Peak memory of a training step on seqnorm's Triton path, measured on CPU without a GPU.

    python benchmarks/bench_triton_memory.py --json runs/triton_memory.json

The Triton path's Python wrapper allocates every tensor the kernels read and write (inputs,
saved activations, gradients, buffers); the kernels themselves allocate nothing. So with the
kernels replaced by no-ops and the wrapper run on CPU tensors, the profiler's allocation records
give the same sequence of allocations as on a GPU, and its peak the GPU's peak less CUDA's own
(graph pools, cuBLAS workspaces): what the wrapper's design costs, measured in seconds instead of
a GPU session. The values computed are meaningless; only their memory counts. With ``--graphs``,
the CUDA graphs are emulated (graphs.emulated_capture: the graphs' own copies of what a loop reads
and writes, captured and replayed as on a GPU, less the intermediates a real graph's pool keeps
as well) and the peak is taken over three training steps from no graphs at all (run, capture,
replay), as bench_rnn.py takes it on a GPU.

Each peak is given in MB and in units of one ``(T, N, 4H)`` float32 tensor (the LSTM's gates
over the whole sequence), the size the saved activations and gradients come in; ``torch.nn.LSTM``
under cuDNN peaked at about 3.6 such units at D on an H100 (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # Triton on CPU tensors, before the kernels are imported

import torch

import seqnorm

sys.path.insert(0, str(Path(__file__).parent))
from bench_rnn import peak_mb


class _NoKernel:
    """Stands for a Triton kernel: ``kernel[grid](*args)`` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def stub_kernels() -> None:
    """Replace every Triton kernel the wrapper launches with a no-op. Under the interpreter a
    kernel is an InterpretedFunction, not a JITFunction (a test of the latter found none, and
    the interpreter ran every kernel); both are KernelInterfaces."""
    from triton.runtime.jit import KernelInterface

    from seqnorm.ops.triton_kernels import recurrence

    names = [n for n in dir(recurrence) if isinstance(getattr(recurrence, n), KernelInterface)]
    if not names:
        raise RuntimeError("found no Triton kernels in seqnorm.ops.triton_kernels.recurrence")
    for name in names:
        setattr(recurrence, name, _NoKernel())


def emulate_graphs() -> None:
    """Capture and replay the time loops' CUDA graphs as on a GPU, emulated on CPU tensors."""
    from seqnorm.ops.triton_kernels import graphs

    graphs._applies = lambda device: True
    graphs._capture = graphs.emulated_capture


def measure(
    cls: str, norm: str, steps: int, batch: int, inputs: int, hidden: int, with_graphs: bool
) -> dict:
    torch.manual_seed(0)
    groups = 4 if norm == "group" else 1
    model = getattr(seqnorm, cls)(inputs, hidden, norm=norm, groups=groups)
    model.backend = "triton"
    x = torch.randn(steps, batch, inputs, requires_grad=True)

    def step():
        output, _ = model(x)
        output.sum().backward()

    if with_graphs:  # from no graphs, as bench_rnn.py on a GPU: run, capture, replay
        mb = peak_mb(lambda: [step() for _ in range(3)])
    else:
        step()  # anything made once (the bias sum's buffers, autograd's) is made before
        mb = peak_mb(step)
    unit = steps * batch * 4 * hidden * 4 / 2**20
    return {"cell": cls, "norm": norm, "peak_mb": mb, "peak_units": mb / unit}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shape",
        type=int,
        nargs=4,
        default=[128, 16, 256, 256],
        metavar=("STEPS", "BATCH", "INPUT", "HIDDEN"),
    )
    p.add_argument("--cells", nargs="+", default=["LSTM", "GRU"], choices=["LSTM", "GRU"])
    p.add_argument(
        "--norms",
        nargs="+",
        default=["none", "layer", "group", "batch"],
        choices=["none", "layer", "group", "batch"],
    )
    p.add_argument(
        "--graphs", action="store_true", help="with the CUDA graphs emulated (run, capture, replay)"
    )
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # a case in this process
    args = p.parse_args(argv)
    if args.one:
        stub_kernels()
        if args.graphs:
            emulate_graphs()
        print(json.dumps(measure(args.cells[0], args.norms[0], *args.shape, args.graphs)))
        return []
    rows = []
    for cls in args.cells:
        for norm in args.norms:
            # each case in a process of its own: in one process the later cases' peaks read
            # lower (the GRU's with layer norm 4.5 units after the LSTMs, 6.5 alone)
            case = [*map(str, args.shape), "--cells", cls, "--norms", norm, "--one"]
            case += ["--graphs"] if args.graphs else []
            done = subprocess.run(
                [sys.executable, __file__, "--shape", *case],
                check=True,
                capture_output=True,
                text=True,
            )
            row = json.loads(done.stdout.splitlines()[-1])
            rows.append(row)
            print(
                f"{cls:4} {norm:5}  peak {row['peak_mb']:8.2f} MB  "
                f"{row['peak_units']:5.2f} x (T, N, 4H) float32",
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            result = {"shape": args.shape, "graphs": args.graphs, "torch": torch.__version__}
            json.dump({**result, "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
