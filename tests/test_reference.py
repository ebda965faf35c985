"""Every norm x cell against the literal float64 reference loop: outputs, states and gradients."""

import pytest
import torch
from helpers import BACKENDS, NORM_CASES, make
from reference import expected_running, run
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence
from torch.testing import assert_close

import seqnorm

LENGTHS = torch.tensor([6, 3, 5, 1, 6])  # one sample alone at its last steps: batch-norm fallback

CASES = [
    pytest.param(
        cls,
        norm,
        bidir,
        layers,
        mode,
        backend,
        id=f"{norm}-{cls}-{'bi' if bidir else 'uni'}-l{layers}-{mode}-{backend}",
        marks=pytest.mark.slow if bidir else (),  # the quick loop: one layer, one direction
    )
    for backend in BACKENDS
    for cls in ["LSTM", "GRU", "LSTM-proj"]
    for norm in NORM_CASES
    for bidir, layers in [(False, 1), (True, 2)]
    for mode in ["full", "lengths", "packed"]
    # Triton's interpreter is slow: the layers and directions (Python shared by every backend)
    # once per cell and norm, with padding; every padding mode in one direction.
    if backend != "triton" or not bidir or mode == "lengths"
]


def _make(cls, norm, backend, **kw):
    """``cls`` "LSTM-proj" is an LSTM with projections (proj_size 3)."""
    if cls == "LSTM-proj":
        return make("LSTM", norm, backend=backend, proj_size=3, **kw)
    return make(cls, norm, backend=backend, **kw)


def _loss(outputs, weights):
    return sum((o * w).sum() for o, w in zip(outputs, weights))


@pytest.mark.parametrize(("cls", "norm", "bidir", "layers", "mode", "backend"), CASES)
def test_matches_reference(cls, norm, bidir, layers, mode, backend):
    model = _make(cls, norm, backend, bidirectional=bidir, num_layers=layers)
    steps, n = 6, 5
    x = torch.randn(steps, n, 5, dtype=torch.float64)
    lengths = None if mode == "full" else LENGTHS
    dirs = 2 if bidir else 1
    h0 = torch.randn(layers * dirs, n, 3 if cls == "LSTM-proj" else 8, dtype=torch.float64)
    c0 = torch.randn(layers * dirs, n, 8, dtype=torch.float64)
    hx = (h0, c0) if cls.startswith("LSTM") else h0

    ref_model = _make(cls, norm, None, bidirectional=bidir, num_layers=layers)  # same weights
    ref_out, ref_h, ref_c = run(ref_model, x, lengths, hx)

    if mode == "packed":
        out, state = model(pack_padded_sequence(x, lengths, enforce_sorted=False), hx)
        out = torch.nn.utils.rnn.pad_packed_sequence(out, total_length=steps)[0]
    else:
        out, state = model(x, hx, lengths=lengths)
    h, c = state if cls.startswith("LSTM") else (state, None)

    assert_close(out, ref_out)
    assert_close(h, ref_h)
    if c is not None:
        assert_close(c, ref_c)

    weights = [torch.randn_like(t) for t in (out, h)]
    _loss([out, h], weights).backward()
    _loss([ref_out, ref_h], weights).backward()
    grads = dict(model.named_parameters())
    for name, p in ref_model.named_parameters():
        assert_close(grads[name].grad, p.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_batch_norm_eval_uses_running_statistics(cls, backend):
    model = make(cls, "batch", backend=backend)
    x = torch.randn(6, 5, 5, dtype=torch.float64)
    model(x, lengths=LENGTHS)  # one training step to move the running statistics
    model.eval()
    ref_model = make(cls, "batch")
    ref_model.load_state_dict(model.state_dict())
    out, _ = model(x[:, :1])  # eval works at batch size 1
    ref_out, _, _ = run(ref_model, x[:, :1], training=False)
    assert_close(out, ref_out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batch_norm_running_statistics_per_step(backend):
    """Input-projection statistics: one running row per step, valid samples only."""
    model = make("GRU", "batch", max_steps=4, backend=backend)  # steps 3, 4, 5 share a row
    x = torch.randn(6, 5, 5, dtype=torch.float64)
    norm = model.norm_ih_l0
    before = make("GRU", "batch", max_steps=4).norm_ih_l0
    model(x, lengths=LENGTHS)
    proj = x @ model.weight_ih_l0.detach().T  # (T, N, 3H)
    masks = torch.arange(6).unsqueeze(1) < LENGTHS
    mean, var = expected_running(before, list(proj), list(masks))
    assert_close(norm.running_mean, mean)
    assert_close(norm.running_var, var)
    assert not torch.equal(norm.running_mean[3], before.running_mean[3])


GRADCHECK = [
    pytest.param(cls, norm, lengths, id=f"{norm}-{cls}-{'lengths' if lengths else 'full'}")
    for cls in ["LSTM", "GRU", "LSTM-proj"]
    for norm in NORM_CASES
    for lengths in [False, True]
]


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["python", "cpp"])  # Triton's: tests/test_triton.py (smaller)
@pytest.mark.parametrize(("cls", "norm", "use_lengths"), GRADCHECK)
def test_gradcheck(cls, norm, use_lengths, backend):
    model = _make(cls, norm, backend, input_size=3, hidden_size=4, bidirectional=True)
    for m in model.modules():
        if isinstance(m, seqnorm.norms.RecurrentBatchNorm):
            m.momentum = 0.0  # keep the fallback statistics fixed between gradcheck's evaluations
    lengths = torch.tensor([4, 2, 3]) if use_lengths else None
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, 3 if cls == "LSTM-proj" else 4, dtype=torch.float64, requires_grad=True)
    c0 = torch.zeros(2, 3, 4, dtype=torch.float64)
    names = ["weight_hh_l0", "weight_ih_l0_reverse"] + (
        ["norm_hh_l0.weight"] if norm != "none" else []
    )
    if cls.startswith("LSTM") and norm != "none":
        names.append("norm_c_l0.bias")
    if cls == "LSTM-proj":
        names.append("weight_hr_l0_reverse")
    params = {
        k: v.detach().clone().requires_grad_() for k, v in model.named_parameters() if k in names
    }

    def f(x, h0, *ps):
        hx = (h0, c0) if cls.startswith("LSTM") else h0
        out, _ = functional_call(
            model, dict(zip(params, ps)), (x, hx), {"lengths": lengths}, strict=False
        )
        return out

    assert torch.autograd.gradcheck(f, (x, h0, *params.values()))


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("norm", NORM_CASES)
def test_cell_matches_one_step_of_layer(cls, norm):
    """A cell is one step of the layer: same weights, same equations."""
    cell = make(cls, norm)
    layer = make(cls.removesuffix("Cell"), norm)
    layer_name = lambda k: (
        k
        if k == "_extra_state"
        else f"{k.split('.')[0]}_l0{'.' + k.split('.', 1)[1] if '.' in k else ''}"
    )
    layer.load_state_dict({layer_name(k): v for k, v in cell.state_dict().items()})
    x = torch.randn(4, 5, dtype=torch.float64)
    h = torch.randn(4, 8, dtype=torch.float64)
    if cls == "LSTMCell":
        c = torch.randn(4, 8, dtype=torch.float64)
        got = cell(x, (h, c))
        _, want = layer(x.unsqueeze(0), (h.unsqueeze(0), c.unsqueeze(0)))
        assert_close(got[0], want[0][0])
        assert_close(got[1], want[1][0])
    else:
        got = cell(x, h)
        _, want = layer(x.unsqueeze(0), h.unsqueeze(0))
        assert_close(got, want[0])
