"""GFLOP/s of the matrix products in an LN-LSTM training step at shape C, and of a square sgemm.

    python benchmarks/bench_products.py

Shape C of bench_rnn.py (batch 64, 200 steps, input 256, hidden 512), float32, 2 threads: the
input projection of every step at once, the 200 per-step products with W_hh forward and backward
(oneDNN's packed weights, as the fused kernel runs them) and the chunked products for dW_hh (8
steps each). A 2048-square sgemm shows what this machine's BLAS reaches. Median of 15 runs after
one warm-up run.
"""

from __future__ import annotations

import statistics
import time

import torch

STEPS, BATCH, INPUT, HIDDEN = 200, 64, 256, 512
GATES = 4 * HIDDEN
CHUNK = 8


def gflops(flop: float, fn, repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return flop / statistics.median(times) / 1e9


def onednn_steps(rows: torch.Tensor, weight: torch.Tensor):
    """``rows W^T`` at every step, on the weight packed once, as the kernel runs it."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows.shape[0])
    return lambda: [
        torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "") for _ in range(STEPS)
    ]


def main():
    torch.set_num_threads(2)
    rows = STEPS * BATCH
    x, out = torch.randn(rows, INPUT), torch.empty(rows, GATES)
    w_ih, w_hh = torch.randn(GATES, INPUT), torch.randn(GATES, HIDDEN)
    dgh, h = torch.randn(CHUNK * BATCH, GATES), torch.randn(CHUNK * BATCH, HIDDEN)
    dw = torch.zeros(GATES, HIDDEN)
    square = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
    recurrent = 2 * rows * HIDDEN * GATES  # flop of one product with W_hh over every step
    cases = {
        "input projection x W_ih^T": (
            2 * rows * INPUT * GATES,
            lambda: torch.mm(x, w_ih.t(), out=out),
        ),
        "per step h W_hh^T (oneDNN)": (
            recurrent,
            onednn_steps(torch.randn(BATCH, HIDDEN), w_hh),
        ),
        "per step dgh W_hh (oneDNN)": (
            recurrent,
            onednn_steps(torch.randn(BATCH, GATES), w_hh.t().contiguous()),
        ),
        f"dW_hh, chunks of {CHUNK} steps": (
            recurrent,
            lambda: [dw.addmm_(dgh.t(), h) for _ in range(STEPS // CHUNK)],
        ),
        "sgemm 2048 x 2048 x 2048": (2 * 2048**3, lambda: torch.mm(*square[:2], out=square[2])),
    }
    for name, (flop, fn) in cases.items():
        print(f"{name:32s} {gflops(flop, fn):6.1f} GFLOP/s")


if __name__ == "__main__":
    main()
