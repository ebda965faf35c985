"""Speed and memory of seqnorm's LSTM and GRU against torch.nn and a naive per-step loop.

    python benchmarks/bench_rnn.py --json runs/bench_rnn.json
    python benchmarks/bench_rnn.py --device cuda --json runs/bench_rnn_cuda.json   # cuDNN
    python benchmarks/bench_rnn.py --device cuda --autocast bf16                   # bf16
    python benchmarks/bench_rnn.py --malloc steady   # no page faults from the C library's malloc

For each shape (A: batch 32, 100 steps, input 128, hidden 256; B: the same at batch 1, pure SGD;
C: batch 64, 200 steps, input 256, hidden 512; D: batch 16, 1024 steps, 768 -> 768) and each
implementation (CPU: A, B, C; CUDA: A, C, D, with seqnorm's Python loop beside its kernels, and
TF32 off for every product unless ``--tf32``) it measures the forward
pass in eval mode without gradients, and forward plus backward in training mode (median of
``--repeats`` runs after ``--warmup`` runs, interleaved: each round runs every implementation of
the shape once), and the peak memory allocated during one training step (from the profiler's
allocation events; on CUDA the caching allocator's peak). Ratios are against ``torch.nn.LSTM``
for LSTMs and ``torch.nn.GRU`` for GRUs (cuDNN's on CUDA), measured in the same run. The naive
loop is how most public CPU implementations of layer-normalized cells work: ``nn.Linear`` and
``nn.LayerNorm`` modules called at every step; the naive BN loop the same with per-step
``nn.BatchNorm1d`` modules, as recurrent batch norm is usually written.

It also counts the page faults of each timed run (the table shows a training step's median).
glibc's malloc hands large blocks back to the system when they are freed, so a model that
allocates large buffers at every step touches fresh pages, and pays for a fault on each, every
time: ``torch.nn.LSTM`` at A takes about 8,000 faults (32 MB) per training step, while seqnorm's
kernel reuses its buffers and takes none. ``--malloc steady`` keeps freed memory in the process
(as jemalloc or tcmalloc do), so that the ratios compare the computations alone.

On CPU every timed run starts with cold caches (``--caches cold``, the default): a buffer twice
the size of the last-level cache is read and written first, so that no run finds in cache what
the run before it left there. Left as they are (``--caches as-left``), a model that follows one
of its kind finds its buffers warm (seqnorm's kernel hands the same cached buffers to each of its
models), and a ratio depends on which row comes before it (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import ctypes
import glob
import json
import os
import platform
import resource
import statistics
import time
from typing import NamedTuple

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import seqnorm

CPU = torch.device("cpu")
SHAPES = {  # batch, steps, input, hidden
    "A": (32, 100, 128, 256),
    "B": (1, 100, 128, 256),
    "C": (64, 200, 256, 512),
    "D": (16, 1024, 768, 768),
}
DEFAULT_SHAPES = {"cpu": ["A", "B", "C"], "cuda": ["A", "C", "D"]}
AUTOCAST = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class NaiveLNLSTM(nn.Module):
    """Layer-normalized LSTM (Ba et al. 2016) as a Python loop of nn.Linear and nn.LayerNorm."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih, self.hh = (
            nn.Linear(input_size, 4 * hidden_size),
            nn.Linear(hidden_size, 4 * hidden_size),
        )
        self.ln_ih, self.ln_hh = nn.LayerNorm(4 * hidden_size), nn.LayerNorm(4 * hidden_size)
        self.ln_c = nn.LayerNorm(hidden_size)
        self.hidden_size = hidden_size

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], self.hidden_size)
        outputs = []
        for x_t in x:
            gates = self.ln_ih(self.ih(x_t)) + self.ln_hh(self.hh(h))
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.ln_c(c))
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class NaiveBNLSTM(nn.Module):
    """Recurrent batch-normalized LSTM (Cooijmans et al. 2016) as a Python loop of nn.Linear and
    nn.BatchNorm1d: each step its own BatchNorm1d modules (statistics per step), gains shared."""

    def __init__(self, input_size, hidden_size, max_steps=1000):
        super().__init__()
        self.ih = nn.Linear(input_size, 4 * hidden_size, bias=False)
        self.hh = nn.Linear(hidden_size, 4 * hidden_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(4 * hidden_size))
        self.gain_ih, self.gain_hh, self.gain_c = (
            nn.Parameter(torch.full((n,), 0.1))
            for n in (4 * hidden_size, 4 * hidden_size, hidden_size)
        )
        self.shift_c = nn.Parameter(torch.zeros(hidden_size))
        self.bn_ih, self.bn_hh, self.bn_c = (
            nn.ModuleList(nn.BatchNorm1d(n, affine=False) for _ in range(max_steps))
            for n in (4 * hidden_size, 4 * hidden_size, hidden_size)
        )
        self.hidden_size = hidden_size

    def forward(self, x):
        h = c = x.new_zeros(x.shape[1], self.hidden_size)
        outputs = []
        for t, x_t in enumerate(x):
            k = min(t, len(self.bn_c) - 1)  # later steps share the last statistics
            gates = (
                self.gain_ih * self.bn_ih[k](self.ih(x_t))
                + self.gain_hh * self.bn_hh[k](self.hh(h))
                + self.bias
            )
            i, f, g, o = gates.chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.gain_c * self.bn_c[k](c) + self.shift_c)
            outputs.append(h)
        return torch.stack(outputs), (h, c)


class NaiveLNGRU(nn.Module):
    """Layer-normalized GRU as a Python loop of nn.Linear and nn.LayerNorm."""

    def __init__(self, input_size, hidden_size):
        super().__init__()
        self.ih, self.hh = (
            nn.Linear(input_size, 3 * hidden_size),
            nn.Linear(hidden_size, 3 * hidden_size),
        )
        self.ln_ih, self.ln_hh = nn.LayerNorm(3 * hidden_size), nn.LayerNorm(3 * hidden_size)
        self.hidden_size = hidden_size

    def forward(self, x):
        h = x.new_zeros(x.shape[1], self.hidden_size)
        outputs = []
        for x_t in x:
            xr, xz, xn = self.ln_ih(self.ih(x_t)).chunk(3, 1)
            hr, hz, hn = self.ln_hh(self.hh(h)).chunk(3, 1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h = (1 - z) * torch.tanh(xn + r * hn) + z * h
            outputs.append(h)
        return torch.stack(outputs), h


def python_loop(cls, **kw):
    """seqnorm's layer on its readable per-step Python loop (backend "python")."""

    def make(input_size, hidden_size):
        model = getattr(seqnorm, cls)(input_size, hidden_size, **kw)
        model.backend = "python"
        return model

    return make


# name -> (family, factory(input, hidden)); the first of each family is its baseline.
IMPLEMENTATIONS = {
    "torch.nn.LSTM": ("LSTM", lambda i, h: nn.LSTM(i, h)),
    "naive LN-LSTM loop": ("LSTM", NaiveLNLSTM),
    "seqnorm LSTM (no norm)": ("LSTM", lambda i, h: seqnorm.LSTM(i, h, norm="none")),
    "seqnorm LN-LSTM": ("LSTM", lambda i, h: seqnorm.LSTM(i, h, norm="layer")),
    "seqnorm GN-LSTM (4 groups)": ("LSTM", lambda i, h: seqnorm.LSTM(i, h, norm="group", groups=4)),
    "seqnorm BN-LSTM": ("LSTM", lambda i, h: seqnorm.LSTM(i, h, norm="batch")),
    "naive BN-LSTM loop": ("LSTM", NaiveBNLSTM),
    "torch.nn.GRU": ("GRU", lambda i, h: nn.GRU(i, h)),
    "naive LN-GRU loop": ("GRU", NaiveLNGRU),
    "seqnorm LN-GRU": ("GRU", lambda i, h: seqnorm.GRU(i, h, norm="layer")),
    "seqnorm GN-GRU (4 groups)": ("GRU", lambda i, h: seqnorm.GRU(i, h, norm="group", groups=4)),
    "seqnorm LN-LSTM, Python loop": ("LSTM", python_loop("LSTM", norm="layer")),
    "seqnorm BN-LSTM, Python loop": ("LSTM", python_loop("LSTM", norm="batch")),
    "seqnorm LN-GRU, Python loop": ("GRU", python_loop("GRU", norm="layer")),
}
GPU_ONLY = [name for name in IMPLEMENTATIONS if name.endswith("Python loop")]
"""On CPU the naive loops stand for the Python loop; on the GPU it is the one to beat 20x."""


class Timing(NamedTuple):
    ms: float  # median milliseconds of a run
    faults: int  # median page faults of a run (CPU; the process's, every thread's)


def interleaved_medians(fns: dict, warmup: int, repeats: int, before=None) -> dict[str, Timing]:
    """Median milliseconds and page faults of each of ``fns`` over ``repeats`` rounds, after
    ``warmup`` rounds. Each round runs every function once, so that a machine that slows down for
    a while (a noisy neighbour on a shared host) slows them all alike instead of skewing one
    ratio. ``before(name)``, if given, runs before each call, outside its time and faults."""
    times = {name: [] for name in fns}
    faults = {name: [] for name in fns}
    for k in range(warmup + repeats):
        for name, fn in fns.items():
            if before is not None:
                before(name)
            faults_before = _page_faults()
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if k >= warmup:
                times[name].append(elapsed)
                faults[name].append(_page_faults() - faults_before)
    return {
        name: Timing(1000 * statistics.median(times[name]), int(statistics.median(faults[name])))
        for name in fns
    }


def last_level_cache_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The size of CPU 0's highest-level cache, from sysfs (Linux), or 32 MiB where it says
    nothing."""
    sizes = {}
    for index in sorted(glob.glob(f"{root}/index*")):
        try:
            with open(f"{index}/level") as f:
                level = int(f.read())
            with open(f"{index}/size") as f:
                text = f.read().strip()
        except (OSError, ValueError):
            continue
        units = {"K": 2**10, "M": 2**20, "G": 2**30}
        value = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
        sizes[level] = max(sizes.get(level, 0), value)
    return sizes[max(sizes)] if sizes else 32 * 2**20


class CacheFlush:
    """Called, evicts the process's data from the CPU caches: reads and writes a buffer twice the
    last-level cache (at least 64 MiB), its pages mapped here once."""

    def __init__(self):
        self.buffer = torch.zeros(max(64 * 2**20, 2 * last_level_cache_bytes()) // 4)

    def __call__(self) -> None:
        self.buffer.add_(1.0)


def _page_faults() -> int:
    """The page faults of this process so far: minor ones (the kernel maps a fresh page) and
    major ones (it reads one from disk)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt + usage.ru_majflt


def peak_mb(fn, device: torch.device = CPU) -> float:
    """Peak of the bytes allocated and not yet freed while ``fn`` runs. On CPU: the running sum of
    the profiler's allocation records (one per allocation and free, in time order). Summing ops'
    ``self_cpu_memory_usage`` instead would place a nested op's frees at its start: autograd frees
    saved tensors at the end of a backward node that began before the node's own allocations, so
    backward peaks went uncounted (``torch.nn.LSTM`` at A read 52 MB where it peaks at 74). On
    CUDA: the caching allocator's peak of allocated bytes, less what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    records = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for record in sorted(records, key=lambda e: e.start_ns()):
        live += record.nbytes()
        peak = max(peak, live)
    return peak / 2**20


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(nbytes: int = 2**30) -> None:
    """Make glibc's malloc keep freed memory for reuse instead of returning it to the system:
    blocks below ``nbytes`` come from the heap, not from their own mmap, and the heap's top is
    not trimmed. Raises RuntimeError where the C library is not glibc or refuses."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as err:
        raise RuntimeError(f"glibc's mallopt is not available here: {err}") from None
    for name, param in (
        ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD),
        ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD),
    ):
        if mallopt(param, ctypes.c_int(nbytes)) != 1:
            raise RuntimeError(f"glibc's mallopt refused {name}={nbytes}")


def steady_step(step, device: torch.device):
    """A training step as it runs in a long job: on CUDA three steps (the first runs seqnorm's
    loops as they are, the second captures them in CUDA graphs, the third replays them; every
    implementation runs three), so that after release_graphs() the memory the graphs keep counts
    in the step's peak; on CPU the step itself."""
    if device.type != "cuda":
        return step
    return lambda: [step() for _ in range(3)]


def release_graphs(device: torch.device) -> None:
    """Release every CUDA graph seqnorm has captured (and the memory they hold)."""
    if seqnorm.ops.choose(None, torch.zeros(1, 1, 1, device=device), [], False) == "triton":
        from seqnorm.ops.triton_kernels import clear_graphs

        clear_graphs()


def synchronized(fn, device: torch.device):
    """``fn`` followed by waiting for the device, so that a timer sees its kernels finish."""
    if device.type != "cuda":
        return fn

    def run():
        fn()
        torch.cuda.synchronize(device)

    return run


def measure_shape(shape: str, names: list[str], args) -> dict:
    """Forward ms (eval, no grad), forward+backward ms (training) and peak MB of a training step
    of every implementation in ``names`` at ``shape``, timed in interleaved rounds."""
    batch, steps, input_size, hidden = SHAPES[shape]
    device = args.device
    if device.type == "cuda":
        release_graphs(device)  # the last shape's: theirs is memory this one may need
    seed = torch.Generator().manual_seed(0)
    x = torch.randn(steps, batch, input_size, generator=seed).to(device)
    models = {}
    for name in names:
        torch.manual_seed(0)
        models[name] = IMPLEMENTATIONS[name][1](input_size, hidden).to(device)

    autocast = lambda: torch.autocast(
        device.type, dtype=AUTOCAST[args.autocast], enabled=args.autocast != "none"
    )

    def forward(model):
        def run():
            with torch.no_grad(), autocast():
                model(x)

        return synchronized(run, device)

    def train_step(model):
        def run():
            with autocast():
                output, _ = model(x)
            output.float().sum().backward()

        return synchronized(run, device)

    flush = CacheFlush() if device.type == "cpu" and args.caches == "cold" else lambda: None
    for model in models.values():
        model.eval()
    fwd = interleaved_medians(
        {name: forward(model) for name, model in models.items()},
        args.warmup,
        args.repeats,
        before=lambda name: flush(),
    )
    # batch norm has no batch statistics at batch size 1
    trainable = {name: model for name, model in models.items() if not ("BN" in name and batch == 1)}
    for model in trainable.values():
        model.train()
    fwd_bwd = interleaved_medians(
        {name: train_step(model) for name, model in trainable.items()},
        args.warmup,
        args.repeats,
        before=lambda name: (models[name].zero_grad(set_to_none=True), flush()),
    )
    results = {}
    for name, model in models.items():
        model.zero_grad(set_to_none=True)
        trained = name in trainable
        # seqnorm's kernel keeps freed step buffers for reuse, and one kept by another model
        # here may be larger than this one needs: measure this model's own (on CUDA, its own
        # graphs, captured within the measurement)
        if device.type == "cpu":
            seqnorm.ops.empty_cache()
        else:
            release_graphs(device)
        results[name] = {
            "fwd_ms": fwd[name].ms,
            "fwd_bwd_ms": fwd_bwd[name].ms if trained else None,
            "fwd_faults": fwd[name].faults,
            "fwd_bwd_faults": fwd_bwd[name].faults if trained else None,
            "peak_mb": peak_mb(steady_step(train_step(model), device), device) if trained else None,
        }
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--shapes",
        nargs="+",
        default=None,
        choices=list(SHAPES),
        help="default: A B C on CPU, A C D on CUDA",
    )
    p.add_argument(
        "--only",
        nargs="+",
        default=None,
        choices=list(IMPLEMENTATIONS),
        help="default: all (on CPU without the Python-loop rows)",
    )
    p.add_argument(
        "--autocast",
        default="none",
        choices=list(AUTOCAST),
        help="autocast dtype (on CPU the C++ kernel computes in float32 under it)",
    )
    p.add_argument(
        "--tf32", action="store_true", help="let CUDA products use TF32 (off by default)"
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--device", type=_device, default="cpu", help="cpu (default) or cuda[:index]")
    p.add_argument(
        "--malloc",
        default="glibc",
        choices=["glibc", "steady"],
        help="glibc: the C library's malloc as it comes (default); steady: keep freed memory in "
        "the process, so that no implementation pays page faults for memory it allocates again",
    )
    p.add_argument(
        "--caches",
        default="cold",
        choices=["cold", "as-left"],
        help="CPU caches at the start of each timed run: cold (default; evicted by reading and "
        "writing a buffer twice the last-level cache) or as the run before left them",
    )
    p.add_argument(
        "--cuda-graphs",
        type=int,
        default=64,
        help="places for seqnorm's CUDA graphs (SEQNORM_CUDA_GRAPHS) while benchmarking on CUDA: "
        "enough for the loops of every model here, so that each replays its own graphs, as in a "
        "job that trains one model (the default of 8 would hold the loops of two)",
    )
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="steps per CUDA graph and backward window of seqnorm's Triton path "
        "(SEQNORM_TRITON_WINDOW; default: the library's, 32)",
    )
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.cuda_graphs < 0:
        p.error(f"argument --cuda-graphs: expected a count >= 0, got {args.cuda_graphs}")
    if args.window is not None:
        if args.window < 2 or args.window % 2:
            p.error(f"argument --window: expected an even number of steps >= 2, got {args.window}")
        os.environ["SEQNORM_TRITON_WINDOW"] = str(args.window)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        p.error(f"argument --device: {args.device} was asked for, but CUDA is not available here")
    args.shapes = args.shapes or DEFAULT_SHAPES[args.device.type]
    args.only = args.only or [
        n for n in IMPLEMENTATIONS if args.device.type == "cuda" or n not in GPU_ONLY
    ]
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.device.type == "cuda":
        os.environ["SEQNORM_CUDA_GRAPHS"] = str(args.cuda_graphs)
    torch.set_num_threads(args.threads)
    if args.malloc == "steady":
        try:
            keep_freed_memory()
        except RuntimeError as err:
            p.error(f"argument --malloc: {err}")
    backend = seqnorm.ops.choose(None, torch.zeros(1, 1, 1, device=args.device), [], False)
    print(f"seqnorm backend: {backend}")  # on CPU this builds the kernel before anything is timed
    rows = []
    for shape in args.shapes:
        base = {}
        measured = measure_shape(shape, args.only, args)
        for name in args.only:
            family = IMPLEMENTATIONS[name][0]
            row = {"shape": shape, "implementation": name, **measured[name]}
            base.setdefault(family, row)
            b = base[family]
            row["fwd_ratio"] = row["fwd_ms"] / b["fwd_ms"]
            row["fwd_bwd_ratio"] = row["fwd_bwd_ms"] and row["fwd_bwd_ms"] / b["fwd_bwd_ms"]
            row["peak_ratio"] = row["peak_mb"] and row["peak_mb"] / b["peak_mb"]
            rows.append(row)
            print(_line(row), flush=True)
    machine = {
        "processor": platform.processor() or platform.machine(),
        "cpu": _cpu_model(),
        "device": torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu",
        "threads": args.threads,
        "torch": torch.__version__,
        "seqnorm_backend": backend,
        "autocast": args.autocast,
        "tf32": args.tf32,
        "malloc": args.malloc,
        "caches": args.caches if args.device.type == "cpu" else "n/a",
        "last_level_cache_mb": last_level_cache_bytes() / 2**20,
    }
    if args.device.type == "cuda":
        machine["cuda_graphs"] = args.cuda_graphs
        from seqnorm.ops.triton_kernels.graphs import window

        machine["window"] = window()
    if backend == "cpp":
        machine["per_step_products"] = per_step_ways(args.shapes)
    print(f"\n{machine}\n")
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            settings = {**vars(args), "device": str(args.device)}
            json.dump({"machine": machine, "args": settings, "rows": rows}, f, indent=2)


def per_step_ways(shapes: list[str]) -> dict[str, dict[str, str]]:
    """How the C++ kernel runs each per-step float32 product at each shape, as it chose on this
    machine (packed, brgemm or mm; SEQNORM_CPU_PRODUCT may decide): h W_hh^T forward and
    dgh W_hh backward, for the LSTM (4H gates) and the GRU (3H)."""
    way = torch.ops.seqnorm_cpp.per_step_product
    ways = {}
    for shape in shapes:
        batch, _, _, hidden = SHAPES[shape]
        ways[shape] = {
            f"{cell} {direction}": way(*dims, batch)
            for cell, gates in (("LSTM", 4 * hidden), ("GRU", 3 * hidden))
            for direction, dims in (("forward", (gates, hidden)), ("backward", (hidden, gates)))
        }
    return ways


def _cpu_model() -> str:
    """The CPU's model name and widest vector extension (Linux), for the record."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return platform.machine()
    name = next(
        (
            line.split(":", 1)[1].strip()
            for line in info.splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    flags = next(
        (line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")),
        [],
    )
    return (
        f"{name} ({'avx512f' if 'avx512f' in flags else 'avx2' if 'avx2' in flags else 'no avx2'})"
    )


def _device(value: str) -> torch.device:
    """--device: a torch device string, cpu or cuda."""
    try:
        device = torch.device(value)
    except RuntimeError as err:
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: {err}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{value!r}: expected cpu or cuda[:index]")
    return device


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def _line(r: dict) -> str:
    return (
        f"{r['shape']} {r['implementation']:<28} fwd {_fmt(r['fwd_ms'], '8.1f')} ms "
        f"({_fmt(r['fwd_ratio'], '.2f')}x)  fwd+bwd {_fmt(r['fwd_bwd_ms'], '8.1f')} ms "
        f"({_fmt(r['fwd_bwd_ratio'], '.2f')}x) {_fmt(r['fwd_bwd_faults'], '6d')} faults  "
        f"peak {_fmt(r['peak_mb'], '7.1f')} MB "
        f"({_fmt(r['peak_ratio'], '.2f')}x)"
    )


def table(rows: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| shape | implementation | fwd ms | fwd ratio | fwd+bwd ms | fwd+bwd ratio | faults/step "
        "| peak MB | peak ratio |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        cells = [
            _fmt(r["fwd_ms"], ".1f"),
            _fmt(r["fwd_ratio"], ".2f"),
            _fmt(r["fwd_bwd_ms"], ".1f"),
            _fmt(r["fwd_bwd_ratio"], ".2f"),
            _fmt(r["fwd_bwd_faults"], "d"),
            _fmt(r["peak_mb"], ".1f"),
            _fmt(r["peak_ratio"], ".2f"),
        ]
        lines.append(f"| {r['shape']} | {r['implementation']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
