"""The torch.nn contract around the math: parameters, state dicts, dtypes, autocast, compile."""

import copy
import io
import math
import warnings

import pytest
import torch
from helpers import BACKENDS, make
from torch.testing import assert_close

import seqnorm


def test_parameter_names_and_shapes_follow_torch():
    ours = seqnorm.LSTM(5, 8, num_layers=2, bidirectional=True, norm="group", groups=2)
    ref = torch.nn.LSTM(5, 8, num_layers=2, bidirectional=True)
    shapes = {k: v.shape for k, v in ours.named_parameters() if not k.startswith("norm_")}
    assert shapes == {k: v.shape for k, v in ref.named_parameters()}
    norm_names = {k for k, _ in ours.named_parameters() if k.startswith("norm_")}
    assert "norm_c_l1_reverse.bias" in norm_names
    assert "norm_ih_l0.bias" not in norm_names  # the torch biases supply the shift
    assert not any(
        k.startswith("norm_") for k, _ in seqnorm.GRU(5, 8, norm="none").named_parameters()
    )


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
def test_initialization(cls, norm):
    model = getattr(seqnorm, cls)(5, 16, norm=norm, groups=4 if norm == "group" else 1)
    bound = 1 / math.sqrt(16)
    for name, p in model.named_parameters():
        if name.startswith("norm_"):
            fill = 0.0 if name.endswith("bias") else (0.1 if norm == "batch" else 1.0)
            assert torch.all(p == fill), name
        else:
            assert p.abs().max() <= bound and p.std() > bound / 4, name
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(7)
    model.reset_parameters()
    assert all((p != 7).all() for p in model.parameters())


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_state_dict_round_trip(cls):
    a = make(cls, "batch", num_layers=2, dtype=torch.float32)
    a(torch.randn(5, 3, 5))  # move running statistics
    buffer = io.BytesIO()
    torch.save(a.state_dict(), buffer)
    buffer.seek(0)
    b = getattr(seqnorm, cls)(5, 8, num_layers=2, norm="batch")
    b.load_state_dict(torch.load(buffer))
    a.eval()
    b.eval()
    x = torch.randn(5, 2, 5)
    assert_close(a(x)[0], b(x)[0], rtol=0, atol=0)


def test_extra_repr():
    lstm = seqnorm.LSTM(3, 4, num_layers=2, batch_first=True, norm="group", groups=2)
    assert lstm.extra_repr() == "3, 4, num_layers=2, batch_first=True, norm='group', groups=2"
    assert repr(seqnorm.GRUCell(3, 4, norm="none")) == "GRUCell(3, 4, norm='none')"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_device_and_dtype_arguments(dtype):
    model = seqnorm.GRU(3, 4, norm="layer", dtype=dtype, device="cpu")
    assert all(p.dtype == dtype for p in model.parameters())
    out, h = model(torch.randn(5, 2, 3, dtype=dtype))
    assert out.dtype == h.dtype == dtype


def test_dropout_between_layers():
    model = seqnorm.LSTM(5, 8, num_layers=2, dropout=0.5, norm="layer")
    x = torch.randn(6, 3, 5)
    assert not torch.equal(model(x)[0], model(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])
    with pytest.warns(UserWarning, match="num_layers=1"):
        seqnorm.LSTM(5, 8, dropout=0.5)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_trains_at_batch_size_one(cls, norm):
    """Pure SGD, one sample per update: learn to output the previous input (needs memory)."""
    torch.manual_seed(0)
    model = getattr(seqnorm, cls)(1, 16, norm=norm, groups=4 if norm == "group" else 1)
    head = torch.nn.Linear(16, 1)
    opt = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1)
    losses = []
    for _ in range(200):
        x = torch.randn(12, 1, 1)
        out, _ = model(x)
        loss = torch.nn.functional.mse_loss(head(out[1:]), x[:-1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:40]) / 40, sum(losses[-40:]) / 40
    assert last < 0.75 * first, (first, last)


@pytest.mark.parametrize("backend", ["cpp", "python"])
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
def test_bf16_autocast_runs_with_float32_statistics(cls, norm, backend):
    """Under CPU autocast the Python loop's products run in bfloat16, the C++ kernel computes in
    float32 (asked for, it would raise if it could not run); both take a bfloat16 input (an
    autocast layer's output) and return float32."""
    model = make(cls, norm, dtype=torch.float32, backend=backend)
    x = torch.randn(6, 4, 5)
    want, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = model(x.to(torch.bfloat16).requires_grad_())
    got.float().sum().backward()
    if norm != "none" or backend == "cpp":
        assert got.dtype == torch.float32  # normalized in float32, not bfloat16
    assert_close(got.float(), want, atol=5e-2, rtol=5e-2)
    assert all(p.grad is not None and p.grad.isfinite().all() for p in model.parameters())


def _compile_counter():
    import torch._dynamo.testing

    return torch._dynamo.testing.CompileCounterWithBackend("aot_eager")


def _graph_ops(counter) -> set:
    return {str(n.target) for g in counter.graphs for n in g.graph.nodes if n.op == "call_function"}


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "norm"), [("LSTM", "layer"), ("GRU", "batch"), ("LSTM", "group")])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_torch_compile_runs_the_operator_without_graph_breaks(cls, norm, with_lengths):
    """fullgraph=True (no graph break), the operator in the graph (not an unrolled loop), at most
    one recompile when the sequence length first changes, and eager's results in training."""
    torch._dynamo.reset()
    model = make(cls, norm, dtype=torch.float32, bidirectional=True, num_layers=2)
    eager = copy.deepcopy(model)
    counter = _compile_counter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    for steps in (5, 7, 9, 12):
        x = torch.randn(steps, 3, 5, requires_grad=True)
        lengths = torch.tensor([steps, 2, 3]) if with_lengths else None
        got, want = compiled(x, lengths=lengths)[0], eager(x, lengths=lengths)[0]
        assert_close(got, want)
        (gx,) = torch.autograd.grad(got.sum(), x)
        assert_close(gx, torch.autograd.grad(want.sum(), x)[0])
    assert counter.frame_count <= 2
    ops = _graph_ops(counter)
    assert f"seqnorm.{cls.lower()}_forward" in ops
    assert ("seqnorm.update_running_stats" in ops) == (norm == "batch")
    for name, buffer in eager.named_buffers():  # batch norm's running statistics moved alike
        assert_close(dict(model.named_buffers())[name], buffer)


@pytest.mark.slow
def test_torch_compile_with_inductor_matches_eager():
    """The default backend (inductor) compiles the graph around the operator, forward and
    backward."""
    torch._dynamo.reset()
    model = make("LSTM", "layer", dtype=torch.float32, bidirectional=True)
    eager = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True)
    for steps in (4, 6):
        x = torch.randn(steps, 3, 5, requires_grad=True)
        lengths = torch.tensor([steps, 2, 3])
        got, want = compiled(x, lengths=lengths)[0], eager(x, lengths=lengths)[0]
        assert_close(got, want)
        assert_close(torch.autograd.grad(got.sum(), x), torch.autograd.grad(want.sum(), x))


@pytest.mark.slow
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_torch_export_with_a_dynamic_sequence_length(cls, norm):
    from torch.export import Dim, export

    model = make(cls, norm, dtype=torch.float32, bidirectional=True).eval()
    steps = Dim("steps", min=2, max=1000)
    program = export(model, (torch.randn(6, 3, 5),), dynamic_shapes=({0: steps},))
    targets = {str(n.target) for n in program.graph.nodes}
    assert f"seqnorm.{cls.lower()}_forward.default" in targets
    for length in (3, 11):
        x = torch.randn(length, 3, 5)
        assert_close(program.module()(x)[0], model(x)[0])


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_jit_trace_at_one_length_runs_at_another(cls):
    """As torch.nn.LSTM: the traced graph holds one operator per direction, not a loop of steps,
    and passes torch.jit.trace's check (which reruns it without gradients)."""
    model = make(cls, "layer", dtype=torch.float32, bidirectional=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, (torch.randn(6, 3, 5),))
    for length in (2, 11):
        x = torch.randn(length, 3, 5)
        assert_close(traced(x)[0], model(x)[0])


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_jit_script_is_a_clear_error(cls):
    """TorchScript cannot compile the layers: scripting a model that holds one names the layer
    and the ways that work, instead of failing deep inside seqnorm's Python."""
    model = torch.nn.Sequential(torch.nn.Identity(), getattr(seqnorm, cls)(5, 8))
    with pytest.raises(
        RuntimeError,
        match=rf"seqnorm.{cls} cannot be compiled by torch.jit.script.*torch.jit.trace, torch.export.export or torch.compile",
    ):
        torch.jit.script(model)


@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_jit_trace_keeps_lengths_of_a_full_example(norm):
    """An example whose samples are all full length still traces the padding mask."""
    model = make("LSTM", norm, dtype=torch.float32, bidirectional=True).eval()
    example = {"input": torch.randn(6, 3, 5), "lengths": torch.tensor([6, 6, 6])}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(model, example_kwarg_inputs=example)
    x, lengths = torch.randn(6, 3, 5), torch.tensor([6, 2, 4])
    assert_close(traced(x, lengths=lengths)[0], model(x, lengths=lengths)[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
def test_cuda_matches_cpu(cls, norm):
    """In float64: in float32 batch norm over four samples amplifies rounding differences past
    any tolerance that would still catch a fault (tests/test_triton.py bounds float32)."""
    model = make(cls, norm, bidirectional=True, num_layers=2)
    x, lengths = torch.randn(6, 4, 5, dtype=torch.float64), torch.tensor([6, 2, 5, 3])
    want, _ = model(x, lengths=lengths)
    got, _ = model.cuda()(x.cuda(), lengths=lengths)
    assert_close(got.cpu(), want)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_state_dict_records_the_normalization(cls):
    """A layer-norm state dict does not load into a group-norm model (the parameters fit, the
    computation differs), nor groups 4 into groups 2; the error names both settings."""
    make = lambda norm, groups=1, eps=1e-5: getattr(seqnorm, cls)(
        4, 8, norm=norm, groups=groups, eps=eps
    )
    layer = make("layer").state_dict()
    with pytest.raises(
        RuntimeError, match=r"norm='group', groups=4.*saved with norm='layer', groups=1"
    ):
        make("group", 4).load_state_dict(layer)
    with pytest.raises(RuntimeError, match=r"groups=2.*saved with norm='group', groups=4"):
        make("group", 2).load_state_dict(make("group", 4).state_dict())
    with pytest.raises(
        RuntimeError, match=r"eps=0.001.*saved with norm='layer', groups=1, eps=1e-05"
    ):
        make("layer", eps=1e-3).load_state_dict(layer)
    make("layer").load_state_dict(layer)
    old = {k: v for k, v in layer.items() if k != "_extra_state"}  # saved before the record
    make("layer").load_state_dict(old)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_torch_state_dict_loads_strictly_into_norm_none(cls):
    control = getattr(torch.nn, cls)(5, 7, num_layers=2, bidirectional=True)
    ours = getattr(seqnorm, cls)(5, 7, num_layers=2, bidirectional=True, norm="none")
    ours.load_state_dict(control.state_dict())  # strict: every key matches, no record to check
    x = torch.randn(4, 3, 5)
    assert_close(ours(x)[0], control(x)[0])


HALF = [torch.float16, torch.bfloat16]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
@pytest.mark.parametrize("backend", ["cpp", "python"])
def test_half_precision_parameters(cls, norm, dtype, backend):
    """After .to(float16/bfloat16): parameters, outputs and states in that dtype (statistics in
    float32 or better inside; the C++ kernel computes all in float32), over several steps, near
    the float32 model's outputs, batch norm's running statistics too."""
    model = make(cls, norm, dtype=torch.float32, bidirectional=True, num_layers=2)
    half = copy.deepcopy(model).to(dtype)
    half.backend = backend
    x, lengths = torch.randn(6, 4, 5), torch.tensor([6, 3, 5, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: the backend asked for runs
        out, state = half(x.to(dtype), lengths=lengths)
    states = state if isinstance(state, tuple) else (state,)
    assert all(t.dtype == dtype for t in (out, *states))
    assert all(b.dtype == dtype for b in half.buffers())
    want, _ = model(x, lengths=lengths)
    assert (out.float() - want).abs().mean() < 0.02  # half-precision rounding over 12 steps
    for got, ref in zip(half.buffers(), model.buffers()):
        if got.is_floating_point():
            assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in half.parameters())


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("norm", ["none", "layer", "batch"])
def test_cells_in_half_precision_return_their_dtype(cls, norm, dtype):
    cell = getattr(seqnorm, cls)(5, 8, norm=norm).to(dtype)
    out = cell(torch.randn(3, 5, dtype=dtype))
    out = cell(torch.randn(3, 5, dtype=dtype), out)  # the state feeds the next step
    assert all(t.dtype == dtype for t in (out if isinstance(out, tuple) else (out,)))


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
@pytest.mark.parametrize("scale", [1e20, 1e30, math.inf])
def test_extreme_inputs_give_the_same_answer_on_every_backend(cls, norm, scale):
    """Where float32 squares overflow (1e20 and up) both paths still normalize (the statistics
    are exact, in double); infinite inputs give NaN on both. Same values, same NaNs."""
    model = make(cls, norm, dtype=torch.float32, bidirectional=True, backend="cpp")
    reference = copy.deepcopy(model)
    reference.backend = "python"
    x = torch.randn(5, 3, 5) * scale
    got, want = model(x)[0], reference(x)[0]
    assert_close(got, want, atol=1e-5, rtol=1e-4, equal_nan=True)
    if math.isfinite(scale):  # the input's scale does not matter to a normalized cell
        assert got.isfinite().all()


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["layer", "group", "batch"])
def test_a_nan_sample_stays_in_its_row_except_with_batch_norm(cls, norm):
    """Documented: the per-sample norms keep a NaN in its own sample; batch norm's statistics
    mix samples, so one NaN sample poisons every output (as torch.nn.BatchNorm1d does)."""
    model = make(cls, norm, dtype=torch.float32)
    x = torch.randn(4, 3, 5)
    x[2, 1, 0] = math.nan
    out = model(x)[0]
    assert out[2:, 1].isnan().all() and not out[:2].isnan().any()
    assert out[2:, [0, 2]].isnan().all() == (norm == "batch")
    assert out[2:, [0, 2]].isnan().any() == (norm == "batch")


@pytest.mark.parametrize(
    "cls, backend",
    [(seqnorm.LSTM, b) for b in BACKENDS]
    + [(seqnorm.GRU, b) for b in BACKENDS]
    + [(seqnorm.LSTMCell, None), (seqnorm.GRUCell, None)],
)
def test_batch_norm_follows_the_mode_of_its_norm_modules(cls, backend):
    """As torch.nn.BatchNorm1d inside a model: a model in eval mode whose batch norms are in
    training mode takes batch statistics (how the batch-size study measures the train/eval gap),
    on every backend."""
    torch.manual_seed(0)
    module = cls(4, 6, norm="batch")
    if backend is not None:
        module.backend = backend
    x = torch.randn(5, 3, 4) if cls in (seqnorm.LSTM, seqnorm.GRU) else torch.randn(3, 4)
    saved = copy.deepcopy(module.state_dict())

    def run():
        out = module(x)
        return (out[0] if isinstance(out, tuple) else out).detach()

    module.train()
    in_training = run()
    moved = copy.deepcopy(module.state_dict())
    module.load_state_dict(saved)
    module.eval()
    in_eval = run()
    for m in module.modules():
        if isinstance(m, seqnorm.norms.RecurrentBatchNorm):
            m.train()
    assert_close(run(), in_training)
    for key, value in module.state_dict().items():
        assert_close(value, moved[key], msg=key)  # the running statistics moved as in training
    assert not torch.allclose(in_eval, in_training)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
def test_an_empty_batch_as_torch_nn(backend, cls, norm):
    """A batch of 0 samples gives empty outputs and states, and empty gradients for the input
    and the initial state, as torch.nn (the kernels' input half failed to reshape it, and the
    operators handed back None for those gradients). Batch norm in eval mode: in training a batch
    of 0 has no statistics, which is refused with a clear error elsewhere."""
    model = make(cls, norm, backend=backend, num_layers=2, bidirectional=True).train(
        norm != "batch"
    )
    want = getattr(torch.nn, cls)(5, 8, num_layers=2, bidirectional=True, dtype=torch.float64)
    results = []
    for m in (model, want):
        x = torch.randn(4, 0, 5, dtype=torch.float64, requires_grad=True)
        h0 = torch.randn(4, 0, 8, dtype=torch.float64, requires_grad=True)
        out, state = m(x, (h0, h0) if cls == "LSTM" else h0)
        h = state[0] if cls == "LSTM" else state
        (out.sum() + h.sum()).backward()
        results.append([out, h, x.grad, h0.grad])
        assert all(p.grad is None or not p.grad.any() for p in m.parameters())
    for got, expected in zip(*results):
        assert got is not None and got.shape == expected.shape
