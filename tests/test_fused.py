"""The fused C++ recurrence against the readable Python loop it replaces, and its own gradcheck."""

import copy

import pytest
import torch
from conftest import NORM_CASES, make
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

import seqnorm
from seqnorm import fused

pytestmark = pytest.mark.skipif(not fused.available(), reason="no C++ toolchain to build it")

LENGTHS = torch.tensor([9, 4, 7, 1, 9, 2])  # a lone sample at the last steps: batch-norm fallback
# (T=4, N=3) for gradcheck: padding in the middle sample, one valid sample at the last step
GRADCHECK_MASK = torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=torch.bool)

CASES = [
    pytest.param(cls, norm, bidir, mode, id=f"{norm}-{cls}-{'bi' if bidir else 'uni'}-{mode}")
    for cls in ["LSTM", "GRU"]
    for norm in NORM_CASES
    for bidir in [False, True]
    for mode in ["full", "lengths", "packed"]
]


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


@pytest.mark.parametrize(("cls", "norm", "bidir", "mode"), CASES)
def test_fused_matches_python_loop(cls, norm, bidir, mode, monkeypatch):
    model, x, hx = _case(cls, norm, bidir)
    reference = copy.deepcopy(model)
    reference.use_fused = False

    calls = []
    monkeypatch.setattr(fused, "_LSTM" if cls == "LSTM" else "_GRU", _counting(calls, cls))
    got = _run(model, x, hx, mode)
    assert len(calls) == 2 * (2 if bidir else 1)  # every layer and direction took the fused path
    want = _run(reference, x, hx, mode)
    assert len(calls) == 2 * (2 if bidir else 1)  # and the reference did not

    for g, w in zip(_outputs(got), _outputs(want)):
        assert_close(g, w)
    assert got[4].keys() == want[4].keys()
    for name in want[4]:  # every parameter's gradient
        assert_close(got[4][name], want[4][name], msg=lambda m, name=name: f"{name}: {m}")
    for name in want[5]:  # batch norm's running statistics, moved identically
        assert_close(got[5][name], want[5][name])


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", NORM_CASES)
def test_fused_float32_is_accurate(cls, norm):
    """In float32 the kernel is within float32 rounding of the float64 result, like the loop."""
    model, x, hx = _case(cls, norm, True)
    want = _run(model, x, hx, "lengths")
    got = _run(copy.deepcopy(model).float(), x.float(), tuple(h.float() for h in hx), "lengths")
    pairs = [*zip(_outputs(got), _outputs(want)), *((got[4][k], want[4][k]) for k in want[4])]
    for g, w in pairs:  # error relative to the largest entry: padding zeros need no rtol
        assert (g.double() - w).abs().max() <= 5e-3 * w.abs().max()


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", NORM_CASES)
def test_fused_float32_large_weights_are_accurate(cls, norm):
    """Hidden 512 in float32: the per-step products run on oneDNN's packed weights (where torch
    has oneDNN), still within float32 rounding of the float64 loop."""
    model = make(cls, norm, hidden_size=512, input_size=8)
    x, lengths = torch.randn(4, 3, 8, dtype=torch.float64), torch.tensor([4, 2, 3])
    reference = copy.deepcopy(model)
    reference.use_fused = False
    fast = copy.deepcopy(model).float()
    with torch.profiler.profile() as prof:
        got_out, got_state = fast(x.float(), lengths=lengths)
        sum(t.square().sum() for t in (got_out, *got_state)).backward()
    want_out, want_state = reference(x, lengths=lengths)
    sum(t.square().sum() for t in (want_out, *want_state)).backward()
    with torch.no_grad():  # the path that keeps no activations gives the same
        assert_close(fast(x.float(), lengths=lengths)[0], got_out, rtol=0, atol=0)
    if torch.backends.mkldnn.is_available():
        assert "mkldnn::_linear_pointwise" in {e.name for e in prof.events()}
    pairs = [(got_out, want_out), *zip(got_state, want_state)]
    pairs += [(p.grad, q.grad) for p, q in zip(fast.parameters(), reference.parameters())]
    for g, w in pairs:
        assert (g.double() - w).abs().max() <= 5e-3 * w.abs().max()


@pytest.fixture
def fresh_cache():
    """The kernel's buffer cache emptied before and after, its limit restored."""
    fused.empty_cache()
    limit = fused.cache_info()["limit"]
    yield
    fused.set_cache_limit(limit)
    fused.empty_cache()


GATES_BYTES = 32 * 64 * 4 * 64 * 4  # the LSTM's gates (T=32, N=64, hidden 64) in float32: 2 MiB


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_fused_step_buffers_come_from_the_cache(cls, fresh_cache):
    """Step buffers of 1 MiB and more (here the projection and the gates, 1.5-2 MiB) are taken
    from the kernel's cache, kept there once freed and handed out again for the next sequence,
    a shorter one too; the profiler sees them while in use; results are the float64 loop's, and
    the same without a backward."""
    model = make(cls, "layer", hidden_size=64, input_size=8)
    reference = copy.deepcopy(model)
    reference.use_fused = False
    fast = copy.deepcopy(model).float()
    x = torch.randn(32, 64, 8, dtype=torch.float64)
    gates = GATES_BYTES * (3 if cls == "GRU" else 4) // 4
    with torch.profiler.profile(profile_memory=True) as prof:
        got, _ = fast(x.float())
        in_use = fused.cache_info()["in_use"]
        assert in_use >= 2 * gates  # the projection (x_hat of it) and x_hat of h W_hh^T
        got.square().sum().backward()
    want, _ = reference(x)
    want.square().sum().backward()
    pairs = [
        (got, want),
        *((p.grad, q.grad) for p, q in zip(fast.parameters(), reference.parameters())),
    ]
    for g, w in pairs:
        assert (g.double() - w).abs().max() <= 1e-4 * w.abs().max()
    with torch.no_grad():  # without a backward, on buffers handed out again
        assert_close(fast(x.float())[0], got, rtol=0, atol=0)
    sizes = [e.nbytes() for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    assert sizes.count(gates) >= 2 and sizes.count(-gates) >= 2  # in use, then back in the cache
    del got
    info = fused.cache_info()
    assert info["in_use"] == 0 and info["cached"] >= in_use
    fast(x[:24].float())[0].sum().backward()  # 3/4 of the length: the same buffers serve
    assert fused.cache_info() == info


def test_fused_cache_limit(fresh_cache):
    """With a limit of 0 nothing is cached and the results are the same, bit for bit; a limit
    keeps at most that many bytes; bad limits are refused, naming the value."""
    model = make("LSTM", "batch", hidden_size=64, input_size=8).float()
    x = torch.randn(32, 64, 8)
    model(x)[0].sum().backward()
    cached = [p.grad.clone() for p in model.parameters()]
    assert fused.cache_info()["cached"] >= 2 * GATES_BYTES
    fused.set_cache_limit(GATES_BYTES)
    assert 0 < fused.cache_info()["cached"] <= GATES_BYTES
    fused.set_cache_limit(0)
    assert fused.cache_info()["cached"] == 0
    model.zero_grad()
    model(x)[0].sum().backward()
    assert fused.cache_info() == {"cached": 0, "in_use": 0, "limit": 0}
    for p, g in zip(model.parameters(), cached):
        assert_close(p.grad, g, rtol=0, atol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"nbytes={bad!r}: expected a whole number"):
            fused.set_cache_limit(bad)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_fused_batch_norm_statistics_split_over_threads(cls):
    """Batch 32 and hidden 128: the per-feature batch statistics and their backward run in
    feature ranges over threads (with padding in the batch); still the loop's, in float64."""
    model = make(cls, "batch", hidden_size=128, input_size=8)
    reference = copy.deepcopy(model)
    reference.use_fused = False
    x = torch.randn(5, 32, 8, dtype=torch.float64)
    lengths = torch.tensor([5, 3, 1, 4] * 8)
    runs = []
    for m in (model, reference):
        out, state = m(x, lengths=lengths)
        states = state if isinstance(state, tuple) else (state,)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        ((out * weights).sum() + sum(s.sum() for s in states)).backward()
        runs.append([out, *states, *(p.grad for p in m.parameters()), *m.buffers()])
    for got, want in zip(*runs):
        assert_close(got, want)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", NORM_CASES)
def test_fused_backward_over_chunks_matches_python_loop(cls, norm):
    """Batch 64: the backward hands its gradients on 8 steps at a time (3 chunks of 20 steps,
    the last one short) to the input norm's backward and the weight and input products; with
    padding, two layers (the second one's input gradient) and both directions, in float64."""
    model = make(cls, norm, hidden_size=8, num_layers=2, bidirectional=True)
    reference = copy.deepcopy(model)
    reference.use_fused = False
    x = torch.randn(20, 64, 5, dtype=torch.float64)
    lengths = torch.randint(1, 21, (64,), generator=torch.Generator().manual_seed(0))
    lengths[:3] = torch.tensor([20, 17, 9])  # sequences ending inside and at the end of chunks
    runs = []
    for m in (model, reference):
        xi = x.clone().requires_grad_()
        out, state = m(xi, lengths=lengths)
        states = state if isinstance(state, tuple) else (state,)
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        ((out * weights).sum() + sum(s.sum() for s in states)).backward()
        runs.append([out, *states, xi.grad, *(p.grad for p in m.parameters()), *m.buffers()])
    for got, want in zip(*runs):
        assert_close(got, want)


def _outputs(run):
    """The output, final states and the gradients of the input and initial states of a run."""
    out, states, dx, dhx = run[:4]
    return [out, *states, dx, *dhx]


def _case(cls, norm, bidir):
    model = make(cls, norm, hidden_size=16, bidirectional=bidir, num_layers=2)
    x = torch.randn(9, 6, 5, dtype=torch.float64)
    dirs = 2 if bidir else 1
    hx = tuple(
        torch.randn(2 * dirs, 6, 16, dtype=torch.float64) for _ in range(2 if cls == "LSTM" else 1)
    )
    return model, x, hx


def _counting(calls, cls):
    original = fused._LSTM if cls == "LSTM" else fused._GRU

    class Counting(original):
        @staticmethod
        def forward(ctx, *args):
            calls.append(1)
            return original.forward(ctx, *args)

    return Counting


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", NORM_CASES)
@pytest.mark.parametrize("mode", ["full", "lengths", "packed"])
def test_fused_without_grad_matches_python_loop(cls, norm, mode):
    """Without a backward the kernel keeps no step's activations (a ring of two states instead):
    outputs, final states and running statistics are still the loop's, in training mode."""
    model, x, hx = _case(cls, norm, True)
    reference = copy.deepcopy(model)
    reference.use_fused = False
    state_in = hx if cls == "LSTM" else hx[0]
    runs = []
    for m in (model, reference):
        with torch.no_grad():
            if mode == "packed":
                out, state = m(pack_padded_sequence(x, LENGTHS, enforce_sorted=False), state_in)
                out = pad_packed_sequence(out, total_length=x.shape[0])[0]
            else:
                out, state = m(x, state_in, lengths=None if mode == "full" else LENGTHS)
        runs.append((out, *(state if cls == "LSTM" else (state,)), *m.buffers()))
    assert len(runs[0]) == len(runs[1])
    for got, want in zip(*runs):
        assert_close(got, want)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", NORM_CASES)
def test_fused_eval_mode_matches_python_loop(cls, norm):
    model = make(cls, norm, hidden_size=16).eval()
    if norm == "batch":  # non-trivial running statistics
        for name, buf in model.named_buffers():
            buf.uniform_(0.5, 1.5) if "var" in name else buf.normal_()
    reference = copy.deepcopy(model)
    reference.use_fused = False
    x = torch.randn(7, 1, 5, dtype=torch.float64)  # batch of one: fine in eval mode
    with torch.no_grad():
        assert_close(model(x)[0], reference(x)[0])


def _gradcheck_model(cls, norm, training):
    """A one-layer float64 model in train or eval mode; in eval mode batch norm's running
    statistics are non-trivial."""
    model = make(cls, norm, hidden_size=8, input_size=3).train(training)
    if norm == "batch" and not training:
        for name, buf in model.named_buffers():
            buf.uniform_(0.5, 1.5) if "var" in name else buf.normal_()
    return model


def _leaves(*tensors):
    return tuple(None if t is None else t.detach().clone().requires_grad_() for t in tensors)


# Whole directions, input half included: the projection, its norm (under a mask batch statistics
# come from the valid samples only, and a step with one valid sample uses running ones), gain and
# bias, then the recurrence, in both modes.
GRADCHECK_CASES = pytest.mark.parametrize(
    ("norm", "masked", "training"),
    [(n, m, t) for n in NORM_CASES for m in (False, True) for t in (True, False)],
)


@GRADCHECK_CASES
def test_lstm_function_gradcheck(norm, masked, training):
    model = _gradcheck_model("LSTM", norm, training)
    t, n, h = 4, 3, 8
    mask = GRADCHECK_MASK if masked else None
    norm_ih, norm_hh, norm_c = model.norm_ih_l0, model.norm_hh_l0, model.norm_c_l0
    specs = fused._Spec(norm_ih, None, t, mask), fused._Spec(norm_hh, norm_c, t, mask)
    gamma_ih, beta_ih = fused._input_affine(norm_ih, model.bias_ih_l0 + model.bias_hh_l0)
    gamma_hh = None if norm_hh is None else norm_hh.weight
    gamma_c, beta_c = (None, None) if norm_c is None else (norm_c.weight, norm_c.bias)
    x = torch.randn(t, n, 3, dtype=torch.float64)
    h0, c0 = torch.randn(2, n, h, dtype=torch.float64)
    inputs = _leaves(x, model.weight_ih_l0, gamma_ih, beta_ih, h0, c0, model.weight_hh_l0)
    inputs += _leaves(gamma_hh, gamma_c, beta_c)

    def f(*args):  # the kernel reads only eps, groups and statistics from the norms
        return fused._LSTM.apply(*args, *specs)

    assert torch.autograd.gradcheck(f, inputs)


@GRADCHECK_CASES
def test_gru_function_gradcheck(norm, masked, training):
    model = _gradcheck_model("GRU", norm, training)
    t, n, h = 4, 3, 8
    mask = GRADCHECK_MASK if masked else None
    norm_ih, norm_hh = model.norm_ih_l0, model.norm_hh_l0
    specs = fused._Spec(norm_ih, None, t, mask), fused._Spec(norm_hh, None, t, mask)
    gamma_ih, beta_ih = fused._input_affine(norm_ih, model.bias_ih_l0)
    x = torch.randn(t, n, 3, dtype=torch.float64)
    h0 = torch.randn(n, h, dtype=torch.float64)
    inputs = _leaves(x, model.weight_ih_l0, gamma_ih, beta_ih, h0, model.weight_hh_l0)
    inputs += _leaves(model.bias_hh_l0, None if norm_hh is None else norm_hh.weight)

    def f(*args):
        return fused._GRU.apply(*args, *specs)

    assert torch.autograd.gradcheck(f, inputs)


def test_python_loop_where_the_kernel_does_not_apply():
    lstm = seqnorm.LSTM(4, 8)
    x = torch.randn(3, 2, 4)
    assert fused.applies(x, norms=(lstm.norm_hh_l0,))
    assert not fused.applies(x.half(), norms=())
    assert not fused.applies(x, x.double(), norms=())  # mixed dtypes
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused.applies(x, norms=())
    bn = seqnorm.LSTM(4, 8, norm="batch").norm_hh_l0
    bn.sync = True
    assert fused.applies(x, norms=(bn,))  # sync without a process group: local statistics


def test_build_failure_warns_and_falls_back(monkeypatch):
    import torch.utils.cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(fused, "_loaded", None)
    monkeypatch.setattr(torch.utils.cpp_extension, "load", broken)
    with pytest.warns(UserWarning, match="no compiler here"):
        assert not fused.available()
    lstm = seqnorm.LSTM(4, 8)
    out, _ = lstm(torch.randn(3, 2, 4))  # the Python loop
    assert out.shape == (3, 2, 8)


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(fused, "_loaded", None)
    monkeypatch.setenv("SEQNORM_FUSED", "0")
    assert not fused.available()
