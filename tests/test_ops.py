"""The recurrence operator: its registration, the C++ kernel against the readable Python loop in
the cases the reference tests do not reach (chunked backward, thread splits, oneDNN products, the
buffer cache, inference without saved activations), gradcheck of the operators themselves, and
the choice of backend."""

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
from helpers import NORM_CASES, flat, make, randomize_running
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

import seqnorm
from seqnorm import functional as SF
from seqnorm import ops
from seqnorm.ops import backend as backends
from seqnorm.ops import cpp, library

LENGTHS = torch.tensor([9, 4, 7, 1, 9, 2])  # a lone sample at the last steps: batch-norm fallback
# (T=4, N=3) for gradcheck: padding in the middle sample, one valid sample at the last step
GRADCHECK_MASK = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)

CELLS = ["LSTM", "GRU", "LSTM-proj"]
CASES = [
    pytest.param(
        cls,
        norm,
        bidir,
        mode,
        id=f"{norm}-{cls}-{'bi' if bidir else 'uni'}-{mode}",
        marks=pytest.mark.slow if bidir else (),  # the quick loop: one direction
    )
    for cls in CELLS
    for norm in NORM_CASES
    for bidir in [False, True]
    for mode in ["full", "lengths", "packed"]
]


def _make(cls, norm, **kw):
    if cls == "LSTM-proj":
        return make("LSTM", norm, proj_size=5, **kw)
    return make(cls, norm, **kw)


def _pair(model):
    """The model on the C++ kernel and a copy on the Python loop."""
    reference = copy.deepcopy(model)
    model.backend, reference.backend = "cpp", "python"
    return model, reference


def _run(model, x, hx, mode):
    """Outputs, final states, every gradient and every buffer after one training step."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    hx = tuple(h.detach().requires_grad_() for h in hx)
    state_in = hx if len(hx) == 2 else hx[0]
    if mode == "packed":
        out, state = model(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), state_in)
        out = pad_packed_sequence(out, total_length=x.shape[0])[0]
    else:
        out, state = model(x, state_in, lengths=None if mode == "full" else LENGTHS)
    states = state if isinstance(state, tuple) else (state,)
    weights = [
        torch.linspace(-1, 1, t.numel(), dtype=t.dtype).reshape(t.shape) for t in (out, *states)
    ]
    sum((t * w).sum() for t, w in zip((out, *states), weights)).backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return out, states, x.grad, [h.grad for h in hx], grads, dict(model.named_buffers())


def _case(cls, norm, bidir):
    model = _make(cls, norm, hidden_size=16, bidirectional=bidir, num_layers=2)
    x = torch.randn(9, 6, 5, dtype=torch.float64)
    dirs = 2 if bidir else 1
    sizes = {"LSTM": (16, 16), "GRU": (16,), "LSTM-proj": (5, 16)}[cls]
    hx = tuple(torch.randn(2 * dirs, 6, size, dtype=torch.float64) for size in sizes)
    return model, x, hx


def _outputs(run):
    """The output, final states and the gradients of the input and initial states of a run."""
    out, states, dx, dhx = run[:4]
    return [out, *states, dx, *dhx]


@pytest.mark.parametrize(("cls", "norm", "bidir", "mode"), CASES)
def test_cpp_matches_python_loop(cls, norm, bidir, mode):
    model, x, hx = _case(cls, norm, bidir)
    got, want = (_run(m, x, hx, mode) for m in _pair(model))
    for g, w in zip(_outputs(got), _outputs(want)):
        assert_close(g, w)
    assert got[4].keys() == want[4].keys()
    for name in want[4]:  # every parameter's gradient
        assert_close(got[4][name], want[4][name], msg=lambda m, name=name: f"{name}: {m}")
    for name in want[5]:  # batch norm's running statistics, moved identically
        assert_close(got[5][name], want[5][name])


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_cpp_float32_is_accurate(cls, norm):
    """In float32 the kernel is within float32 rounding of the float64 result, like the loop."""
    model, x, hx = _case(cls, norm, True)
    want = _run(model, x, hx, "lengths")
    fast = copy.deepcopy(model).float()
    fast.backend = "cpp"
    got = _run(fast, x.float(), tuple(h.float() for h in hx), "lengths")
    pairs = [*zip(_outputs(got), _outputs(want)), *((got[4][k], want[4][k]) for k in want[4])]
    for g, w in pairs:  # error relative to the largest entry: padding zeros need no rtol
        assert_close(g.double(), w, rtol=0, atol=5e-3 * w.abs().max().item())


@pytest.mark.parametrize("cls", CELLS)
def test_cpp_float32_batch_statistics_of_offset_features(cls):
    """Features whose mean is about a thousand times their spread over the batch: the float32
    kernel's batch statistics (one pass, in double) still give the float64 loop's outputs, states
    and running statistics (two passes); taking E[x^2] - mean^2 in float32 fails here. (The
    weight gradients are not compared: dW_ih = sum over rows of dgx x cancels in float32 here,
    in any implementation.)"""
    model, x, hx = _case(cls, "batch", False)
    x = 1000 + x
    fast = copy.deepcopy(model).float()  # before the reference's step moves the statistics
    fast.backend = "cpp"
    want = _run(model, x, hx, "full")
    got = _run(fast, x.float(), tuple(h.float() for h in hx), "full")
    pairs = [(got[0], want[0]), *zip(got[1], want[1])]  # outputs and final states
    pairs += [(got[5][k], want[5][k]) for k in want[5]]  # running statistics
    for g, w in pairs:
        assert_close(g.double(), w, rtol=0, atol=5e-3 * w.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("way", ["packed", "brgemm"])
@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_cpp_float32_large_weights_are_accurate(monkeypatch, cls, norm, way):
    """Hidden 512 in float32: the per-step products run on oneDNN's packed weights (where torch
    has oneDNN; tests/conftest.py has SEQNORM_CPU_PRODUCT choose them over the timing) or on
    oneDNN's brgemm kernel, still within float32 rounding of the float64 loop."""
    monkeypatch.setenv("SEQNORM_CPU_PRODUCT", way)
    model = _make(cls, norm, hidden_size=512, input_size=8)
    x, lengths = torch.randn(4, 3, 8, dtype=torch.float64), torch.tensor([4, 2, 3])
    reference = copy.deepcopy(model)
    reference.backend = "python"
    fast = copy.deepcopy(model).float()
    fast.backend = "cpp"
    with torch.profiler.profile() as prof:
        got_out, got_state = fast(x.float(), lengths=lengths)
        got_state = got_state if isinstance(got_state, tuple) else (got_state,)
        sum(t.square().sum() for t in (got_out, *got_state)).backward()
    want_out, want_state = reference(x, lengths=lengths)
    want_state = want_state if isinstance(want_state, tuple) else (want_state,)
    sum(t.square().sum() for t in (want_out, *want_state)).backward()
    with torch.no_grad():  # the path that keeps no activations gives the same
        assert_close(fast(x.float(), lengths=lengths)[0], got_out, rtol=0, atol=0)
    if torch.backends.mkldnn.is_available() and cls != "LSTM-proj":  # W_hh (4H, 5) is small
        linear = "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}
        assert linear == (way == "packed")  # brgemm is no ATen operator: the profiler sees none
    pairs = [(got_out, want_out), *zip(got_state, want_state)]
    pairs += [(p.grad, q.grad) for p, q in zip(fast.parameters(), reference.parameters())]
    for g, w in pairs:
        assert_close(g.double(), w, rtol=0, atol=5e-3 * w.abs().max().item())


@pytest.fixture
def fresh_cache():
    """The kernel's buffer cache emptied before and after, its limit restored."""
    ops.empty_cache()
    limit = ops.cache_info()["limit"]
    yield
    ops.set_cache_limit(limit)
    ops.empty_cache()


GATES_BYTES = 32 * 64 * 4 * 64 * 4  # the LSTM's gates (T=32, N=64, hidden 64) in float32: 2 MiB


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_step_buffers_come_from_the_cache(cls, fresh_cache):
    """Step buffers of 1 MiB and more (here the projection and the gates, 1.5-2 MiB) are taken
    from the kernel's cache, kept there once freed and handed out again for the next sequence,
    a shorter one too; the profiler sees them while in use; results are the float64 loop's, and
    the same without a backward."""
    model = make(cls, "layer", hidden_size=64, input_size=8, backend="python")
    fast = copy.deepcopy(model).float()
    fast.backend = "cpp"
    x = torch.randn(32, 64, 8, dtype=torch.float64)
    gates = GATES_BYTES * (3 if cls == "GRU" else 4) // 4
    with torch.profiler.profile(profile_memory=True) as prof:
        got, _ = fast(x.float())
        in_use = ops.cache_info()["in_use"]
        assert in_use >= 2 * gates  # the projection (x_hat of it) and x_hat of h W_hh^T
        got.square().sum().backward()
    want, _ = model(x)
    want.square().sum().backward()
    pairs = [
        (got, want),
        *((p.grad, q.grad) for p, q in zip(fast.parameters(), model.parameters())),
    ]
    for g, w in pairs:
        assert_close(g.double(), w, rtol=0, atol=1e-4 * w.abs().max().item())
    with torch.no_grad():  # without a backward, on buffers handed out again
        assert_close(fast(x.float())[0], got, rtol=0, atol=0)
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert sizes.count(gates) >= 2 and sizes.count(-gates) >= 2  # in use, then back in the cache
    del got
    info = ops.cache_info()
    assert info["in_use"] == 0 and info["cached"] >= in_use
    fast(x[:24].float())[0].sum().backward()  # 3/4 of the length: the same buffers serve
    assert ops.cache_info() == info


def test_cache_limit(fresh_cache):
    """With a limit of 0 nothing is cached and the results are the same, bit for bit; a limit
    keeps at most that many bytes; bad limits are refused, naming the value."""
    model = make("LSTM", "batch", hidden_size=64, input_size=8, backend="cpp").float()
    x = torch.randn(32, 64, 8)
    model(x)[0].sum().backward()
    cached = [p.grad.clone() for p in model.parameters()]
    assert ops.cache_info()["cached"] >= 2 * GATES_BYTES
    ops.set_cache_limit(GATES_BYTES)
    assert 0 < ops.cache_info()["cached"] <= GATES_BYTES
    ops.set_cache_limit(0)
    assert ops.cache_info()["cached"] == 0
    model.zero_grad()
    model(x)[0].sum().backward()
    assert ops.cache_info() == {"cached": 0, "in_use": 0, "limit": 0}
    for p, g in zip(model.parameters(), cached):
        assert_close(p.grad, g, rtol=0, atol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"nbytes={bad!r}: expected a whole number"):
            ops.set_cache_limit(bad)


def _step_and_gradients(model, x, lengths):
    out, state = model(x, lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    ((out * weights).sum() + sum(s.sum() for s in states)).backward()
    return [out, *states, *(p.grad for p in model.parameters()), *model.buffers()]


@pytest.mark.parametrize("cls", CELLS)
def test_batch_norm_statistics_split_over_threads(cls):
    """Batch 32 and hidden 128: the per-feature batch statistics and their backward run in
    feature ranges over threads (with padding in the batch); still the loop's, in float64."""
    model = _make(cls, "batch", hidden_size=128, input_size=8)
    x = torch.randn(5, 32, 8, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1, 4] * 8)
    got, want = (_step_and_gradients(m, x, lengths) for m in _pair(model))
    for g, w in zip(got, want):
        assert_close(g, w)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_backward_over_chunks_matches_python_loop(cls, norm):
    """Batch 64: the backward hands its gradients on 8 steps at a time (3 chunks of 20 steps,
    the last one short) to the input norm's backward and the weight and input products; with
    padding, two layers (the second one's input gradient) and both directions, in float64."""
    model = _make(cls, norm, hidden_size=8, num_layers=2, bidirectional=True)
    x = torch.randn(20, 64, 5, dtype=torch.float64, requires_grad=True)
    lengths = torch.randint(1, 21, (64,), generator=torch.Generator().manual_seed(0))
    lengths[:3] = torch.tensor([20, 17, 9])  # sequences ending inside and at the end of chunks
    runs = []
    for m in _pair(model):
        x.grad = None
        runs.append([*_step_and_gradients(m, x, lengths), x.grad])
    for got, want in zip(*runs):
        assert_close(got, want)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
@pytest.mark.parametrize("mode", ["full", "lengths", "packed"])
def test_without_grad_matches_python_loop(cls, norm, mode):
    """Without a backward the kernel keeps no step's activations (a ring of two states instead):
    outputs, final states and running statistics are still the loop's, in training mode."""
    model, x, hx = _case(cls, norm, True)
    state_in = hx if len(hx) == 2 else hx[0]
    runs = []
    for m in _pair(model):
        with torch.no_grad():
            if mode == "packed":
                out, state = m(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), state_in)
                out = pad_packed_sequence(out, total_length=x.shape[0])[0]
            else:
                out, state = m(x, state_in, lengths=None if mode == "full" else LENGTHS)
        runs.append((out, *(state if isinstance(state, tuple) else (state,)), *m.buffers()))
    assert len(runs[0]) == len(runs[1])
    for got, want in zip(*runs):
        assert_close(got, want)


@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_eval_mode_matches_python_loop(monkeypatch, cls, norm):
    """Eval mode against the loop; without a backward to follow, batch norm hands the kernel the
    module's running rows themselves (stacking copies of them took 147 us a call with cold
    caches, benchmarks/README.md), and copies where one may follow (autograd keeps them, and a
    training forward would move the module's rows under it)."""
    model = _make(cls, norm, hidden_size=16).eval()
    randomize_running(model)
    fast, reference = _pair(model)
    own = [b.data_ptr() for name, b in fast.named_buffers() if "running" in name]
    handed = []  # what the direction was handed: whether a backward may follow, and the rows
    rows_of = ops._running_rows
    monkeypatch.setattr(
        ops, "_running_rows", lambda *a: handed.append((a[2], rows_of(*a))) or handed[-1][1]
    )
    x = torch.randn(7, 1, 5, dtype=torch.float64)  # batch of one: fine in eval mode
    with torch.no_grad():
        assert_close(fast(x)[0], reference(x)[0])
    ptrs = [[None if r is None else r.data_ptr() for r in rows] for _, rows in handed]
    assert [keep for keep, _ in handed] == [False]
    assert ptrs == [own or [None] * (4 if cls == "GRU" else 6)]
    handed.clear()
    fast(x.clone().requires_grad_())
    assert [keep for keep, _ in handed] == [True]
    assert not set(own) & {r.data_ptr() for r in handed[0][1] if r is not None}
    # padded samples, and a backward through the running statistics (frozen-norm fine-tuning)
    x = torch.randn(9, 6, 5, dtype=torch.float64)
    grads = []
    for m in (fast, reference):
        xs = x.clone().requires_grad_()
        out = m(xs, lengths=LENGTHS)[0]
        out.square().sum().backward()
        grads.append((out, xs.grad, *(p.grad for p in m.parameters())))
    for got, want in zip(*grads):
        assert_close(got, want)


def test_the_rows_a_backward_keeps_reach_the_triton_kernels_without_another_copy():
    """Where a backward may follow, each site's running rows are copied once, mean and variance
    side by side, and the Triton kernels' wrapper takes them as one (2, T, F) view; rows apart in
    memory (the module's own, read in place without a backward) are stacked into a copy."""
    model = make("LSTM", "batch", hidden_size=4, input_size=3)
    randomize_running(model)
    run = ops.Running(model.norm_hh_l0.running_mean, model.norm_hh_l0.running_var, 0.1)
    want = torch.stack((run.mean[:5], run.var[:5]))
    for keep in (True, False):
        mean, var = ops._running_rows([run], 5, keep)
        assert (mean.data_ptr() == run.mean.data_ptr()) == (not keep)
        pair = library._pair(mean, var)
        assert_close(pair, want, rtol=0, atol=0)
        assert (pair.data_ptr() == mean.data_ptr()) == keep
    both = torch.zeros(40)  # side by side, but not of one shape: refused, not viewed as (2, 5, 4)
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        library._pair(both[:20].view(5, 4), both[20:].view(4, 5))


def test_the_kernels_refuse_running_rows_of_another_shape():
    """The C++ kernels read each site's running mean and variance through raw pointers: rows of
    the wrong shape, non-contiguous ones or a missing variance are refused, naming the site."""
    cpp.load()
    kernels = torch.ops.seqnorm_cpp
    x, w_ih = torch.randn(4, 2, 3), torch.randn(8, 3)
    mean, var = torch.zeros(4, 8), torch.ones(4, 8)
    config = ("batch", 1, 1e-5, False, False)
    y = kernels.input_forward(x, w_ih, None, None, mean, var, None, *config)[0]
    assert y.shape == (4, 2, 8)
    bad = [(mean[:3], var), (mean, torch.ones(8, 4).t()), (mean, None), (None, None)]
    for m, v in bad:
        with pytest.raises(RuntimeError, match="the input projection"):
            kernels.input_forward(x, w_ih, None, None, m, v, None, *config)
    gx, h0 = torch.randn(4, 2, 6), torch.zeros(2, 2)
    with pytest.raises(RuntimeError, match=r"recurrent projection must be contiguous \(4, 6\)"):
        kernels.gru_forward(gx, h0, torch.randn(6, 2), None, None, mean, var, None, *config)
    gx, c0 = torch.randn(4, 2, 8), torch.zeros(2, 2)
    rows = (mean, var, torch.zeros(4, 3), torch.ones(4, 3))  # the cell state's are (4, 2)
    with pytest.raises(RuntimeError, match=r"cell state must be contiguous \(4, 2\), got \[4, 3\]"):
        kernels.lstm_forward(
            gx, h0, c0, torch.randn(8, 2), None, None, None, None, *rows, None, *config
        )


# --- the operators themselves -------------------------------------------------------------


def _leaves(*tensors):
    return tuple(None if t is None else t.detach().clone().requires_grad_() for t in tensors)


def _lstm_op_inputs(norm, masked, training, proj):
    """A float64 direction's inputs to seqnorm::lstm_forward (the input half included)."""
    model = make("LSTM", norm, hidden_size=8, input_size=3, proj_size=5 if proj else 0)
    t, n = 4, 3
    norms = (model.norm_ih_l0, model.norm_hh_l0, model.norm_c_l0)
    params = _leaves(
        model.weight_ih_l0,
        model.weight_hh_l0,
        model.bias_ih_l0,
        model.bias_hh_l0,
        getattr(model, "weight_hr_l0", None),
        *(None if m is None else m.weight for m in norms),
        None if norms[2] is None else norms[2].bias,
    )
    running = [None] * 6  # a mean and a variance (T, F) per site
    if norm == "batch":  # non-trivial running statistics, for the fallback and eval mode
        running = [
            row.double() for f in (32, 32, 8) for row in (torch.randn(t, f), torch.rand(t, f) + 0.5)
        ]
    x = torch.randn(t, n, 3, dtype=torch.float64)
    h0 = torch.randn(n, 5 if proj else 8, dtype=torch.float64)
    c0 = torch.randn(n, 8, dtype=torch.float64)
    config = (norm, 4 if norm == "group" else 1, 1e-5, training)
    return (*_leaves(x, h0, c0), *params), running, GRADCHECK_MASK if masked else None, config


GRADCHECK_CASES = pytest.mark.parametrize(
    ("norm", "masked", "training"),
    [(n, m, t) for n in NORM_CASES for m in (False, True) for t in (True, False)],
)


@pytest.mark.slow
@GRADCHECK_CASES
@pytest.mark.parametrize("proj", [False, True])
def test_lstm_operator_gradcheck(norm, masked, training, proj):
    """The operator's registered backward (the C++ kernel's) against finite differences, for a
    whole direction: the input projection, its norm (under a mask batch statistics come from the
    valid samples only, and a step with one valid sample uses running ones), then the loop."""
    inputs, running, mask, config = _lstm_op_inputs(norm, masked, training, proj)

    def f(*args):
        return torch.ops.seqnorm.lstm_forward(*args, *running, mask, *config, True, "cpp")[:3]

    assert torch.autograd.gradcheck(f, inputs)


def _gru_op_inputs(norm, masked, training):
    """A float64 direction's inputs to seqnorm::gru_forward (as _lstm_op_inputs)."""
    model = make("GRU", norm, hidden_size=8, input_size=3)
    t, n = 4, 3
    params = _leaves(
        model.weight_ih_l0,
        model.weight_hh_l0,
        model.bias_ih_l0,
        model.bias_hh_l0,
        *(None if m is None else m.weight for m in (model.norm_ih_l0, model.norm_hh_l0)),
    )
    running = [None] * 4
    if norm == "batch":
        running = [
            row.double() for _ in "ih" for row in (torch.randn(t, 24), torch.rand(t, 24) + 0.5)
        ]
    x, h0 = _leaves(
        torch.randn(t, n, 3, dtype=torch.float64), torch.randn(n, 8, dtype=torch.float64)
    )
    config = (norm, 4 if norm == "group" else 1, 1e-5, training)
    return (x, h0, *params), running, GRADCHECK_MASK if masked else None, config


@pytest.mark.slow
@GRADCHECK_CASES
def test_gru_operator_gradcheck(norm, masked, training):
    inputs, running, mask, config = _gru_op_inputs(norm, masked, training)

    def f(*args):
        return torch.ops.seqnorm.gru_forward(*args, *running, mask, *config, True, "cpp")[:2]

    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.slow
@pytest.mark.parametrize("norm", NORM_CASES)
def test_operators_pass_opcheck(norm):
    """torch.library.opcheck: schemas, fake implementations (shapes and dtypes of every output,
    which torch.compile and torch.export rely on) and the autograd registration, for the C++
    kernel and the Triton kernels (in the interpreter), whose saved tensors differ: the Triton
    backward computes the input half's x_hat again instead."""
    for backend, proj in [("cpp", False), ("cpp", True), ("triton", False)]:
        inputs, running, mask, config = _lstm_op_inputs(norm, True, True, proj)
        args = (*inputs, *running, mask, *config, True, backend)
        torch.library.opcheck(torch.ops.seqnorm.lstm_forward.default, args)
        args = (*inputs, *running, mask, *config, False, backend)  # keep=False: nothing saved
        torch.library.opcheck(torch.ops.seqnorm.lstm_forward.default, args)
    for backend in ("cpp", "triton"):
        inputs, running, mask, config = _gru_op_inputs(norm, True, True)
        for keep in (True, False):
            args = (*inputs, *running, mask, *config, keep, backend)
            torch.library.opcheck(torch.ops.seqnorm.gru_forward.default, args)


def test_update_running_stats_operator_declares_its_mutation():
    schema = torch.ops.seqnorm.update_running_stats.default._schema
    mutated = {
        a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
    }
    assert mutated == {"running_mean", "running_var"}
    mean, var = torch.zeros(3, 2), torch.ones(3, 2)
    batch = torch.stack((torch.full((2, 2), 2.0), torch.full((2, 2), 4.0)))  # T=2 steps
    counts = torch.tensor([4, 1])  # the second step used running statistics: no update
    torch.ops.seqnorm.update_running_stats(mean, var, batch, counts, 0.5)
    assert_close(mean, torch.tensor([[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]))
    assert_close(var, torch.tensor([[0.5 + 0.5 * 4 * 4 / 3] * 2, [1.0, 1.0], [1.0, 1.0]]))


def test_update_running_stats_in_cpp_equals_the_reference():
    """The C++ loop, step after step, against functional.update_running's closed form: steps
    with fewer than two valid samples move nothing, steps past the last row share it."""
    cpp.load()
    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        for rows, steps in ((6, 4), (3, 7), (1, 5)):
            mean = torch.randn(rows, 5, generator=gen, dtype=dtype)
            var = torch.rand(rows, 5, generator=gen, dtype=dtype) + 0.5
            batch = torch.stack((torch.randn(steps, 5, generator=gen), torch.rand(steps, 5)))
            counts = torch.randint(0, 5, (steps,), generator=gen)
            counts[0] = 1  # one step surely without batch statistics
            expected = mean.clone(), var.clone()
            stats = SF.BatchStats(batch[0].to(dtype), batch[1].to(dtype), counts)
            SF.update_running(*expected, stats, 0, 0.3)
            torch.ops.seqnorm_cpp.update_running_stats(mean, var, batch.to(dtype), counts, 0.3)
            assert_close(mean, expected[0], rtol=tol, atol=tol)
            assert_close(var, expected[1], rtol=tol, atol=tol)


def test_update_running_stats_in_cpp_names_what_is_wrong():
    cpp.load()
    with pytest.raises(RuntimeError, match=r"batch must be \(2, T, 4\) and counts \(T,\)"):
        torch.ops.seqnorm_cpp.update_running_stats(
            torch.zeros(3, 4), torch.ones(3, 4), torch.zeros(2, 2, 5), torch.ones(2), 0.1
        )
    with pytest.raises(RuntimeError, match="must be contiguous"):
        torch.ops.seqnorm_cpp.update_running_stats(
            torch.zeros(4, 3).t(), torch.ones(3, 4), torch.zeros(2, 2, 4), torch.ones(2), 0.1
        )


# --- choosing the backend --------------------------------------------------------------------


def test_backend_environment_variable(monkeypatch):
    x = torch.randn(3, 2, 4)
    monkeypatch.setenv("SEQNORM_BACKEND", "python")
    assert ops.choose(None, x, [], False) == "python"
    monkeypatch.setenv("SEQNORM_BACKEND", "cpp")
    assert ops.choose(None, x, [], False) == "cpp"
    assert ops.choose("python", x, [], False) == "python"  # the layer's own choice wins
    monkeypatch.setenv("SEQNORM_BACKEND", "fused")
    with pytest.raises(
        ValueError, match=r"SEQNORM_BACKEND to be one of 'auto', 'cpp'.*got 'fused'"
    ):
        ops.choose(None, x, [], False)
    with pytest.raises(ValueError, match=r"`backend` to be one of .* got 'gpu'"):
        ops.choose("gpu", x, [], False)


def test_auto_backend_falls_back_to_python_with_one_warning(monkeypatch):
    """Forward-mode AD needs the differentiable loop: a warning once per reason. A backend asked
    for that cannot run a call is an error that says why."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(backends, "_warned", set())
    lstm = seqnorm.LSTM(4, 8)
    with fwAD.dual_level():
        x = fwAD.make_dual(torch.randn(3, 2, 4), torch.randn(3, 2, 4))
        with pytest.warns(RuntimeWarning, match="Python loop because forward-mode automatic"):
            lstm(x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # once per reason
            lstm(x)
    assert ops.choose(None, torch.randn(3, 2, 4), [], False) == "cpp"
    assert ops.choose(None, torch.randn(3, 2, 4, dtype=torch.bfloat16), [], False) == "cpp"
    with pytest.raises(
        RuntimeError,
        match=r"backend='cpp' cannot run here: the C\+\+ kernel runs in float32 and float64 \(half",
    ):
        ops.choose("cpp", torch.zeros(3, 2, 4, dtype=torch.int32), [], False)
    weights = [torch.zeros(8, 4, dtype=torch.float64)]  # one dtype, or float32 and half
    with pytest.raises(RuntimeError, match=r"kernel needs the input and every parameter in one"):
        ops.choose("cpp", torch.zeros(3, 2, 4), weights, False)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(
        RuntimeError, match="Triton kernels run on CUDA, or on CPU with TRITON_INTERPRET=1"
    ):
        ops.choose("triton", torch.randn(3, 2, 4), [], False)


def test_library_module_names_each_gradient():
    assert len(library.LSTM_GRADS) == 11 and len(library.GRU_GRADS) == 8


@pytest.mark.slow
def test_the_product_is_chosen_by_timing_both_unless_asked_for(monkeypatch):
    """Without SEQNORM_CPU_PRODUCT the kernel times oneDNN's packed product against at::mm once
    per weight shape and batch (in a fresh process: the choice is remembered), and both choices
    give the float64 loop's results."""
    script = (
        "import torch, seqnorm; torch.manual_seed(0); m = seqnorm.LSTM(8, 256, norm='layer'); "
        "m.backend = 'cpp'; x = torch.randn(5, 16, 8); out = m(x)[0]; out.sum().backward(); "
        "ref = seqnorm.LSTM(8, 256, norm='layer', dtype=torch.float64); ref.load_state_dict(m.state_dict()); "
        "ref.backend = 'python'; want = ref(x.double())[0]; want.sum().backward(); "
        "torch.testing.assert_close(out.double(), want, rtol=0, atol=1e-4); "
        "[torch.testing.assert_close(p.grad.double(), q.grad, rtol=0, atol=1e-3 * q.grad.abs().max().item()) for p, q in zip(m.parameters(), ref.parameters())]"
    )
    env = {k: v for k, v in os.environ.items() if k != "SEQNORM_CPU_PRODUCT"}
    for choice in (None, "mm", "packed", "brgemm"):
        if choice:
            env["SEQNORM_CPU_PRODUCT"] = choice
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=300)


@pytest.mark.parametrize("way", ["packed", "brgemm", "mm", ""])
def test_each_per_step_product_way_against_float64(way):
    """x W^T as the time loop runs it, each way (or as chosen: ""), at widths the brgemm blocks
    split with a narrower last block (1200 and 1040 features on 1 to 3 threads), a row-strided
    x, a transposed W, and batch 1: within float32 rounding of the float64 product. Bad
    arguments are named."""
    cpp.load()
    before = torch.get_num_threads()
    try:
        for threads, (batch, inputs, features) in zip(
            [1, 2, 3], [(5, 300, 1200), (1, 64, 1040), (3, 256, 1024)]
        ):
            torch.set_num_threads(threads)
            x = torch.randn(batch, 2 * inputs)[:, :inputs]
            # W row-major, and the transposed view the backward passes (dgh W_hh)
            for w in (torch.randn(features, inputs), torch.randn(inputs, features).T):
                got = torch.ops.seqnorm_cpp.step_products(x, w, way, 3)
                assert_close(got.double(), x.double() @ w.double().T, rtol=0, atol=1e-4)
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="way must be 'packed', 'brgemm' or 'mm', got 'fast'"):
        torch.ops.seqnorm_cpp.step_products(x, w, "fast", 1)
    with pytest.raises(RuntimeError, match="only float32"):
        torch.ops.seqnorm_cpp.step_products(x.double(), w.double(), "brgemm", 1)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("batch", [1, 5])
def test_the_brgemm_product_splits_any_width(monkeypatch, threads, batch):
    """The brgemm way splits W^T's 4H = 1200 columns into blocks per thread with a narrower last
    block, at batch 1 and 5 and on 1 or 3 threads: outputs and gradients within float32
    rounding of the float64 loop."""
    monkeypatch.setenv("SEQNORM_CPU_PRODUCT", "brgemm")
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        model = make("LSTM", "layer", hidden_size=300, input_size=4)
        reference = copy.deepcopy(model)
        reference.backend = "python"
        fast = copy.deepcopy(model).float()
        fast.backend = "cpp"
        x = torch.randn(3, batch, 4, dtype=torch.float64)
        got = fast(x.float())[0]
        got.square().sum().backward()
        want = reference(x)[0]
        want.square().sum().backward()
    finally:
        torch.set_num_threads(before)
    assert torch.ops.seqnorm_cpp.per_step_product(1200, 300, batch) == "brgemm"
    assert_close(got.double(), want, rtol=0, atol=1e-5)
    for p, q in zip(fast.parameters(), reference.parameters()):
        assert_close(p.grad.double(), q.grad, rtol=0, atol=1e-4 * q.grad.abs().max().item())


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", NORM_CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_threads_take_their_rows_apart_through_the_steps(monkeypatch, cls, norm, training):
    """Where no step mixes samples (every norm but batch norm in training, whose statistics do)
    and the per-step product runs on brgemm, each of 2 threads can take its share of 33 samples
    (17 and 16), some padded, through every step on its own (asked for here: whether it does is
    the next test's): outputs, final states and gradients within float32 rounding of the float64
    loop, and the same outputs without a backward (no activations kept). Batch norm in training
    runs the steps together even when asked."""
    monkeypatch.setenv("SEQNORM_CPU_PRODUCT", "brgemm")
    monkeypatch.setenv("SEQNORM_CPU_LOOP", "apart")
    cpp.load()
    model = make(cls, norm, hidden_size=160, input_size=6)  # W_hh of 64K values and more
    randomize_running(model)
    model.train(training)
    reference = copy.deepcopy(model)
    reference.backend = "python"
    fast = copy.deepcopy(model).float()
    fast.backend = "cpp"
    x = torch.randn(5, 33, 6, dtype=torch.float64)
    lengths = torch.randint(1, 6, (33,), generator=torch.Generator().manual_seed(0))
    before, count = torch.get_num_threads(), torch.ops.seqnorm_cpp.loops_apart()
    torch.set_num_threads(2)
    try:
        got = flat(fast(x.float(), lengths=lengths))
        sum((t * t).sum() for t in got).backward()
        with torch.no_grad():
            kept_none = fast(x.float(), lengths=lengths)[0]
        apart = torch.ops.seqnorm_cpp.loops_apart() - count
    finally:
        torch.set_num_threads(before)
    assert apart == (0 if norm == "batch" and training else 2)
    want = flat(reference(x, lengths=lengths))
    sum((t * t).sum() for t in want).backward()
    assert_close(kept_none, got[0], rtol=0, atol=0)
    pairs = [
        *zip(got, want),
        *((p.grad, q.grad) for p, q in zip(fast.parameters(), reference.parameters())),
    ]
    for g, w in pairs:
        assert_close(g.double(), w, rtol=0, atol=5e-3 * w.abs().max().item())


@pytest.mark.parametrize(
    "hidden, batch, loop, apart",
    [
        (128, 33, None, True),  # W^T of 256 KiB, in any core's L2; 16 rows a thread and more
        (128, 31, None, False),  # fewer than 16 rows a thread
        (1024, 33, None, False),  # W^T of 16 MiB, in no core's L2
        (1024, 33, "apart", True),
        (128, 33, "together", False),
        (128, 1, "apart", False),  # a thread without a row
    ],
)
def test_rows_go_apart_where_each_thread_has_16_and_the_weights_fit_its_cache(
    monkeypatch, hidden, batch, loop, apart
):
    """On 2 threads, LN-LSTM inference on brgemm: rows go apart from 16 a thread where W^T fits
    one core's L2 cache (as the C library reports it, or 1 MiB), or as SEQNORM_CPU_LOOP says
    where they can; any other value of it is refused, naming it, wherever the loop runs."""
    monkeypatch.setenv("SEQNORM_CPU_PRODUCT", "brgemm")
    if loop is None:
        monkeypatch.delenv("SEQNORM_CPU_LOOP", raising=False)
    else:
        monkeypatch.setenv("SEQNORM_CPU_LOOP", loop)
    cpp.load()
    model = seqnorm.LSTM(4, hidden, norm="layer").eval()
    model.backend = "cpp"
    x = torch.randn(2, batch, 4)
    before, count = torch.get_num_threads(), torch.ops.seqnorm_cpp.loops_apart()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            model(x)
        assert torch.ops.seqnorm_cpp.loops_apart() - count == int(apart)
        monkeypatch.setenv("SEQNORM_CPU_LOOP", "sometimes")
        with (
            pytest.raises(
                RuntimeError,
                match="SEQNORM_CPU_LOOP must be 'apart' or 'together', got 'sometimes'",
            ),
            torch.no_grad(),
        ):
            model(x)  # refused even where rows could not go apart
    finally:
        torch.set_num_threads(before)


def test_the_per_step_product_is_the_one_asked_for_or_the_fastest(monkeypatch):
    """SEQNORM_CPU_PRODUCT decides how the float32 per-step product runs; unset, one of the three
    ways is timed fastest once per shape (a second ask times nothing); float32 weights under 2^16
    values stay on at::mm. This torch has the brgemm kernel (CI must test that way)."""
    cpp.load()
    way = torch.ops.seqnorm_cpp.per_step_product
    for choice in ("packed", "mm", "brgemm"):
        monkeypatch.setenv("SEQNORM_CPU_PRODUCT", choice)
        assert way(1024, 256, 4) == choice
        assert way(64, 16, 4) == "mm"
    monkeypatch.delenv("SEQNORM_CPU_PRODUCT")
    timings = torch.ops.seqnorm_cpp.product_timings
    before = timings()
    chosen = way(1024, 96, 3)  # a shape no other test times
    assert chosen in ("packed", "mm", "brgemm") and timings() == before + 1
    assert way(1024, 96, 3) == chosen and timings() == before + 1


@pytest.mark.parametrize("choice", ["packed", "mm", None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_product_against_float64(monkeypatch, choice, dtype):
    """out = a b or out += a b, with a or b transposed views, on either library (or the timed
    choice), against the float64 product."""
    if choice is None:
        monkeypatch.delenv("SEQNORM_CPU_PRODUCT", raising=False)
    else:
        monkeypatch.setenv("SEQNORM_CPU_PRODUCT", choice)
    cpp.load()
    a, b = torch.randn(40, 24, dtype=dtype), torch.randn(24, 16, dtype=dtype)
    want = a.double() @ b.double()
    tol = {"rtol": 0, "atol": 1e-5 if dtype == torch.float32 else 1e-12}
    for x, y in ((a, b), (a.t().contiguous().t(), b), (a, b.t().contiguous().t())):
        out = torch.full((40, 16), 0.5, dtype=dtype)
        torch.ops.seqnorm_cpp.large_product(out, x, y, True)
        assert_close(out.double(), want + 0.5, **tol)
        torch.ops.seqnorm_cpp.large_product(out, x, y, False)
        assert_close(out.double(), want, **tol)
    with pytest.raises(RuntimeError, match=r"large_product: out \(M, N\) contiguous"):
        torch.ops.seqnorm_cpp.large_product(torch.empty(40, 15, dtype=dtype), a, b, False)


def test_large_product_times_a_shape_once_for_every_length(monkeypatch):
    """The timed choice of a row-major product (the input projection: steps x batch rows) is made
    once for all row counts up to the same power of two, not again for every sequence length."""
    monkeypatch.delenv("SEQNORM_CPU_PRODUCT", raising=False)
    cpp.load()
    b = torch.randn(13, 37)  # a shape no other test times
    timings = torch.ops.seqnorm_cpp.product_timings
    before = timings()
    for rows in (100, 101, 120, 128):
        torch.ops.seqnorm_cpp.large_product(torch.empty(rows, 37), torch.randn(rows, 13), b, False)
    assert timings() - before == 1
    torch.ops.seqnorm_cpp.large_product(torch.empty(129, 37), torch.randn(129, 13), b, False)
    assert timings() - before == 2


@pytest.mark.slow
def test_the_large_products_run_on_onednn_when_asked_for():
    """The products before and after the time loop (the input projection, dW_hh, dW_ih, dx) run
    through oneDNN's matmul with SEQNORM_CPU_PRODUCT=packed, through at::mm with =mm, and through
    oneDNN without the variable under torch.use_deterministic_algorithms(True) (no timed choice,
    which could differ between runs): oneDNN's verbose log (on stdout, from C) lists each product
    it runs, with its shapes."""
    script = (
        "import sys, torch, seqnorm; torch.use_deterministic_algorithms(sys.argv[1] == '1'); "
        "m = seqnorm.LSTM(8, 64, norm='layer'); m.backend = 'cpp'; "
        "x = torch.randn(3, 4, 8, requires_grad=True); m(x)[0].sum().backward(); "
        "v = torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON); v.__enter__(); "
        "m(x)[0].sum().backward(); v.__exit__(None, None, None); "
        "print('timed', torch.ops.seqnorm_cpp.product_timings())"
    )
    shapes, timed = {}, {}
    for choice in ("packed", "mm", "deterministic", "timed"):
        env = {k: v for k, v in os.environ.items() if k != "SEQNORM_CPU_PRODUCT"}
        if choice in ("packed", "mm"):
            env["SEQNORM_CPU_PRODUCT"] = choice
        command = [sys.executable, "-c", script, "1" if choice == "deterministic" else "0"]
        log = subprocess.run(
            command, env=env, check=True, timeout=300, capture_output=True
        ).stdout.decode()
        lines = [line for line in log.splitlines() if ",exec,cpu,matmul," in line]
        shapes[choice] = sorted(line.split(",")[-2] for line in lines)  # then the time
        timed[choice] = int(log.rsplit("timed ", 1)[1])
    # rows = 3 steps x 4 samples; 4H = 256 gate features, 8 inputs, 64 hidden
    every = ["12x256:256x8", "12x8:8x256", "256x12:12x64", "256x12:12x8"]
    assert {k: shapes[k] for k in ("packed", "mm", "deterministic")} == {
        "packed": every,
        "mm": [],
        "deterministic": every,
    }
    # only the unforced, non-deterministic run times anything: each large product's shape once
    assert timed == {"packed": 0, "mm": 0, "deterministic": 0, "timed": 4}
