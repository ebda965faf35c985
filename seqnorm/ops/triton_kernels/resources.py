"""Compile every Triton kernel ahead of time for a GPU architecture, on any machine (no GPU
needed: the Triton wheel carries ptxas), and report the registers, spills and shared memory each
uses, at the hidden sizes asked for. The launch configurations (block sizes, warps) are the
drivers' own.

    python -m seqnorm.ops.triton_kernels.resources --arch 80 90 --hidden 256 512 768 2048

Must run without ``TRITON_INTERPRET`` (the interpreter does not compile).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import gru, lstm, norms
from .recurrence import block_columns, num_warps_for

SCALARS = {"eps": "fp32", "N": "i32", "t": "i32", "steps": "i32", "training": "i32"}


def kernels(hidden: int, batch: int = 64, groups: int = 4):
    """(name, kernel, constexprs, num_warps) of every launch the drivers make at this size."""
    bh = triton.next_power_of_2(hidden)
    bn, bj = block_columns(batch, hidden)
    rows = {"H": hidden, "BH": bh, "G": groups, "NORMED": True, "HAS_MASK": True, "ACC": tl.float32}
    batch_norm = {"H": hidden, "BN": bn, "BJ": bj, "HAS_MASK": True, "ACC": tl.float32}
    for gates, name in ((4, "lstm"), (3, "gru")):
        features = gates * hidden
        bf = triton.next_power_of_2(features)
        fbn, fbj = block_columns(batch, features)
        yield (
            f"input_forward_rows[{name}]",
            norms.input_forward_rows,
            {"F": features, "BF": bf, "G": groups, "HAS_BIAS": True, "ACC": tl.float32},
            num_warps_for(bf),
        )
        yield (
            f"input_backward_rows[{name}]",
            norms.input_backward_rows,
            {"F": features, "BF": bf, "G": groups, "ACC": tl.float32},
            num_warps_for(bf),
        )
        yield (
            f"input_forward_batch[{name}]",
            norms.input_forward_batch,
            {
                "F": features,
                "BN": fbn,
                "BJ": fbj,
                "HAS_MASK": True,
                "HAS_BIAS": True,
                "ACC": tl.float32,
            },
            num_warps_for(fbn * fbj),
        )
        yield (
            f"input_backward_batch[{name}]",
            norms.input_backward_batch,
            {"F": features, "BN": fbn, "BJ": fbj, "HAS_MASK": True, "ACC": tl.float32},
            num_warps_for(fbn * fbj),
        )
    yield "lstm_step_rows", lstm.lstm_step_rows, {**rows, "PROJ": False}, num_warps_for(4 * bh)
    yield (
        "lstm_step_rows_backward",
        lstm.lstm_step_rows_backward,
        {**rows, "PROJ": False},
        num_warps_for(4 * bh),
    )
    yield (
        "lstm_step_batch",
        lstm.lstm_step_batch,
        {**batch_norm, "PROJ": False},
        num_warps_for(bn * bj),
    )
    yield (
        "lstm_step_batch_backward",
        lstm.lstm_step_batch_backward,
        {**batch_norm, "PROJ": False},
        num_warps_for(bn * bj),
    )
    yield "gru_step_rows", gru.gru_step_rows, {**rows, "HAS_BIAS": True}, num_warps_for(4 * bh)
    yield "gru_step_rows_backward", gru.gru_step_rows_backward, rows, num_warps_for(4 * bh)
    yield (
        "gru_step_batch",
        gru.gru_step_batch,
        {**batch_norm, "HAS_BIAS": True},
        num_warps_for(bn * bj),
    )
    yield "gru_step_batch_backward", gru.gru_step_batch_backward, batch_norm, num_warps_for(bn * bj)


def compile_kernel(kernel, constexprs: dict, num_warps: int, arch: int) -> dict:
    """Compile for ``sm_{arch}``; return registers, spill bytes and shared memory (bytes)."""
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in SCALARS:
            signature[name] = SCALARS[name]
        else:
            signature[name] = "*i1" if name == "MASK" else "*fp32"
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps}
    )
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as f:
        f.write(compiled.asm["ptx"])
        f.flush()
        gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        report = subprocess.run(
            [ptxas, "--gpu-name", gpu, "-v", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", report))
    return {
        "registers": registers,
        "spill_bytes": spills,
        "shared_bytes": compiled.metadata.shared,
        "num_warps": num_warps,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    p.add_argument("--hidden", type=int, nargs="+", default=[256, 512, 768, 2048])
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        p.error("unset TRITON_INTERPRET: the interpreter compiles nothing")
    rows = []
    for arch in args.arch:
        for hidden in args.hidden:
            for name, kernel, constexprs, warps in kernels(hidden):
                row = {
                    "arch": arch,
                    "hidden": hidden,
                    "kernel": name,
                    **compile_kernel(kernel, constexprs, warps, arch),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
