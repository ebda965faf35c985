"""The Triton kernels: in Triton's interpreter on CPU tensors (no GPU needed; tests/conftest.py
sets TRITON_INTERPRET), compiled ahead of time for Ampere and Hopper, and on a real GPU where
there is one (marked cuda). tests/test_reference.py runs them against the literal float64 loop
with the other backends."""

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import NORM_CASES, make
from torch.testing import assert_close

import seqnorm

# Triton's interpreter on CPU, and ahead-of-time compiles: all of it is slow without a GPU.
pytestmark = pytest.mark.slow

ON_GPU = torch.cuda.is_available()
DEVICE = "cuda" if ON_GPU else "cpu"
CELLS = ["LSTM", "GRU", "LSTM-proj"]


def _make(cls, norm, backend, **kw):
    extra = {"proj_size": 3} if cls == "LSTM-proj" else {}
    return make(cls.removesuffix("-proj"), norm, backend=backend, **extra, **kw)


def _pair(cls, norm, **kw):
    model = _make(cls, norm, "triton", **kw)
    reference = copy.deepcopy(model)
    reference.backend = "python"
    return model, reference


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_without_a_backward_and_in_eval_mode(cls, norm):
    """No backward: the kernels keep one slot of activations and a ring of two states; the
    outputs, states and running statistics are the loop's. Eval mode: running statistics."""
    model, reference = _pair(cls, norm, hidden_size=8, bidirectional=True)
    x, lengths = torch.randn(5, 3, 5, dtype=torch.float64), torch.tensor([5, 2, 4])
    for train in (True, False):
        model.train(train), reference.train(train)
        with torch.no_grad():
            got, want = model(x, lengths=lengths), reference(x, lengths=lengths)
        assert_close(got, want)
        assert_close(list(model.buffers()), list(reference.buffers()))


STACKED = {"num_layers": 2, "bidirectional": True}  # four directions, one loop shape
REPLAY_CASES = [
    *(pytest.param(c, n, {}, id=f"{n}-{c}") for n in NORM_CASES for c in CELLS),
    pytest.param("LSTM", "layer", STACKED, id="layer-LSTM-2-layers-bidirectional"),
    pytest.param("GRU", "batch", STACKED, id="batch-GRU-2-layers-bidirectional"),
]


@pytest.mark.parametrize(("cls", "norm", "stack"), REPLAY_CASES)
def test_the_time_loops_replayed_as_cuda_graphs(monkeypatch, cls, norm, stack):
    """graphs.run's capture and replay, emulated on CPU, with graphs of two steps: three training
    steps of one shape, five steps long (the first runs the loops as they are, the second
    captures and replays them, the third replays; each loop replays a graph of two steps twice
    and one of one step, the states carried from window to window, forward and backward) give
    the float64 loop's outputs, states, gradients and running statistics, although a replay
    writes only into the graph's copies; a replay leaves the outputs of the step before
    untouched; a graph holds at most a window of any tensor with a time dimension; and the same
    in eval mode without gradients. Stacked layers and both directions share the forward's graphs
    (their loops have one shape), replayed four times a step; the backward's, which take the
    input half too, as far as the layers' inputs have one size."""
    from seqnorm.ops.triton_kernels import graphs

    monkeypatch.setattr(graphs, "_applies", lambda device: True)
    monkeypatch.setattr(graphs, "_capture", graphs.emulated_capture)
    monkeypatch.setenv("SEQNORM_TRITON_WINDOW", "2")
    graphs.clear()
    model, reference = _pair(cls, norm, hidden_size=8, **stack)
    lengths = torch.tensor([5, 2, 3])
    before = None
    try:
        for _ in range(3):
            x = torch.randn(5, 3, 5, dtype=torch.float64)
            results = []
            for m in (model, reference):
                m.zero_grad()
                xi = x.clone().requires_grad_()
                out, state = m(xi, lengths=lengths)
                states = state if isinstance(state, tuple) else (state,)
                (out.square().sum() + sum(s.square().sum() for s in states)).backward()
                grads = [xi.grad, *(p.grad for p in m.parameters())]
                results.append([out, *states, *grads, *m.buffers()])
            for got, want in zip(*results):
                assert_close(got, want)
            if before is not None:  # the earlier step's outputs and states, as they were
                assert_close(before[0], [t.detach() for t in before[1]], rtol=0, atol=0)
            outputs = results[0][: 1 + len(states)]
            before = ([t.detach().clone() for t in outputs], outputs)
        # the forward's loop and the backward's, each a graph of two steps and one of one; the
        # backward's (which takes the input half's too) one for each size of a layer's input
        loops = 1 + (2 if stack else 1)
        assert sorted(k[1] for k in graphs._graphs) == [1] * loops + [2] * loops
        for _, static in graphs._graphs.values():  # every step's tensors: a window at most
            assert max(t.shape[0] for t in static.values() if t is not None and t.dim() == 3) <= 3
        model.eval(), reference.eval()
        with torch.no_grad():  # the loop that keeps no activations, replayed in eval mode
            for _ in range(3):
                x = torch.randn(5, 3, 5, dtype=torch.float64)
                assert_close(model(x, lengths=lengths), reference(x, lengths=lengths))
        assert len(graphs._graphs) == 2 * loops + 2
    finally:
        graphs.clear()


def test_graphs_are_kept_for_the_shapes_seen_most_often(monkeypatch):
    """graphs.run captures a key at its second sighting while there is a free place, and then
    only in place of the graph seen least often, if the key has been seen more often: ten shapes
    taking turns with four places capture four graphs once (a least-recently-used cache would
    capture at nearly every call, each capture running the loop twice more); a shape that then
    comes to be seen more often than one of them takes its place; results are the loop's
    throughout."""
    from seqnorm.ops.triton_kernels import graphs

    captured = []

    def capture(work, static):
        captured.append(static["x"].shape[0])
        return graphs.emulated_capture(work, static)

    monkeypatch.setattr(graphs, "_applies", lambda device: True)
    monkeypatch.setattr(graphs, "_capture", capture)
    monkeypatch.setenv("SEQNORM_CUDA_GRAPHS", "4")
    graphs.clear()

    def double(s, steps):
        torch.mul(s["x"], 2, out=s["y"])

    def run(length):
        x, y = torch.randn(length), torch.zeros(length)
        graphs.run(("double",), double, {"x": x, "y": y}, 1, timed={}, writes=("y",))
        assert_close(y, 2 * x)

    try:
        for _ in range(5):
            for length in range(1, 11):
                run(length)
        assert captured == [1, 2, 3, 4]  # in the second round
        for calls in range(1, 7):  # seen 5 times each: a new shape's 6th sighting is its turn
            run(20)
            assert captured[-1] == (20 if calls == 6 else 4)
        kept = [dict(key[-1])["x"][0][0] for key in graphs._graphs]
        assert kept == [2, 3, 4, 20]  # 1, the least recently used of the least seen, made room
        monkeypatch.setenv("SEQNORM_CUDA_GRAPHS", "2")
        run(20)
        assert len(graphs._graphs) == 2
        monkeypatch.setenv("SEQNORM_CUDA_GRAPHS", "0")  # off: the graphs' memory goes too
        run(20)
        assert not graphs._graphs
    finally:
        graphs.clear()


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", NORM_CASES)
def test_no_division_by_zero_or_invalid_operation_on_the_way(cls, norm, train):
    """Forward and backward in float32 with numpy (the interpreter's arithmetic) raising on a
    division by zero or an invalid operation, even in a branch tl.where discards: a padded row's
    or a zero state's standard deviation is 0, and 1/0 was computed and discarded there (a
    RuntimeWarning in every run; on a GPU an infinity in a register); batch norm divided by the
    count of valid samples, 0 at steps past every sequence's end (the last here)."""
    import numpy as np

    model = _make(cls, norm, "triton", hidden_size=8, bidirectional=True).float().train(train)
    x = torch.randn(5, 4, 5, requires_grad=True)
    with np.errstate(divide="raise", invalid="raise"):
        out, _ = model(x, lengths=torch.tensor([4, 2, 4, 3]))
        out.sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("value", ["3", "0", "-2", "32 steps", ""])
def test_a_window_that_is_not_an_even_count_of_steps_is_refused(monkeypatch, value):
    from seqnorm.ops.triton_kernels import graphs

    monkeypatch.setenv("SEQNORM_TRITON_WINDOW", value)
    with pytest.raises(
        ValueError,
        match=f"SEQNORM_TRITON_WINDOW: expected an even number of steps >= 2, got {value!r}",
    ):
        graphs.window()


def test_every_capture_on_a_device_uses_one_stream(monkeypatch):
    """graphs._capture warms up and captures on one side stream per device: cuBLAS keeps a
    workspace for each stream it runs on for the life of the process, so a new stream per capture
    (as before) left tens of MiB behind at every capture. torch.cuda's streams and graphs are
    stood in for by recorders; the loop runs on CPU tensors."""
    import contextlib

    from seqnorm.ops.triton_kernels import graphs

    made, used = [], []

    class Stream:
        def __init__(self, device=None):
            made.append(self)

        def wait_stream(self, other):
            pass

    @contextlib.contextmanager
    def on(stream):
        used.append(("warm-up", stream))
        yield

    @contextlib.contextmanager
    def graph(g, stream=None):
        used.append(("capture", stream))
        yield

    monkeypatch.setattr(graphs, "_streams", {})
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", on)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: "graph")
    monkeypatch.setattr(torch.cuda, "graph", graph)
    x = torch.randn(3)
    for _ in range(3):
        static = {"x": x, "y": torch.zeros(3)}
        graphs._capture(lambda s: torch.mul(s["x"], 2, out=s["y"]), static)
        assert_close(static["y"], 2 * x)  # the warm-up's
    side = graphs._streams[x.device]
    assert used == [("warm-up", side), ("capture", side)] * 3
    assert sum(s is side for s in made) == 1


def test_the_cuda_kernels_run_with_their_inputs_device_current(monkeypatch):
    """Triton launches on the current CUDA device: each operator's CUDA kernel makes its inputs'
    device current around the Triton call (for a model on cuda:1 while cuda:0 is current; on a
    machine with two GPUs test_a_model_on_the_second_gpu runs it)."""
    from types import SimpleNamespace

    from seqnorm.ops import library

    current = []

    class Device:  # stands for torch.cuda.device, recording what it makes current
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            current.append(self.device)

        def __exit__(self, *exc):
            current.append(None)

    monkeypatch.setattr(torch.cuda, "device", Device)
    names = ("lstm_forward", "lstm_backward", "gru_forward", "gru_backward")
    triton = SimpleNamespace(**{n: lambda *args, n=n: (n, current[-1], args) for n in names})
    monkeypatch.setattr(library, "_triton", lambda: triton)
    x, on_cpu = torch.empty(2, 3, device="meta"), torch.empty(2)  # a CPU tensor (counts) first
    mean, var = torch.zeros(2, 3, device="meta"), torch.ones(2, 3, device="meta")
    for name in names:
        op = getattr(library, name)
        fields = op.Args._fields
        args = [None] * len(fields)
        args[:2] = on_cpu, x
        args[fields.index("running_mean_ih")] = mean
        args[fields.index("running_var_ih")] = var
        current.clear()
        got, device, taken = library._on_cuda(op, name)(*args)
        assert (got, device) == (name, x.device)
        assert current == [x.device, None]
        # as the Triton kernels take them: the input half's mean and variance, one (2, T, F)
        place = fields.index("running_mean_ih")
        assert len(taken) == len(args) - len([f for f in fields if f.startswith("running_var")])
        assert taken[:2] == (on_cpu, x) and taken[place].shape == (2, 2, 3)
        assert all(t is None for i, t in enumerate(taken) if i not in (0, 1, place))


HALF_TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 5e-2}  # of the largest entry


HALF_CASES = [  # bfloat16 everywhere; float16 takes the same code, so the LSTM's cases suffice
    *(pytest.param(c, torch.bfloat16, id=f"{c}-bf16") for c in CELLS),
    pytest.param("LSTM", torch.float16, id="LSTM-fp16"),
]


@pytest.mark.parametrize(("cls", "dtype"), HALF_CASES)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_half_precision_against_the_loop(cls, norm, dtype):
    """Half precision on the Triton kernels in the interpreter, as the GPU runs it: under autocast
    (products in half, statistics and state in float32) the outputs, states and every gradient
    are the Python loop's under the same autocast, within half-precision rounding (at hidden 16
    over 6 steps they differed by 1.3e-3 of the largest entry in float16, 1.2e-2 in bfloat16);
    with half parameters everything comes back in that dtype, finite, near float32 (as
    test_cuda_half_precision asks on the GPU)."""

    def run(model, x, autocast=None):
        model.zero_grad()
        with torch.autocast("cpu", dtype=autocast or torch.float32, enabled=autocast is not None):
            out, state = model(x, lengths=torch.tensor([4, 2, 3, 1]))
        states = state if isinstance(state, tuple) else (state,)
        (out.float().sum() + sum(s.float().square().sum() for s in states)).backward()
        return [out, *states, *(p.grad for p in model.parameters())]

    model = _make(cls, norm, "triton", hidden_size=8, dtype=torch.float32)
    reference = copy.deepcopy(model)
    reference.backend = "python"
    x = torch.randn(4, 4, 5)
    got, want = run(model, x, dtype), run(reference, x, dtype)
    assert got[0].dtype == torch.float32
    for g, w in zip(got, want):
        assert_close(g, w, rtol=0, atol=HALF_TOLERANCE[dtype] * w.abs().max().item())
    full = run(copy.deepcopy(model), x)[0]
    half = copy.deepcopy(model).to(dtype)
    results = run(half, x.to(dtype))
    assert all(r.dtype == dtype and r.isfinite().all() for r in results)
    assert (results[0].float() - full).abs().mean() < 0.03


GRADCHECK_MASK = torch.tensor([[1, 1], [1, 0], [0, 1]], dtype=torch.bool)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_gradcheck_of_the_operator_on_triton(cls, norm):
    """The registered backward, run by the Triton kernels, against finite differences of a
    whole direction (input half included), with padding and (batch norm) a step that falls back
    to running statistics."""
    model = _make(cls, norm, None, hidden_size=4, input_size=2)
    lstm = cls.startswith("LSTM")
    sites = ("norm_ih_l0", "norm_hh_l0", "norm_c_l0") if lstm else ("norm_ih_l0", "norm_hh_l0")
    norms = [getattr(model, s) for s in sites]
    leaves = lambda *ts: tuple(
        None if t is None else t.detach().clone().requires_grad_() for t in ts
    )
    weights = [model.weight_ih_l0, model.weight_hh_l0, model.bias_ih_l0, model.bias_hh_l0]
    if lstm:
        weights.append(getattr(model, "weight_hr_l0", None))
    params = leaves(*weights, *(None if m is None else m.weight for m in norms))
    if lstm:
        params += leaves(None if norms[2] is None else norms[2].bias)
    features = {"norm_c_l0": 4}
    running = [None] * 2 * len(sites)  # a mean and a variance (T, F) per site
    if norm == "batch":
        running = [
            row.double()
            for s in sites
            for row in (
                torch.randn(3, features.get(s, 16 if lstm else 12)),
                torch.rand(3, features.get(s, 16 if lstm else 12)) + 0.5,
            )
        ]
    out_size = 3 if cls == "LSTM-proj" else 4
    state = leaves(torch.randn(2, out_size, dtype=torch.float64))
    if lstm:
        state += leaves(torch.randn(2, 4, dtype=torch.float64))
    x = leaves(torch.randn(3, 2, 2, dtype=torch.float64))
    config = (norm, 4 if norm == "group" else 1, 1e-5, True)
    op = torch.ops.seqnorm.lstm_forward if lstm else torch.ops.seqnorm.gru_forward
    heads = 3 if lstm else 2

    def f(*args):
        return op(*args, *running, GRADCHECK_MASK, *config, True, "triton")[:heads]

    assert torch.autograd.gradcheck(f, (*x, *state, *params), fast_mode=True)


def test_hidden_sizes_above_the_kernels_limit_are_refused_clearly():
    model = seqnorm.GRU(3, 4096, norm="layer")
    model.backend = "triton"
    with pytest.raises(
        RuntimeError,
        match=r"backend='triton' cannot run here: the Triton kernels take hidden sizes up to 2048, got hidden_size=4096",
    ):
        model(torch.randn(2, 1, 3))


@pytest.mark.slow
def test_every_kernel_compiles_for_ampere_and_hopper(tmp_path):
    """Ahead-of-time compilation on this CPU (the Triton wheel carries ptxas) at the benchmark's
    hidden sizes and the largest supported: no register spills, within 255 registers and the
    shared memory of a block."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # three processes side by side (most of the time is ptxas and MLIR, one core each)
    parts = [(90, ["256", "512", "768"]), (90, ["1024", "2048"]), (80, ["512"])]
    logs = [(tmp_path / f"resources{i}.log").open("w") for i in range(len(parts))]  # no pipes
    runs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "seqnorm.ops.triton_kernels.resources",
                "--arch",
                str(arch),
                "--hidden",
                *hidden,
                "--json",
                str(tmp_path / f"resources{i}.json"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for i, ((arch, hidden), log) in enumerate(zip(parts, logs))
    ]
    for log in logs:
        log.close()  # each process has its own copy
    for i, ((arch, hidden), run) in enumerate(zip(parts, runs)):
        assert run.wait(timeout=900) == 0, (tmp_path / f"resources{i}.log").read_text()[-3000:]
        rows = json.loads((tmp_path / f"resources{i}.json").read_text())
        assert len(rows) == 16 * len(hidden)  # 8 kernels of the input half, 8 of the steps
        assert {(row["arch"], str(row["hidden"])) for row in rows} == {(arch, h) for h in hidden}, (
            rows
        )
        for row in rows:
            assert row["spill_bytes"] == 0 and row["registers"] <= 255, row
            assert row["shared_bytes"] <= 48 * 1024, row


WIDE_INDEX_SCRIPT = """
import json, re, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from seqnorm.ops.triton_kernels import resources
wide = {}
for name, kernel, constexprs, warps in resources.kernels(1024):
    if not name.startswith("input_"):
        continue
    signature = {n: "constexpr" if n in constexprs else resources.SCALARS.get(n, "*i1" if n == "MASK" else "*fp32") for n in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    ttir = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).asm["ttir"]
    pid = re.search(r"(%\\w+) = tt.get_program_id x : i32", ttir).group(1)
    wide[name] = re.search(rf"= arith.extsi {pid} : i32 to i64", ttir) is not None
print(json.dumps(wide))
"""


def test_the_input_half_kernels_index_rows_in_64_bits():
    """The input half's kernels run over the rows of every step at once, where row * features
    passes 2^31 (a batch of 512 over 1,024 steps at hidden 1024: 4 GiB in bfloat16): their row
    or step index is widened to 64 bits before it is multiplied, as the compiled TTIR shows (a
    tensor that large does not fit a test)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-c", WIDE_INDEX_SCRIPT],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=600,
    ).stdout
    wide = json.loads(out.splitlines()[-1])
    assert len(wide) == 8 and all(wide.values()), wide  # 4 kernels, for the LSTM and the GRU


# --- on a GPU -------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device")


def _training_step(model, x, lengths) -> list:
    """Outputs, final states, the input's and every parameter's gradient, and the buffers after
    one training step of ``model`` on ``x`` (its own copy)."""
    model.zero_grad()
    x = x.detach().requires_grad_()
    out, state = model(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    (out.sum() + sum(s.square().sum() for s in states)).backward()
    return [out, *states, x.grad, *(p.grad for p in model.parameters()), *model.buffers()]


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_cuda_matches_the_cpu_loop(cls, norm):
    """float64 on the GPU against the float64 loop on CPU, where only the order of sums differs:
    outputs, states, every gradient and the running statistics, at three training steps (the
    second captures CUDA graphs, the third replays them)."""
    model = _make(cls, norm, "python", hidden_size=32, bidirectional=True, num_layers=2)
    x, lengths = torch.randn(12, 6, 5, dtype=torch.float64), torch.tensor([12, 3, 7, 1, 12, 9])
    gpu = copy.deepcopy(model).cuda()
    gpu.backend = "triton"
    for _ in range(3):
        want = _training_step(model, x, lengths)
        got = _training_step(gpu, x.cuda(), lengths)
        assert_close([t.cpu() for t in got], want)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_cuda_float32_is_as_accurate_as_the_cpu_kernel(cls, norm):
    """float32 on the GPU (TF32 off): for every result of a training step, its distance from the
    float64 loop's (in norm) is at most 10 times the C++ kernel's float32 distance. A fixed
    tolerance would not do: the normalized LSTMs amplify float32 rounding by up to 1e4 in some
    gradients (batch norm over few samples most), so one that passes every case is loose enough to
    let TF32 through."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _make(cls, norm, "python", hidden_size=32, bidirectional=True, num_layers=2)
    x, lengths = torch.randn(12, 6, 5, dtype=torch.float64), torch.tensor([12, 9, 12, 10, 11, 12])
    want = _training_step(copy.deepcopy(model), x, lengths)
    cpu, gpu = copy.deepcopy(model).float(), copy.deepcopy(model).float().cuda()
    cpu.backend, gpu.backend = "cpp", "triton"
    on_cpu = _training_step(cpu, x.float(), lengths)
    for _ in range(3):  # run, capture, replay
        on_gpu = _training_step(copy.deepcopy(gpu), x.float().cuda(), lengths)
        for got, near, exact in zip(on_gpu, on_cpu, want):
            error = (got.cpu().double() - exact).norm()
            bound = 10 * (near.double() - exact).norm() + 1e-6 * exact.norm()
            assert error <= bound, (error, bound)


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_cuda_half_precision(cls, norm, dtype):
    """Autocast (products in half, state in float32) and half parameters, near float32."""
    model = _make(cls, norm, "triton", hidden_size=64, dtype=torch.float32).cuda()
    x = torch.randn(20, 8, 5, device="cuda")
    want = model(x)[0]
    with torch.autocast("cuda", dtype=dtype):
        got = model(x)[0]
    assert got.dtype == torch.float32
    got.sum().backward()
    assert (got - want).abs().mean() < 0.02
    half = copy.deepcopy(model).to(dtype)
    out = half(x.to(dtype))[0]
    assert out.dtype == dtype and (out.float() - want).abs().mean() < 0.03
    out.float().sum().backward()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_a_model_on_the_second_gpu(cls):
    """A model on cuda:1 while cuda:0 is current: outputs and gradients are the float64 loop's
    (Triton would launch on cuda:0 without the operators' device guard)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    model = _make(cls, "layer", "python", hidden_size=32)
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    want = model(x)[0]
    want.square().sum().backward()
    gpu = copy.deepcopy(model).float().to("cuda:1")
    gpu.backend = "triton"
    gpu.zero_grad()
    torch.cuda.set_device(0)
    for _ in range(3):  # the third replays a CUDA graph, captured on cuda:1
        got = gpu(x.float().to("cuda:1"))[0]
    got.square().sum().backward()
    assert got.device == torch.device("cuda:1")
    assert_close(got.double().cpu(), want, atol=2e-4, rtol=2e-3)
    for p, q in zip(gpu.parameters(), model.parameters()):
        assert_close(p.grad.double().cpu(), q.grad, atol=2e-4, rtol=2e-3)
