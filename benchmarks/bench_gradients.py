"""How large the input gradients of a normalized LSTM are at default initialization.

    python benchmarks/bench_gradients.py --json benchmarks/results/gradients.json

For each norm (and ``torch.nn.LSTM``), sequence length T and seed: a one-layer LSTM (input 128,
hidden 256, batch 32, torch's default initialization, seqnorm's norm gains at 1, batch norm's at
0.1), random input, loss = mean of the outputs of the last step; the gradient's norm with
respect to the input of the first and of the last step. Reported: the median over seeds, the
first step's over the last step's (how the gradient grows or vanishes back through time), and
each one's ratio to torch.nn.LSTM's. In float64 on the Python loop, so that the figures are the model's, not
a kernel's (the loop and the kernels agree: tests/test_ops.py).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

import seqnorm

NORMS = ("torch", "none", "layer", "group", "batch")


def gradient_norms(norm: str, steps: int, seed: int, args) -> tuple[float, float]:
    torch.manual_seed(seed)
    if norm == "torch":
        model = torch.nn.LSTM(args.input_size, args.hidden_size, dtype=torch.float64)
    else:
        model = seqnorm.LSTM(
            args.input_size,
            args.hidden_size,
            norm=norm,
            groups=4 if norm == "group" else 1,
            dtype=torch.float64,
        )
        model.backend = "python"
    x = torch.randn(steps, args.batch, args.input_size, dtype=torch.float64, requires_grad=True)
    out, _ = model(x)
    out[-1].mean().backward()
    return x.grad[0].norm().item(), x.grad[-1].norm().item()


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, nargs="+", default=[25, 50, 100, 200])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--input_size", type=int, default=128)
    p.add_argument("--hidden_size", type=int, default=256)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    rows = []
    for steps in args.steps:
        medians = {}
        for norm in NORMS:
            runs = [gradient_norms(norm, steps, seed, args) for seed in range(args.seeds)]
            medians[norm] = [statistics.median(r[k] for r in runs) for k in (0, 1)]
        for norm in NORMS:
            first, last = medians[norm]
            rows.append(
                {
                    "steps": steps,
                    "norm": norm,
                    "grad_first": first,
                    "grad_last": last,
                    "first_vs_last": first / last,
                    "first_vs_torch": first / medians["torch"][0],
                    "last_vs_torch": last / medians["torch"][1],
                }
            )
    print(
        "| T | norm | ‖dL/dx_1‖ | ‖dL/dx_T‖ | first / last | first / torch.nn | last / torch.nn |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['steps']} | {r['norm']} | {r['grad_first']:.2e} | {r['grad_last']:.2e} | "
            f"{r['first_vs_last']:.3g} | {r['first_vs_torch']:.3g} | {r['last_vs_torch']:.3g} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
