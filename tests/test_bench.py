"""benchmarks/bench_rnn.py on a tiny shape: it runs every implementation, its naive loops compute
the cells they stand for, its peak-memory count sees what a step allocates, and its page-fault
count and ``--malloc steady`` see and remove the faults of memory allocated afresh."""

import importlib.util
import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import seqnorm

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_rnn.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_rnn", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peak_counts_an_allocation_freed_before_the_end(bench):
    def step():
        a = torch.ones(2**20)  # 4 MiB, freed at once
        del a
        b = torch.ones(2**19)  # 2 MiB: the peak stays the first allocation
        return b.sum()

    assert 4.0 <= bench.peak_mb(step) < 4.5


def test_peak_counts_buffers_from_seqnorms_cache(bench):
    """The kernel's step buffers (2 MiB of gates here) come from its cache and count while in
    use: the peak is the one measured with the cache off, where they come from PyTorch."""
    model = seqnorm.LSTM(8, 64, norm="layer")
    x = torch.randn(32, 64, 8)

    def step():
        model(x)[0].sum().backward()

    limit = seqnorm.ops.cache_info()["limit"]
    try:
        seqnorm.ops.empty_cache()
        cached = bench.peak_mb(step)
        assert seqnorm.ops.cache_info()["cached"] > 0  # the buffers did come from the cache
        seqnorm.ops.set_cache_limit(0)
        assert cached == pytest.approx(bench.peak_mb(step), abs=0.01) and cached > 6
    finally:
        seqnorm.ops.set_cache_limit(limit)


def test_interleaved_medians_count_the_page_faults_of_each_function(bench):
    pages = 256

    def touch_fresh_pages():  # a new mapping, written page by page: one fault each
        with mmap.mmap(-1, pages * mmap.PAGESIZE) as m:
            for k in range(pages):
                m[k * mmap.PAGESIZE] = 1

    timings = bench.interleaved_medians({"fresh": touch_fresh_pages, "idle": lambda: None}, 1, 3)
    assert pages <= timings["fresh"].faults < pages + 64
    assert timings["idle"].faults < 16
    assert timings["fresh"].ms > 0


def test_interleaved_medians_time_each_call_without_what_runs_before_it(bench):
    calls = []
    timings = bench.interleaved_medians(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
        1,
        2,
        before=lambda name: (calls.append(f"before {name}"), time.sleep(0.05)),
    )
    assert calls == ["before a", "a", "before b", "b"] * 3
    assert timings["a"].ms < 25 and timings["b"].ms < 25  # the 50 ms sleeps are not counted


@pytest.mark.parametrize("caches, flushes", [("cold", 2 * 2 * 2), ("as-left", 0)])
def test_every_timed_run_starts_with_flushed_caches_unless_asked(
    bench, monkeypatch, caches, flushes
):
    """--caches cold (the default) flushes the CPU caches before each run of each model, forward
    and training step (here 2 models x 2 rounds x 2); as-left never."""
    count = []
    monkeypatch.setattr(bench.CacheFlush, "__call__", lambda self: count.append(1))
    monkeypatch.setattr(bench, "SHAPES", {"T": (3, 4, 5, 8)})
    monkeypatch.setattr(bench, "peak_mb", lambda fn, device=None: 1.0)
    argv = ["bench_rnn.py", "--shapes", "T", "--warmup", "1", "--repeats", "1", "--only"]
    argv += ["torch.nn.LSTM", "seqnorm LN-LSTM", "--caches", caches]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert len(count) == flushes


def test_the_flush_buffer_is_twice_the_last_level_cache(bench, tmp_path, monkeypatch):
    """The last-level cache's size comes from sysfs (the highest level's largest; K, M or plain
    bytes), 32 MiB where sysfs says nothing; the flush writes twice that, at least 64 MiB."""
    for k, (level, size) in enumerate([("1", "48K"), ("2", "1024K"), ("3", "48M"), ("3", "8M")]):
        (tmp_path / f"index{k}").mkdir()
        (tmp_path / f"index{k}" / "level").write_text(level + "\n")
        (tmp_path / f"index{k}" / "size").write_text(size + "\n")
    assert bench.last_level_cache_bytes(str(tmp_path)) == 48 * 2**20
    assert bench.last_level_cache_bytes(str(tmp_path / "none")) == 32 * 2**20
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 48 * 2**20)
    assert bench.CacheFlush().buffer.numel() * 4 == 96 * 2**20
    monkeypatch.setattr(bench, "last_level_cache_bytes", lambda: 16 * 2**20)
    assert bench.CacheFlush().buffer.numel() * 4 == 64 * 2**20


@pytest.mark.slow
def test_keep_freed_memory_removes_the_faults_of_allocating_again():
    """A 64 MiB tensor allocated again after a free: glibc maps it afresh (a fault per page)
    until keep_freed_memory, after which the freed block is reused (in a child process, as the
    setting stays for the life of the process)."""
    code = f"""
import importlib.util, torch
spec = importlib.util.spec_from_file_location("bench_rnn", {str(BENCH)!r})
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

def again():
    first = torch.ones(2**24)
    del first
    before = bench._page_faults()
    second = torch.ones(2**24)
    return bench._page_faults() - before

print(again())
bench.keep_freed_memory()
again()  # where the heap cannot grow in place, glibc maps the first block (once)
print(again())
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    fresh, kept = map(int, result.stdout.split())
    pages = 2**26 // mmap.PAGESIZE
    assert fresh >= pages // 2  # huge pages may serve part of it with fewer faults
    assert kept < pages // 16


@pytest.mark.parametrize(("cls", "naive_cls"), [("LSTM", "NaiveLNLSTM"), ("GRU", "NaiveLNGRU")])
def test_naive_loops_are_the_layer_normalized_cells(bench, cls, naive_cls):
    """The baselines do the work they stand for: seqnorm's LN cell with the same weights (biases
    zero, which the naive loops would normalize away; norms at their initial gains and shifts)."""
    naive = getattr(bench, naive_cls)(3, 4).double()
    ours = getattr(seqnorm, cls)(3, 4, norm="layer", dtype=torch.float64)
    with torch.no_grad():
        for p in (naive.ih.bias, naive.hh.bias, ours.bias_ih_l0, ours.bias_hh_l0):
            p.zero_()
        ours.weight_ih_l0.copy_(naive.ih.weight)
        ours.weight_hh_l0.copy_(naive.hh.weight)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    (out, state), (naive_out, naive_state) = ours(x), naive(x)
    torch.testing.assert_close(out, naive_out)
    states = state if cls == "LSTM" else (state,)
    naive_states = naive_state if cls == "LSTM" else (naive_state,)
    for got, want in zip(states, naive_states, strict=True):
        torch.testing.assert_close(got[0], want)  # seqnorm's final states are (layers, N, H)


def test_naive_bn_loop_is_the_batch_normalized_lstm(bench):
    """The naive BN loop is seqnorm's BN-LSTM with the same weights, in training (batch statistics;
    steps past max_steps share the last statistics) and in eval (the running ones it kept)."""
    naive = bench.NaiveBNLSTM(3, 4, max_steps=4).double()
    ours = seqnorm.LSTM(3, 4, norm="batch", max_steps=4, dtype=torch.float64)
    with torch.no_grad():
        ours.weight_ih_l0.copy_(naive.ih.weight)
        ours.weight_hh_l0.copy_(naive.hh.weight)
        ours.bias_hh_l0.zero_()
        for p in (ours.bias_ih_l0, naive.gain_ih, naive.gain_hh, naive.gain_c, naive.shift_c):
            p.uniform_(-1, 1)  # not the initial values, so that a swapped gain shows
        naive.bias.copy_(ours.bias_ih_l0)
        ours.norm_ih_l0.weight.copy_(naive.gain_ih)
        ours.norm_hh_l0.weight.copy_(naive.gain_hh)
        ours.norm_c_l0.weight.copy_(naive.gain_c)
        ours.norm_c_l0.bias.copy_(naive.shift_c)
    x = torch.randn(6, 5, 3, dtype=torch.float64)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        naive.train(mode == "train")
        (out, (h, c)), (naive_out, (naive_h, naive_c)) = ours(x), naive(x)
        torch.testing.assert_close(out, naive_out)
        torch.testing.assert_close(h[0], naive_h)
        torch.testing.assert_close(c[0], naive_c)


@pytest.mark.slow
def test_main_writes_a_table_and_json(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", {"T": (3, 4, 5, 8), "U": (1, 4, 5, 8)})
    out = tmp_path / "bench.json"
    argv = ["bench_rnn.py", "--shapes", "T", "U", "--warmup", "0", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["args"]["device"] == result["machine"]["device"] == "cpu"  # the default
    rows = result["rows"]
    assert len(rows) == 2 * (
        len(bench.IMPLEMENTATIONS) - len(bench.GPU_ONLY)
    )  # CPU: no Python-loop rows
    for row in rows:
        assert row["fwd_ms"] > 0
        skipped = "BN" in row["implementation"] and row["shape"] == "U"  # no batch statistics
        assert (row["fwd_bwd_ms"] is None) == skipped
        assert (row["peak_mb"] is None) == skipped
        assert (row["fwd_bwd_faults"] is None) == skipped
        assert isinstance(row["fwd_faults"], int) and row["fwd_faults"] >= 0
        if not skipped:
            assert row["fwd_bwd_ms"] > 0 and row["peak_mb"] > 0 and row["fwd_bwd_faults"] >= 0
    baselines = [r for r in rows if r["implementation"] in ("torch.nn.LSTM", "torch.nn.GRU")]
    assert len(baselines) == 4
    assert all(r["fwd_ratio"] == r["fwd_bwd_ratio"] == r["peak_ratio"] == 1.0 for r in baselines)
    table = capsys.readouterr().out
    assert "| U | seqnorm BN-LSTM |" in table and "| U | naive BN-LSTM loop |" in table
    assert "n/a" in table and "| faults/step |" in table
    assert result["machine"]["malloc"] == "glibc"  # the default: malloc as it comes
    assert result["machine"]["caches"] == "cold"  # the default: flushed before every timed run
    assert result["machine"]["last_level_cache_mb"] > 0
    assert result["args"]["cuda_graphs"] == 64 and "cuda_graphs" not in result["machine"]
    ways = result["machine"]["per_step_products"]  # as the kernel chose them (or was told)
    assert ways.keys() == {"T", "U"} and len(ways["T"]) == 4
    assert set(ways["T"].values()) <= {"packed", "brgemm", "mm"}


def test_malloc_steady_keeps_freed_memory_or_says_why_not(bench, monkeypatch, capsys):
    monkeypatch.setattr(bench, "SHAPES", {"T": (3, 4, 5, 8)})
    calls = []
    monkeypatch.setattr(bench, "keep_freed_memory", lambda: calls.append(True))
    argv = ["bench_rnn.py", "--shapes", "T", "--warmup", "0", "--repeats", "1"]
    monkeypatch.setattr(sys, "argv", [*argv, "--only", "torch.nn.LSTM", "--malloc", "steady"])
    bench.main()
    assert calls == [True] and "'malloc': 'steady'" in capsys.readouterr().out

    def refuse():
        raise RuntimeError("glibc's mallopt refused M_MMAP_THRESHOLD=1073741824")

    monkeypatch.setattr(bench, "keep_freed_memory", refuse)
    with pytest.raises(SystemExit):
        bench.main()
    assert (
        "argument --malloc: glibc's mallopt refused M_MMAP_THRESHOLD=1073741824"
        in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [("tpu", "argument --device: 'tpu' is not a device"), ("meta", "expected cpu or cuda")],
)
def test_device_rejects_what_is_not_cpu_or_cuda(bench, monkeypatch, capsys, value, message):
    monkeypatch.setattr(sys, "argv", ["bench_rnn.py", "--device", value])
    with pytest.raises(SystemExit):
        bench.main()
    assert message in capsys.readouterr().err


def test_cuda_graphs_must_be_a_count(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_rnn.py", "--cuda-graphs", "-1"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "argument --cuda-graphs: expected a count >= 0, got -1" in capsys.readouterr().err


@pytest.mark.parametrize("steps", ["3", "0"])
def test_the_window_must_be_an_even_count(bench, monkeypatch, capsys, steps):
    monkeypatch.setattr(sys, "argv", ["bench_rnn.py", "--window", steps])
    with pytest.raises(SystemExit):
        bench.main()
    expected = f"argument --window: expected an even number of steps >= 2, got {steps}"
    assert expected in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests the message on a machine without CUDA")
def test_device_cuda_without_cuda_says_so(bench, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["bench_rnn.py", "--device", "cuda"])
    with pytest.raises(SystemExit):
        bench.main()
    assert (
        "argument --device: cuda was asked for, but CUDA is not available"
        in capsys.readouterr().err
    )


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_main_on_cuda(bench, tmp_path, monkeypatch):
    """The same tiny run on the GPU: models and input on the device, times synchronized, peaks from
    the CUDA allocator (a 4 MiB tensor freed before a 2 MiB one peaks at 4 MiB there too)."""
    device = torch.device("cuda")

    def step():
        a = torch.ones(2**20, device=device)
        del a
        return torch.ones(2**19, device=device).sum()

    assert 4.0 <= bench.peak_mb(step, device) < 4.5
    monkeypatch.setenv("SEQNORM_CUDA_GRAPHS", "4")  # restored after main sets it
    monkeypatch.setenv("SEQNORM_TRITON_WINDOW", "32")  # likewise
    monkeypatch.setattr(bench, "SHAPES", {"T": (3, 4, 5, 8)})
    out = tmp_path / "bench.json"
    argv = ["bench_rnn.py", "--shapes", "T", "--warmup", "0", "--repeats", "1", "--device", "cuda"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    bench.main()
    result = json.loads(out.read_text())
    assert result["args"]["device"] == "cuda"
    assert result["machine"]["device"] == torch.cuda.get_device_name(device)
    assert result["machine"]["seqnorm_backend"] == "triton"
    assert len(result["rows"]) == len(bench.IMPLEMENTATIONS)  # the Python-loop rows too
    assert all(r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["peak_mb"] > 0 for r in result["rows"])
    assert result["machine"]["cuda_graphs"] == 64 and result["machine"]["caches"] == "n/a"
    assert os.environ["SEQNORM_CUDA_GRAPHS"] == "64"  # a place for every loop of the run
    assert result["machine"]["window"] == 32
    argv += ["--autocast", "bf16", "--cuda-graphs", "0", "--window", "2"]
    monkeypatch.setattr(sys, "argv", [*argv, "--json", str(out)])
    bench.main()
    assert os.environ["SEQNORM_CUDA_GRAPHS"] == "0"
    assert json.loads(out.read_text())["machine"]["window"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_a_training_step_peaks_below_torch_nn(bench, norm):
    """Memory, not time (allocation sizes are deterministic): a training step of seqnorm's LSTM
    on the C++ kernel peaks below torch.nn.LSTM's (it keeps no gradient of every step; the
    operators hand no zero gradients for the activations they save)."""
    x = torch.randn(50, 32, 32)
    models = {"torch": torch.nn.LSTM(32, 64), "seqnorm": seqnorm.LSTM(32, 64, norm=norm)}
    models["seqnorm"].backend = "cpp"
    peaks = {}
    for name, model in models.items():

        def step(model=model):
            model(x)[0].sum().backward()

        step()
        seqnorm.ops.empty_cache()
        peaks[name] = bench.peak_mb(step)
    assert peaks["seqnorm"] < peaks["torch"], peaks


@pytest.mark.slow
def test_bench_products_times_every_product_of_a_step(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location(
        "bench_products", BENCH.with_name("bench_products.py")
    )
    products = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(products)
    monkeypatch.setattr(products, "SHAPES", {"A": (4, 6, 8, 16)})
    results = products.main(["--shape", "A", "--threads", "1"])
    assert "dW_hh, chunks of 6 steps" in results  # 512 rows a chunk, at most every step
    assert "dW_hh, chunks of 6 steps (at::mm)" in results
    assert len(results) == 10 and all(rate > 0 and ms > 0 for rate, ms in results.values())
    for way in ("oneDNN", "brgemm"):  # each way of each per-step product
        assert {f"{p} ({way})" for p in products.PER_STEP} <= results.keys()
    assert products.CALL in results
    printed = capsys.readouterr().out
    assert "products of a training step" in printed and " us a call" in printed
    # every step's gradient is in some chunk, 512 rows each but the last
    assert products.chunk_sizes(100, 32) == [16] * 6 + [4]
    assert products.chunk_sizes(200, 64) == [8] * 25
    assert products.chunk_sizes(5, 1024) == [1] * 5


GPU_BENCH_STEPS = [
    "bench_rnn_cuda",
    "bench_rnn_cuda_D",
    "bench_rnn_cuda_bf16",
    "bench_rnn_cuda_D_no_graphs",
]
GPU_WINDOW_STEPS = ["bench_rnn_cuda_window_16", "bench_rnn_cuda_window_64"]


@pytest.mark.parametrize(
    ("what", "steps"),
    [
        ("tests", ["device", "pytest_cuda"]),
        ("bench", ["device", *GPU_BENCH_STEPS]),
        ("windows", ["device", *GPU_WINDOW_STEPS]),
        (None, ["device", "pytest_cuda", *GPU_BENCH_STEPS, *GPU_WINDOW_STEPS]),
    ],
)
def test_the_gpu_session_script_runs_each_step_into_out(tmp_path, what, steps):
    """benchmarks/gpu_session.sh, with `echo` standing for the GPU machine's python: every step
    runs its command, writes its output to $OUT and its exit status to status.txt; the CUDA tests
    are those of the files that have some (not the recipes', whose dependencies a GPU machine may
    lack)."""
    script = BENCH.with_name("gpu_session.sh")
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": "echo"}
    argv = ["bash", str(script), *([what] if what else [])]
    subprocess.run(argv, env=env, check=True, timeout=60, capture_output=True)
    status = (tmp_path / "status.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in status] == steps
    assert all(": exit 0 after" in line for line in status)
    if "pytest_cuda" in steps:
        words = (tmp_path / "pytest_cuda.txt").read_text().split()
        assert words[:8] == [
            "-m",
            "pytest",
            "-m",
            "cuda",
            "-q",
            "-p",
            "no:cacheprovider",
            "--durations=12",
        ]
        files = {Path(w).name for w in words[8:]}
        assert {"test_triton.py", "test_api.py", "test_torch_contract.py", "test_bench.py"} <= files
        assert "test_lightning.py" not in files
    if "bench_rnn_cuda_bf16" in steps:
        bench = (tmp_path / "bench_rnn_cuda_bf16.txt").read_text().split()
        assert bench[:4] == ["benchmarks/bench_rnn.py", "--device", "cuda", "--autocast"]
        assert bench[-2:] == ["--json", str(tmp_path / "bench_rnn_cuda_bf16.json")]
    if "bench_rnn_cuda_window_16" in steps:
        bench = (tmp_path / "bench_rnn_cuda_window_16.txt").read_text().split()
        assert bench[bench.index("--window") + 1] == "16"


def test_the_gpu_session_script_refuses_an_unknown_part(tmp_path):
    script = BENCH.with_name("gpu_session.sh")
    env = {"PATH": "/usr/bin:/bin", "OUT": str(tmp_path), "PYTHON": "echo"}
    done = subprocess.run(
        ["bash", str(script), "benchmark"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "expected tests, bench, windows or nothing (all), got 'benchmark'" in done.stderr


@pytest.mark.slow
def test_the_triton_memory_benchmark_counts_the_wrappers_allocations(tmp_path):
    """benchmarks/bench_triton_memory.py (each case in a process of its own, which replaces the
    Triton kernels with no-ops): a peak for each cell and norm asked for, above the one
    (T, N, 4H) tensor the input half alone takes, and layer norm's above no norm's (it saves
    x_hat)."""
    script = BENCH.with_name("bench_triton_memory.py")
    out = tmp_path / "memory.json"
    argv = [
        sys.executable,
        str(script),
        "--shape",
        "8",
        "4",
        "32",
        "32",
        "--norms",
        "none",
        "layer",
    ]
    subprocess.run([*argv, "--json", str(out)], check=True, timeout=300, capture_output=True)
    rows = json.loads(out.read_text())["rows"]
    cases = [(c, n) for c in ("LSTM", "GRU") for n in ("none", "layer")]
    assert [(r["cell"], r["norm"]) for r in rows] == cases
    units = {(r["cell"], r["norm"]): r["peak_units"] for r in rows}
    assert all(u > 1 for u in units.values()), units
    assert all(units[c, "layer"] > units[c, "none"] for c in ("LSTM", "GRU")), units


def _training_peak_mb(steps: int, with_graphs: bool) -> float:
    """LN-LSTM training's peak on the Triton path (bench_triton_memory.py's measure, in a process
    of its own) at batch 16, 32 -> 32, with graphs of four steps."""
    code = f"""
import sys
sys.path.insert(0, {str(BENCH.parent)!r})
import bench_triton_memory as bench
bench.stub_kernels()
if {with_graphs}:
    bench.emulate_graphs()
print(bench.measure("LSTM", "layer", {steps}, 16, 32, 32, {with_graphs})["peak_mb"])
"""
    env = {**os.environ, "SEQNORM_TRITON_WINDOW": "4"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return float(done.stdout.splitlines()[-1])


@pytest.mark.slow
def test_what_cuda_graphs_add_to_the_peak_does_not_grow_with_the_sequence():
    """The time loops' CUDA graphs (emulated on CPU, kernels stubbed) cover a window of steps
    each: what they add to a training step's peak is a window's copies, the same at 64 steps as
    at 16 (measured: 0.36 and 0.46 MB). Graphs of the whole sequence, as at first, added a copy
    of every saved activation and gradient: 0.98 and 3.52 MB."""
    added = {
        steps: _training_peak_mb(steps, True) - _training_peak_mb(steps, False)
        for steps in (16, 64)
    }
    assert 0 < added[64] < 1.5 * added[16], added
