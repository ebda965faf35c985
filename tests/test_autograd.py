"""Gradients beyond the first: higher-order gradients (a gradient penalty), torch.func transforms
and forward-mode AD give the Python loop's results on every backend (the kernels hand these to
the differentiable reference), never a silently wrong or missing gradient."""

import copy
import warnings

import pytest
import torch
from helpers import BACKENDS, NORM_CASES, make
from torch.testing import assert_close

import seqnorm

CELLS = ["LSTM", "GRU", "LSTM-proj"]


def _make(cls, norm, backend, **kw):
    if cls == "LSTM-proj":
        return make("LSTM", norm, proj_size=3, backend=backend, **kw)
    return make(cls, norm, backend=backend, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CELLS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_gradient_penalty_matches_the_python_loop(cls, norm, backend):
    """``g = d out / d x`` with create_graph, then a loss of ``g``: its gradients with respect to
    the input and every parameter are the Python loop's, and not zero."""
    x0 = torch.randn(5, 4, 5, dtype=torch.float64)
    lengths = torch.tensor([5, 2, 4, 5])
    runs = []
    for b in (backend, "python"):
        model = _make(cls, norm, b, bidirectional=True)
        x = x0.clone().requires_grad_()
        out, _ = model(x, lengths=lengths)
        (g,) = torch.autograd.grad(
            (out * torch.linspace(-1, 1, out.shape[-1])).sum(), x, create_graph=True
        )
        assert g.requires_grad  # a graph to differentiate, not a constant
        g.square().sum().backward()
        runs.append([g.detach(), x.grad, *(p.grad for p in model.parameters())])
    for got, want in zip(*runs):
        assert_close(got, want)
    assert runs[0][1].abs().sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["python", "cpp"]
)  # Triton's second derivatives: the same reference
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_gradgradcheck(cls, backend):
    model = make(cls, "layer", backend=backend, hidden_size=4, input_size=3)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda x: model(x)[0], x)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", CELLS)
def test_torch_func_transforms_match_torch_nn(cls, backend):
    """jacrev, jacfwd, vmap and grad of a norm='none' layer equal torch.nn's with the same
    weights (the kernels are not used under a transform; the warning says so)."""
    model = _make(cls, "none", backend, hidden_size=4, input_size=3)
    kw = {"proj_size": 3} if cls == "LSTM-proj" else {}
    control = getattr(torch.nn, cls.removesuffix("-proj"))(3, 4, dtype=torch.float64, **kw)
    control.load_state_dict(model.state_dict(), strict=False)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for transform in (torch.func.jacrev, torch.func.jacfwd):
            assert_close(transform(lambda x: model(x)[0])(x), transform(lambda x: control(x)[0])(x))
        batched = torch.func.vmap(lambda x: model(x)[0], in_dims=1, out_dims=1)(x)
        assert_close(batched, control(x)[0])
        grad = torch.func.grad(lambda x: model(x)[0].sum())(x)
        assert_close(grad, torch.func.grad(lambda x: control(x)[0].sum())(x))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("norm", NORM_CASES)
def test_forward_mode_ad_gives_the_directional_derivative(norm, backend):
    import torch.autograd.forward_ad as fwAD

    model = make("LSTM", norm, backend=backend)
    reference = copy.deepcopy(model)
    reference.backend = "python"
    x, tangent = torch.randn(2, 6, 4, 5, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with fwAD.dual_level():
            out = model(fwAD.make_dual(x, tangent))[0]
            primal, got = fwAD.unpack_dual(out)
    assert got is not None  # not silently dropped
    assert_close(primal, reference(x)[0])
    h = 1e-6  # central differences of the float64 loop
    difference = (reference(x + h * tangent)[0] - reference(x - h * tangent)[0]) / (2 * h)
    assert_close(got, difference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_gradcheck_with_batched_gradients(cls):
    """gradcheck's batched check runs the backward under vmap: the kernel's backward hands it to
    the reference instead of failing with "Batching rule not implemented"."""
    model = make(cls, "group", backend="cpp", hidden_size=8, input_size=3)
    x = torch.randn(3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: model(x)[0], x, check_batched_grad=True)


def test_a_transform_warns_once_that_it_runs_the_python_loop(monkeypatch):
    monkeypatch.setattr(seqnorm.ops.backend, "_warned", set())
    model = seqnorm.GRU(3, 4)
    x = torch.randn(4, 2, 3)
    with pytest.warns(RuntimeWarning, match="torch.func transform"):
        torch.func.vmap(lambda x: model(x)[0], in_dims=1, out_dims=1)(x)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell"])
def test_vmap_of_batch_norm_in_training(cls):
    """Under vmap, training batch norm's running statistics are one tensor for every vmapped
    input: a clear error says what to do (not index_add_'s "out-of-place operators" from inside
    the update). Each way it names works: eval mode equals the loop over the inputs, and running
    statistics stacked per input (functional_call) move as each input's own model's do."""
    model = make(cls, "batch", hidden_size=4, input_size=3)
    xs = torch.randn(3, 5, 2, 3, dtype=torch.float64)
    if cls.endswith("Cell"):
        xs = xs[:, 0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(RuntimeError, match=r"vmap.*\.eval\(\).*functional_call"):
            torch.func.vmap(lambda x: model(x)[0])(xs)
        members = [copy.deepcopy(model) for _ in xs]
        params = dict(model.named_parameters())
        buffers = {k: torch.stack([b] * len(xs)) for k, b in model.named_buffers()}
        got = torch.func.vmap(lambda b, x: torch.func.functional_call(model, (params, b), (x,))[0])(
            buffers, xs
        )
        for k, (member, x) in enumerate(zip(members, xs)):
            assert_close(got[k], member(x)[0])
            moved = [
                n for n, b in member.named_buffers() if not torch.equal(b, model.get_buffer(n))
            ]
            assert moved  # the running statistics moved, each input's in its own slice
            for name, b in member.named_buffers():
                assert_close(buffers[name][k], b)
        model.eval()
        got = torch.func.vmap(lambda x: model(x)[0])(xs)
    assert_close(got, torch.stack([model(x)[0] for x in xs]))
