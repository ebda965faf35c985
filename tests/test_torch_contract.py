"""PyTorch's own tests of nn.LSTM, nn.GRU, nn.LSTMCell and nn.GRUCell, adapted to seqnorm.

The generic module tests of PyTorch's test/test_modules.py (forward on the ModuleInfo samples of
torch/testing/_internal/common_modules.py, factory kwargs, repr, pickling, non-contiguous inputs,
gradcheck and gradgradcheck with batched gradients, dtype conversion, to_empty, meta-device
construction, error inputs) and the RNN tests of test/test_nn.py (cells, argument checks, initial
states, projections, dropout, weight norm and pruning through ``_flat_weights``, packed variable
sequences, retained graphs, backward to the input only, zero sizes), rewritten here.

Each test runs on ``torch.nn`` itself as the control (an adapted test that torch fails would
test nothing) and on seqnorm with ``norm="none"``; the API, shape, error, serialization and
device/dtype tests also with ``norm="layer"``, ``"group"`` and ``"batch"``.
"""

from __future__ import annotations

import copy
import io
import itertools
import pickle

import pytest
import torch
import torch.nn.utils.prune
from helpers import flat
from torch import nn
from torch.nn.utils import rnn as rnn_utils
from torch.testing import assert_close

import seqnorm

CONTROL_AND_NONE = ["torch", "none"]
EVERY = ["torch", "none", "layer", "group", "batch"]
CLASSES = ["LSTM", "GRU", "LSTMCell", "GRUCell"]


def build(impl: str, cls: str, *args, **kwargs):
    """``torch.nn.<cls>`` for ``impl="torch"``, else seqnorm's with ``norm=impl``."""
    if impl == "torch":
        return getattr(nn, cls)(*args, **kwargs)
    hidden = kwargs.get("hidden_size", args[1] if len(args) > 1 else None)
    # two groups where the hidden size allows, so that the cell state's groups keep two units
    groups = (
        2 if impl == "group" and isinstance(hidden, int) and hidden % 2 == 0 and hidden >= 4 else 1
    )
    return getattr(seqnorm, cls)(*args, norm=impl, groups=groups, **kwargs)


def batch_of_one_ok(module, impl: str):
    """Batch norm has no training statistics for one sample: such samples run it in eval mode."""
    if impl == "batch":
        module.eval()
    return module


# --- the ModuleInfo samples (common_modules.py), rewritten -------------------------------------


def samples(cls: str):
    """(constructor kwargs, forward args) of the no-batch-dim samples torch tests each class on."""
    make = lambda *shape: torch.randn(*shape, dtype=torch.float64)
    if cls in ("GRUCell", "LSTMCell"):
        hx = (make(10), make(10)) if cls == "LSTMCell" else make(10)
        return [
            ({"input_size": 5, "hidden_size": 10}, (make(5), hx)),
            ({"input_size": 5, "hidden_size": 10, "bias": True}, (make(5), hx)),
        ]
    out = []
    projections = (0, 2) if cls == "LSTM" else (0,)
    for bias, batch_first, bidir, proj in itertools.product(
        (False, True), (False, True), (False, True), projections
    ):
        kw = {
            "input_size": 2,
            "num_layers": 2,
            "batch_first": batch_first,
            "bias": bias,
            "bidirectional": bidir,
        }
        if cls == "LSTM":
            kw["proj_size"] = proj
        layers = 4 if bidir else 2
        out.append(
            ({**kw, "hidden_size": 2 if cls == "GRU" else 3}, (make(3 if cls == "GRU" else 2, 2),))
        )
        h_size = proj or 3
        hx = (make(layers, h_size), make(layers, 3)) if cls == "LSTM" else make(layers, 3)
        out.append(({**kw, "hidden_size": 3}, (make(3, 2), hx)))
    return out


def batched_reference(module, cls: str, kw: dict, args):
    """The no-batch-dim reference: the same input as a batch of one, squeezed back."""
    if cls.endswith("Cell"):
        x, hx = args
        hx = tuple(h.unsqueeze(0) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(0)
        out = module(x.unsqueeze(0), hx)
        return tuple(o.squeeze(0) for o in out) if isinstance(out, tuple) else out.squeeze(0)
    x = args[0].unsqueeze(0 if kw["batch_first"] else 1)
    hx = args[1] if len(args) > 1 else None
    if hx is not None:
        hx = tuple(h.unsqueeze(1) for h in hx) if isinstance(hx, tuple) else hx.unsqueeze(1)
    out, state = module(x, hx)
    out = out.squeeze(0 if kw["batch_first"] else 1)
    state = tuple(s.squeeze(1) for s in state) if isinstance(state, tuple) else state.squeeze(1)
    return out, state


SAMPLE_CASES = [
    pytest.param(cls, i, id=f"{cls}-{i}") for cls in CLASSES for i in range(len(samples(cls)))
]


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize(("cls", "index"), SAMPLE_CASES)
def test_forward(impl, cls, index):
    """test_modules.py::test_forward: unbatched input equals the same input as a batch of one."""
    kw, args = samples(cls)[index]
    m = batch_of_one_ok(build(impl, cls, **kw).double(), impl)
    assert_close(flat(m(*args)), flat(batched_reference(m, cls, kw, args)))


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", CLASSES)
def test_factory_kwargs(impl, cls):
    """Parameters and buffers are created with the device and dtype asked for."""
    for kw, _ in samples(cls):
        m = build(impl, cls, **kw, device="cpu", dtype=torch.float64)
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            assert t.device.type == "cpu" and t.dtype == torch.float64, name


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", CLASSES)
def test_device_ctx_init(impl, cls):
    """Built under ``with torch.device('meta')`` as with ``device='meta'``."""
    kw = samples(cls)[-1][0]
    with torch.device("meta"):
        a = build(impl, cls, **kw)
    b = build(impl, cls, **kw, device="meta")
    for (na, ta), (nb, tb) in zip(
        itertools.chain(a.named_parameters(), a.named_buffers()),
        itertools.chain(b.named_parameters(), b.named_buffers()),
    ):
        assert na == nb and ta.is_meta and tb.is_meta and ta.shape == tb.shape


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", CLASSES)
def test_repr(impl, cls):
    for kw, _ in samples(cls):
        text = repr(build(impl, cls, **kw))
        assert text.startswith(cls + "(")
        if kw.get("proj_size"):
            assert f"proj_size={kw['proj_size']}" in text


def _safe_globals(impl, module):
    return seqnorm.SAFE_GLOBALS if impl != "torch" else [type(module)]


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", CLASSES)
def test_save_load(impl, cls):
    """test_modules.py::test_save_load, with torch.load's default ``weights_only=True`` (given
    the classes to allow), as torch's word_language_model example saves and loads its model."""
    kw, args = samples(cls)[-1]
    m = batch_of_one_ok(build(impl, cls, **kw).double(), impl)
    want = flat(m(*args))
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    with torch.serialization.safe_globals(_safe_globals(impl, m)):
        loaded = torch.load(buffer)
    assert_close(flat(loaded(*args)), want)
    assert_close(flat(pickle.loads(pickle.dumps(m))(*args)), want)


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", CLASSES)
def test_non_contiguous_tensors(impl, cls):
    """Inputs and states that are views of transposed storage give the same outputs and
    gradients as contiguous ones."""
    kw, args = samples(cls)[-1]
    m = batch_of_one_ok(build(impl, cls, **kw).double(), impl)

    def non_contiguous(t):
        t2 = torch.stack([t, t], dim=-1).select(-1, 0)  # every other element of a doubled tensor
        assert not t2.is_contiguous() or t2.numel() <= 1
        return t2

    def run(transform):
        leaves = [t.detach().clone().requires_grad_() for t in flat(args)]
        it = iter(leaves)
        rebuilt = []
        for a in args:
            if isinstance(a, tuple):
                rebuilt.append(tuple(transform(next(it)) for _ in a))
            else:
                rebuilt.append(transform(next(it)))
        out = flat(m(*rebuilt))
        sum(o.sum() for o in out).backward()
        return out, [t.grad for t in leaves]

    assert_close(run(non_contiguous), run(lambda t: t))


def _gradient_inputs(impl, cls, kw, args, training=True):
    m = build(impl, cls, **kw).double().train(training)
    if impl == "batch":
        m.eval()  # one sample: running statistics, fixed between gradcheck's evaluations
    params = dict(m.named_parameters())
    leaves = [t.detach().clone().requires_grad_() for t in flat(args)]

    def f(*tensors):
        it = iter(tensors[: len(leaves)])
        rebuilt = [tuple(next(it) for _ in a) if isinstance(a, tuple) else next(it) for a in args]
        ps = dict(zip(params, tensors[len(leaves) :]))
        return tuple(flat(torch.func.functional_call(m, ps, tuple(rebuilt))))

    inputs = (*leaves, *(p.detach().clone().requires_grad_() for p in params.values()))
    return f, inputs


GRADIENT_CASES = [
    pytest.param(cls, i, id=f"{cls}-{i}") for cls in CLASSES for i in (0, len(samples(cls)) - 1)
]


@pytest.mark.parametrize("impl", [*CONTROL_AND_NONE, "layer"])
@pytest.mark.parametrize(("cls", "index"), GRADIENT_CASES)
def test_grad(impl, cls, index):
    """test_modules.py::test_grad: gradcheck over inputs and parameters, batched gradients too
    (torch's tests run it with check_batched_grad=True)."""
    kw, args = samples(cls)[index]
    f, inputs = _gradient_inputs(impl, cls, kw, args)
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True, fast_mode=True)


@pytest.mark.slow
@pytest.mark.parametrize("impl", [*CONTROL_AND_NONE, "layer"])
@pytest.mark.parametrize(("cls", "index"), GRADIENT_CASES)
def test_gradgrad(impl, cls, index):
    """test_modules.py::test_gradgrad: second derivatives (a gradient penalty needs them)."""
    kw, args = samples(cls)[index]
    f, inputs = _gradient_inputs(impl, cls, kw, args)
    assert torch.autograd.gradgradcheck(f, inputs, check_batched_grad=True, fast_mode=True)


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize("swap", [False, True])
def test_to(impl, cls, swap):
    """test_modules.py::test_to: dtype conversion keeps Parameters (with or without
    swap_tensors), and the converted module runs."""
    kw, args = samples(cls)[-1]
    m = batch_of_one_ok(build(impl, cls, **kw), impl)
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        ids = [id(p) for p in m.parameters()]
        m.to(torch.float64)
        assert all(isinstance(p, nn.Parameter) and p.dtype == torch.float64 for p in m.parameters())
        if swap:
            assert ids == [id(p) for p in m.parameters()]
        assert all(t.dtype == torch.float64 for t in flat(m(*args)))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", CLASSES)
def test_to_empty(impl, cls):
    kw, args = samples(cls)[-1]
    m = build(impl, cls, **kw, device="meta")
    m.to_empty(device="cpu")
    m.double()
    m.reset_parameters()
    batch_of_one_ok(m, impl)
    assert all(t.isfinite().all() for t in flat(m(*args)))


# --- error inputs (common_modules.py's module_error_inputs_*), rewritten ------------------------

CONSTRUCTION_ERRORS = [
    ((10, 0, 1), ValueError, "hidden_size must be greater than zero"),
    ((10, 10, 0), ValueError, "num_layers must be greater than zero"),
    ((3, 5), {"bias": 0}, TypeError, "bias should be of type bool, got: int"),
    ((3, 5), {"bias": 1}, TypeError, "bias should be of type bool, got: int"),
    ((3, 5), {"bias": "True"}, TypeError, "bias should be of type bool, got: str"),
    ((3, 5), {"batch_first": 0}, TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), {"batch_first": 1}, TypeError, "batch_first should be of type bool, got: int"),
    ((3, 5), {"batch_first": "False"}, TypeError, "batch_first should be of type bool, got: str"),
    ((3.0, 5), TypeError, "input_size should be of type int, got: float"),
    (("10", 5), TypeError, "input_size should be of type int, got: str"),
    ((0, 5), ValueError, "input_size must be greater than zero"),
    ((-1, 5), ValueError, "input_size must be greater than zero"),
    ((3, 5.0), TypeError, "hidden_size should be of type int, got: float"),
    ((3, "5"), TypeError, "hidden_size should be of type int, got: str"),
    ((3, -1), ValueError, "hidden_size must be greater than zero"),
]


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("case", range(len(CONSTRUCTION_ERRORS)))
def test_construction_errors(impl, cls, case):
    args, *rest = CONSTRUCTION_ERRORS[case]
    kwargs, error, match = rest if len(rest) == 3 else ({}, *rest)
    with pytest.raises(error, match=match):
        build(impl, cls, *args, **kwargs)


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_forward_dtype_mismatch_error(impl, cls):
    m = build(impl, cls, 3, 5, dtype=torch.float32)
    with pytest.raises(
        ValueError,
        match=r"RNN input dtype .* does not match weight dtype .* Convert input: input\.to\(.*\), or convert model: model\.to\(.*\)",
    ):
        m(torch.randn(2, 4, 3, dtype=torch.float64))


CELL_ERRORS = {
    "GRUCell": [
        ((3, 11), (3, 20), RuntimeError, "input has inconsistent input_size: got 11 expected 10"),
        (
            (3, 10),
            (3, 21),
            RuntimeError,
            "hidden0 has inconsistent hidden_size: got 21, expected 20",
        ),
        ((3, 10), (5, 20), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
        ((3, 10), (3, 1, 1, 20), ValueError, "Expected hidden to be 1D or 2D, got 4D instead"),
    ],
    "LSTMCell": [
        ((3, 11), (3, 20), RuntimeError, "input has inconsistent input_size: got 11 expected 10"),
        (
            (3, 10),
            (3, 21),
            RuntimeError,
            "hidden0 has inconsistent hidden_size: got 21, expected 20",
        ),
        ((3, 10), (5, 20), RuntimeError, "Input batch size 3 doesn't match hidden0 batch size 5"),
        ((3, 10), (3, 1, 1, 20), ValueError, r"Expected hx\[0\] to be 1D or 2D, got 4D instead"),
    ],
}


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize(("cls", "case"), [(c, i) for c in CELL_ERRORS for i in range(4)])
def test_cell_forward_errors(impl, cls, case):
    x_shape, h_shape, error, match = CELL_ERRORS[cls][case]
    m = build(impl, cls, 10, 20)
    h = torch.randn(h_shape)
    with pytest.raises(error, match=match):
        m(torch.randn(x_shape), (h, h) if cls == "LSTMCell" else h)


# --- test_nn.py's RNN tests, rewritten ---------------------------------------------------------


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["GRUCell", "LSTMCell"])
@pytest.mark.parametrize("bias", [True, False])
def test_rnn_cell(impl, cls, bias):
    """test_RNN_cell / test_LSTM_cell: six steps of a cell, then a backward."""
    cell = build(impl, cls, 10, 20, bias=bias)
    x, h = torch.randn(3, 10), torch.randn(3, 20)
    hx = (h, torch.randn(3, 20)) if cls == "LSTMCell" else h
    for _ in range(6):
        hx = cell(x, hx)
    sum(t.sum() for t in flat(hx)).backward()
    assert all(p.grad is not None for p in cell.parameters())


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["GRUCell", "LSTMCell"])
def test_rnn_cell_forward_zero_hidden_size(impl, cls):
    cell = build(impl, cls, 10, 0)
    hx = torch.randn(3, 0)
    out = cell(torch.randn(3, 10), (hx, hx) if cls == "LSTMCell" else hx)
    assert all(t.shape == (3, 0) for t in flat(out))


@pytest.mark.parametrize("impl", EVERY)
def test_rnn_cell_no_broadcasting(impl):
    """Wrong batch, hidden or input sizes never broadcast: each is a RuntimeError."""
    good = torch.randn(3, 20)
    for x, bad in [
        (torch.randn(3, 10), torch.randn(1, 20)),
        (torch.randn(3, 10), torch.randn(3, 1)),
        (torch.randn(3, 1), good),
    ]:
        for cls, hx in [("GRUCell", bad), ("LSTMCell", (bad, good)), ("LSTMCell", (good, bad))]:
            with pytest.raises(RuntimeError):
                build(impl, cls, 10, 20)(x, hx)


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_args_check(impl, cls):
    """Wrong input batch, hidden batch, input size, hidden size or layers: RuntimeError."""
    input_size, hidden_size, layers, batch, steps, bad = 3, 5, 2, 4, 6, 7
    good_x, good_h = (steps, batch, input_size), (layers, batch, hidden_size)
    model = build(impl, cls, input_size, hidden_size, layers)

    def cases():
        for dim, shape_x, shape_h in [
            (1, True, False),
            (1, False, True),
            (2, True, False),
            (2, False, True),
            (0, False, True),
        ]:
            x_shape = list(good_x)
            h_shape = list(good_h)
            if shape_x:
                x_shape[dim] = bad
            if shape_h:
                h_shape[dim] = bad
            x, h = torch.randn(x_shape), torch.randn(h_shape)
            if cls == "GRU":
                yield x, h
            elif h_shape == list(good_h):
                yield x, (h, h)
            else:
                yield x, (h, torch.randn(good_h))
                yield x, (torch.randn(good_h), h)

    for x, hx in cases():
        with pytest.raises(RuntimeError):
            model(x, hx)


@pytest.mark.parametrize("impl", EVERY)
def test_projections_lstm_args_check(impl):
    """test_projections_lstm_args_check: h has proj_size features, c hidden_size."""
    model = build(impl, "LSTM", 3, 5, 2, proj_size=2)
    x = torch.randn(6, 4, 3)
    good_h, good_c = torch.randn(2, 4, 2), torch.randn(2, 4, 5)
    for hx in [
        (torch.randn(2, 4, 5), good_c),
        (good_h, torch.randn(2, 4, 2)),
        (torch.randn(2, 7, 2), good_c),
    ]:
        with pytest.raises(RuntimeError):
            model(x, hx)
    out, (h, c) = model(x, (good_h, good_c))
    assert out.shape == (6, 4, 2) and h.shape == (2, 4, 2) and c.shape == (2, 4, 5)


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_initial_hidden_state(impl, cls):
    """Zero initial states given explicitly equal the default."""
    rnn = build(impl, cls, 30, 20, 2)
    x, h = torch.randn(10, 32, 30), torch.zeros(2, 32, 20)
    hx = (h, h) if cls == "LSTM" else h
    assert_close(flat(rnn(x, hx)), flat(rnn(x)))


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("bidir", [False, True])
def test_projections_lstm_initial_hidden_state(impl, bidir):
    rnn = build(impl, "LSTM", 30, 20, 2, bidirectional=bidir, proj_size=10)
    dirs = 2 if bidir else 1
    x = torch.randn(10, 32, 30)
    hx = (torch.zeros(2 * dirs, 32, 10), torch.zeros(2 * dirs, 32, 20))
    assert_close(flat(rnn(x, hx)), flat(rnn(x)))


@pytest.mark.parametrize("impl", EVERY)
def test_projections_errors_on_gru(impl):
    with pytest.raises(
        ValueError, match="proj_size argument is only supported for LSTM, not RNN or GRU"
    ):
        build(impl, "GRU", 30, 20, 2, proj_size=10)


@pytest.mark.parametrize("impl", CONTROL_AND_NONE)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("p", [0.0, 0.276, 1.0])
def test_rnn_dropout_between_layers(impl, cls, p):
    """test_RNN_dropout: dropout sits between layers only, in training only. With the same seed
    seqnorm draws the same masks as torch.nn, so the outputs are equal."""
    torch.manual_seed(0)
    control = getattr(nn, cls)(10, 16, 3, dropout=p)
    m = build(impl, cls, 10, 16, 3, dropout=p)
    m.load_state_dict(control.state_dict(), strict=impl == "torch")
    x = torch.randn(4, 2, 10)
    for train in (True, False):
        m.train(train), control.train(train)
        torch.manual_seed(1)
        got = flat(m(x))
        torch.manual_seed(1)
        assert_close(got, flat(control(x)))


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_change_dropout(impl, cls):
    """test_RNN_change_dropout: the dropout attribute can be changed between calls."""
    rnn = build(impl, cls, 100, 100, 2, dropout=0.0)
    x = torch.rand(1, 16, 100)
    for train in (True, False):
        rnn.train(train)
        previous = None
        for p in (0, 0.5, 0, 0.7, 0.2, 1, 0.2, 0):
            rnn.dropout = p
            a, b = flat(rnn(x)), flat(rnn(x))
            if p in (0, 1) or not train:
                assert_close(a, b)
            else:
                assert not torch.equal(a[0], b[0])
            if previous is not None and not train:
                assert_close(a[0], previous)
            previous = a[0]


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("p", [0.0, 0.1234])
def test_rnn_dropout_state(impl, cls, p):
    """test_RNN_dropout_state: a pickled and reloaded model keeps its dropout."""
    rnn = build(impl, cls, 100, 100, 2, bias=False, dropout=p)
    x = torch.rand(1, 16, 100)
    for train in (True, False):
        rnn.train(train)
        a, b = flat(rnn(x)), flat(rnn(x))
        buffer = io.BytesIO()
        torch.save(rnn, buffer)
        buffer.seek(0)
        with torch.serialization.safe_globals(_safe_globals(impl, rnn)):
            c = flat(torch.load(buffer)(x))
        if p == 0 or not train:
            assert_close(a, b) and assert_close(a, c)
        else:
            assert not torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize(
    ("name", "count", "proj"), [("weight_ih_l0", 4, 0), ("weight_hr_l0", 5, 16)]
)
def test_rnn_weight_norm(impl, name, count, proj):
    """test_rnn_weight_norm: weight norm turns one of ``_flat_weights`` into a plain tensor, and
    its removal restores the Parameter; the forward sees the normed weight."""
    lstm = build(impl, "LSTM", 32, 32, proj_size=proj)
    lstm = torch.nn.utils.weight_norm(lstm, name=name)
    assert sum(isinstance(w, nn.Parameter) for w in lstm._flat_weights) == count - 1
    x = torch.randn(3, 2, 32)
    out = lstm(x)[0]
    with torch.no_grad():
        getattr(lstm, name + "_g").mul_(2)
    assert not torch.equal(lstm(x)[0], out)  # the forward reads the parametrized weight
    lstm = torch.nn.utils.remove_weight_norm(lstm, name=name)
    assert sum(isinstance(w, nn.Parameter) for w in lstm._flat_weights) == count
    assert name in lstm._parameters and lstm._parameters[name] is not None
    names = dict(lstm.named_parameters())
    assert name in names and name + "_v" not in names and name + "_g" not in names


@pytest.mark.parametrize("impl", EVERY)
def test_rnn_pruning(impl):
    """test_rnn_pruning: a pruning mask shows in ``_flat_weights`` and in the forward."""
    lstm = build(impl, "LSTM", 32, 32)
    torch.nn.utils.prune.l1_unstructured(lstm, "weight_ih_l0", 0.5)
    assert sum(isinstance(w, nn.Parameter) for w in lstm._flat_weights) == 3
    x = torch.randn(3, 2, 32)
    masked = lstm(x)[0]
    torch.nn.utils.prune.remove(lstm, "weight_ih_l0")
    assert sum(isinstance(w, nn.Parameter) for w in lstm._flat_weights) == 4
    assert "weight_ih_l0" in lstm._parameters and "weight_ih_l0_orig" not in lstm._parameters
    assert_close(lstm(x)[0], masked)  # the pruned weight is the weight now
    assert (lstm.weight_ih_l0 == 0).sum() == 32 * 32 * 4 // 2


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_all_weights(impl, cls):
    """``all_weights`` lists torch's weights per layer and direction, so that code copying
    weights through it works in both directions."""
    kw = {"num_layers": 2, "bidirectional": True}
    src, dst = build("torch", cls, 5, 6, **kw), build(impl, cls, 5, 6, **kw)
    assert [[w.shape for w in ws] for ws in src.all_weights] == [
        [w.shape for w in ws] for ws in dst.all_weights
    ]
    with torch.no_grad():
        for a, b in zip(src.all_weights, dst.all_weights):
            for p, q in zip(a, b):
                q.copy_(p)
    for name, p in src.named_parameters():
        assert torch.equal(getattr(dst, name), p)
    assert dst._flat_weights_names == src._flat_weights_names
    assert dst.mode == src.mode == cls


@pytest.mark.parametrize("impl", ["torch", "none", "layer", "group"])
@pytest.mark.parametrize(
    ("enforce_sorted", "lengths"),
    [
        (True, [5]),
        (False, [5]),
        (True, [10, 10, 6, 2, 2, 1, 1]),
        (False, [10, 10, 6, 2, 2, 1, 1]),
        (False, [2, 1, 3, 2, 10, 5, 3]),
    ],
)
@pytest.mark.parametrize("default_hidden", [True, False])
@pytest.mark.parametrize("proj", [0, 2])
def test_variable_sequence(impl, enforce_sorted, lengths, default_hidden, proj):
    """test_variable_sequence: a packed batch equals each sequence run alone, forward and backward
    (per-sample norms only: batch norm's statistics depend on the batch by design)."""
    torch.manual_seed(0)
    x_leaf = torch.randn(max(lengths), len(lengths), 3, dtype=torch.float64, requires_grad=True)
    lstm = build(impl, "LSTM", 3, 4, bidirectional=True, num_layers=2, proj_size=proj).double()
    lstm2 = copy.deepcopy(lstm)
    hidden0 = None
    if not default_hidden:
        hidden0 = (
            torch.randn(4, len(lengths), proj or 4, dtype=torch.float64),
            torch.randn(4, len(lengths), 4, dtype=torch.float64),
        )
    outs, hiddens = [], []
    for i, n in enumerate(lengths):
        h_i = None if hidden0 is None else tuple(h[:, i : i + 1].contiguous() for h in hidden0)
        out, hid = lstm2(x_leaf[:n, i : i + 1], h_i)
        outs.append(torch.cat([out, out.new_zeros(max(lengths) - n, *out.shape[1:])]))
        hiddens.append(hid)
    seq_out = torch.cat(outs, 1)
    seq_hidden = tuple(torch.cat(h, 1) for h in zip(*hiddens))
    packed = rnn_utils.pack_padded_sequence(x_leaf, lengths, enforce_sorted=enforce_sorted)
    packed_out, packed_hidden = lstm(packed, hidden0)
    unpacked, unpacked_len = rnn_utils.pad_packed_sequence(packed_out)
    assert_close(packed_hidden, seq_hidden)
    assert_close(unpacked, seq_out)
    assert unpacked_len.tolist() == lengths
    seq_out.sum().backward()
    grad_x = x_leaf.grad.clone()
    x_leaf.grad.zero_()
    unpacked.sum().backward()
    assert_close(x_leaf.grad, grad_x)
    for p1, p2 in zip(lstm.parameters(), lstm2.parameters()):
        assert_close(p1.grad, p2.grad)


@pytest.mark.slow
@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_retain_variables(impl, cls):
    """test_rnn_retain_variables: a retained graph gives the same gradients every time."""
    rnn = build(impl, cls, 10, 20, num_layers=2).double()
    x = torch.randn(5, 6, 10, dtype=torch.float64, requires_grad=True)
    out = rnn(x)[0]
    out.sum().backward(retain_graph=True)
    grads = [x.grad.clone()] + [p.grad.clone() for p in rnn.parameters()]
    for _ in range(4):
        rnn.zero_grad()
        x.grad.zero_()
        out.sum().backward(retain_graph=True)
        assert_close([x.grad] + [p.grad for p in rnn.parameters()], grads)


@pytest.mark.parametrize("impl", EVERY)
def test_rnn_backward_to_input_but_not_parameters(impl):
    rnn = build(impl, "LSTM", 2, 3)
    for p in rnn.parameters():
        p.requires_grad = False
    x = torch.randn(1, 2, 2, requires_grad=True)
    rnn(x)[0].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", EVERY)
def test_lstmcell_backward_only_one_output_grad(impl):
    cell = build(impl, "LSTMCell", 2, 3).double()
    if impl == "batch":
        cell.eval()
    x = torch.randn(1, 2, dtype=torch.float64, requires_grad=True)
    for i in range(2):
        cell(x)[i].sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["torch", "none", "layer", "group"])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_rnn_input_size_zero(impl, cls):
    """test_RNN_input_size_zero: a batch of zero samples runs and backpropagates."""
    rnn = build(impl, cls, 3, 4)
    out = rnn(torch.zeros(5, 0, 3))[0]
    assert out.shape == (5, 0, 4)
    out.sum().backward()


@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_sequence_length_zero(impl, cls):
    """torch refuses an empty sequence; so does seqnorm, with the same message."""
    with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
        build(impl, cls, 3, 4)(torch.randn(0, 2, 3))


@pytest.mark.parametrize("impl", CONTROL_AND_NONE)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("bias", [True, False])
def test_grad_and_gradgrad(impl, cls, bias):
    """test_LSTM_grad_and_gradgrad / test_GRU_grad_and_gradgrad."""
    mod = build(impl, cls, 4, 4, bias=bias).double()
    x = torch.rand(1, 3, 4, dtype=torch.float64, requires_grad=True)
    f = lambda x: tuple(flat(mod(x)))
    assert torch.autograd.gradcheck(f, x, check_batched_grad=False)
    assert torch.autograd.gradgradcheck(f, x, check_batched_grad=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", EVERY)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_cpu_gpu_parity_and_device_check(impl, cls):
    """test_cpu_gpu_parity and test_rnn_check_device: the same module on CUDA matches CPU (in
    float64, where no TF32 or rounding differences blur the comparison), and an input on another
    device than the weights is an error."""
    m = build(impl, cls, 5, 8, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    want = flat(m(x))
    gpu = copy.deepcopy(m).cuda()
    assert_close([t.cpu() for t in flat(gpu(x.cuda()))], want)
    with pytest.raises(RuntimeError, match="device"):
        gpu(x)
