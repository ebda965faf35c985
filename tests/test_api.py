"""The torch.nn contract around the math: parameters, state dicts, dtypes, autocast, compile."""

import io
import math

import pytest
import torch
from helpers import make
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


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
def test_bf16_autocast_runs_with_float32_statistics(cls, norm):
    model = make(cls, norm, dtype=torch.float32)
    x = torch.randn(6, 4, 5)
    want, _ = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = model(x)
    got.float().sum().backward()
    if norm != "none":
        assert got.dtype == torch.float32  # normalized in float32, not bfloat16
    assert_close(got.float(), want, atol=5e-2, rtol=5e-2)


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "norm"), [("LSTM", "layer"), ("GRU", "batch")])
def test_torch_compile_matches_eager(cls, norm):
    model = make(cls, norm, dtype=torch.float32, bidirectional=True)
    model.eval()  # eval: the same running statistics for both calls
    x, lengths = torch.randn(4, 3, 5), torch.tensor([4, 2, 3])
    compiled = torch.compile(model)
    assert_close(compiled(x, lengths=lengths)[0], model(x, lengths=lengths)[0])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
def test_cuda_matches_cpu(cls, norm):
    model = make(cls, norm, bidirectional=True, num_layers=2, dtype=torch.float32)
    x, lengths = torch.randn(6, 4, 5), torch.tensor([6, 2, 5, 3])
    want, _ = model(x, lengths=lengths)
    got, _ = model.cuda()(x.cuda(), lengths=lengths)
    assert_close(got.cpu(), want, atol=1e-5, rtol=1e-4)
