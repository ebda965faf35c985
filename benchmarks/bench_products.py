"""GFLOP/s of the matrix products in an LSTM training step, and of a square sgemm.

    python benchmarks/bench_products.py              # shape C
    python benchmarks/bench_products.py --shape A

The shapes of bench_rnn.py (A: batch 32, 100 steps, input 128, hidden 256; B: A at batch 1; C:
batch 64, 200 steps, input 256, hidden 512), float32, 2 threads: the input projection of every
step at once, the per-step products with W_hh forward and backward (both ways the fused kernel
times for them: oneDNN's product on packed weights, and oneDNN's brgemm kernel on column blocks;
each run from C++ on weights prepared once, as the time loop runs them) and the chunked products
for dW_hh (512 rows a chunk, as the kernel does). The projection and dW_hh run twice: on at::mm
(torch's BLAS) and as the kernel runs them (its large_product: at::mm or oneDNN's matmul,
whichever it found faster here, or as SEQNORM_CPU_PRODUCT says). The last line adds up the
products of a training step as the kernel runs them: these (the faster way of each per-step
product), and dW_ih as many flop as the input projection at its speed (without dx, which seqnorm
skips when the input needs no gradient). A 2048-square sgemm shows what this machine's BLAS
reaches, and a per-step product of one row by a 16 x 16 weight what a call to oneDNN costs beyond
its arithmetic (its ATen wrapper's time, on the calling thread). Median of 15 runs after one
warm-up run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from seqnorm.ops import cpp

SHAPES = {  # batch, steps, input, hidden
    "A": (32, 100, 128, 256),
    "B": (1, 100, 128, 256),
    "C": (64, 200, 256, 512),
}
CALL = "per step 1 x 16 x 16 (oneDNN)"  # the cost of a call
FORWARD, BACKWARD = "per step h W_hh^T", "per step dgh W_hh"
PER_STEP = (FORWARD, BACKWARD)


def seconds(fn, repeats: int = 15) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs, after one."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def chunk_sizes(steps: int, batch: int) -> list[int]:
    """The steps of each chunk of the dW_hh products, as the kernel splits them (its chunk_steps:
    about 512 rows a chunk), the last chunk what is left."""
    cpp.load()
    chunk = torch.ops.seqnorm_cpp.chunk_steps(steps, batch)
    return [chunk] * (steps // chunk) + ([steps % chunk] if steps % chunk else [])


def kernel_steps(rows: torch.Tensor, weight: torch.Tensor, way: str, steps: int):
    """``rows weight^T`` at every step, the weight prepared once, as the kernel's time loop runs
    it one way (``packed`` or ``brgemm``: its ``step_products``, from C++)."""
    return lambda: torch.ops.seqnorm_cpp.step_products(rows, weight, way, steps)


def onednn_steps(rows: torch.Tensor, weight: torch.Tensor, steps: int):
    """``rows W^T`` at every step on the weight packed once, called from Python (the cost of a
    call, CALL): each step's result is freed before the next."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows.shape[0])

    def run():
        for _ in range(steps):
            torch.ops.mkldnn._linear_pointwise(rows, packed, None, "none", [], "")

    return run


def main(argv=None) -> dict[str, tuple[float, float]]:
    """Prints, and returns, each product's GFLOP/s and milliseconds by name."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="C", choices=list(SHAPES))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch, steps, input_size, hidden = SHAPES[args.shape]
    gates = 4 * hidden
    chunks = chunk_sizes(steps, batch)
    chunk = chunks[0]
    rows = steps * batch
    x, out = torch.randn(rows, input_size), torch.empty(rows, gates)
    w_ih, w_hh = torch.randn(gates, input_size), torch.randn(gates, hidden)
    dgh, h = torch.randn(chunk * batch, gates), torch.randn(chunk * batch, hidden)
    dw = torch.zeros(gates, hidden)
    square = torch.randn(2048, 2048), torch.randn(2048, 2048), torch.empty(2048, 2048)
    recurrent = 2 * rows * hidden * gates  # flop of one product with W_hh over every step
    cpp.load()
    large = torch.ops.seqnorm_cpp.large_product
    cases = {
        "input projection x W_ih^T (at::mm)": (
            2 * rows * input_size * gates,
            lambda: torch.mm(x, w_ih.t(), out=out),
        ),
        "input projection x W_ih^T": (
            2 * rows * input_size * gates,
            lambda: large(out, x, w_ih.t(), False),
        ),
        **{
            f"{product} ({way})": (recurrent, kernel_steps(rows_in, weight, name, steps))
            for product, rows_in, weight in (
                (FORWARD, torch.randn(batch, hidden), w_hh),
                (BACKWARD, torch.randn(batch, gates), w_hh.t()),
            )
            for way, name in (("oneDNN", "packed"), ("brgemm", "brgemm"))
        },
        f"dW_hh, chunks of {chunk} steps (at::mm)": (
            recurrent,
            lambda: [dw.addmm_(dgh[: n * batch].t(), h[: n * batch]) for n in chunks],
        ),
        f"dW_hh, chunks of {chunk} steps": (
            recurrent,
            lambda: [large(dw, dgh[: n * batch].t(), h[: n * batch], True) for n in chunks],
        ),
    }
    results = {}
    for name, (flop, fn) in cases.items():
        took = seconds(fn)
        results[name] = (flop / took / 1e9, 1000 * took)
    kernel = [name for name in cases if not name.endswith(("(at::mm)", "(oneDNN)", "(brgemm)"))]
    input_ms = results["input projection x W_ih^T"][1]
    per_step_ms = [min(results[f"{p} (oneDNN)"][1], results[f"{p} (brgemm)"][1]) for p in PER_STEP]
    # dW_ih as the projection
    step_ms = sum(results[name][1] for name in kernel) + sum(per_step_ms) + input_ms
    step_flop = (
        sum(cases[name][0] for name in kernel)
        + len(PER_STEP) * recurrent
        + cases["input projection x W_ih^T"][0]
    )
    square_s = seconds(lambda: torch.mm(*square[:2], out=square[2]))
    results["sgemm 2048 x 2048 x 2048"] = (2 * 2048**3 / square_s / 1e9, 1000 * square_s)
    call_s = seconds(onednn_steps(torch.randn(1, 16), torch.randn(16, 16), steps)) / steps
    print(f"shape {args.shape}, {args.threads} threads")
    for name, (rate, ms) in results.items():
        print(f"{name:42s} {rate:6.1f} GFLOP/s {ms:8.1f} ms")
    print(
        f"{'products of a training step':42s} {step_flop / step_ms / 1e6:6.1f} GFLOP/s "
        f"{step_ms:8.1f} ms ({step_flop / 1e9:.2f} GFLOP)"
    )
    results[CALL] = (2 * 16 * 16 / call_s / 1e9, 1000 * call_s)
    print(f"{CALL:42s} {1e6 * call_s:6.1f} us a call")
    return results


if __name__ == "__main__":
    main()
