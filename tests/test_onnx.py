"""ONNX export: the exported model, run by onnxruntime, gives eager's outputs. The
torch.export-based exporter (torch.onnx.export's default) records each direction as an ONNX Scan
whose length follows the input's; TorchScript's exporter (dynamo=False) unrolls the loop at the
example's length, as it does for any Python loop, into a model that refuses other lengths."""

import logging
import warnings

import numpy as np
import pytest
import torch
from helpers import make
from torch.testing import assert_close

ort = pytest.importorskip("onnxruntime")  # the `dev` extra installs it: CI runs these tests

pytestmark = pytest.mark.slow  # each export traces and converts the model: seconds apiece

CASES = [
    pytest.param(cls, norm, id=f"{norm}-{cls}")
    for cls in ["LSTM", "GRU", "LSTM-proj"]
    for norm in ["none", "layer", "group", "batch"]
]


def _model(cls, norm):
    kw = {"proj_size": 5} if cls == "LSTM-proj" else {}
    model = make(
        cls.removesuffix("-proj"),
        norm,
        hidden_size=16,
        dtype=torch.float32,
        bidirectional=True,
        num_layers=2,
        **kw,
    ).eval()
    if norm == "batch":  # non-trivial running statistics of every step
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.uniform_(0.5, 1.5) if "var" in name else buffer.normal_(0, 0.3)
    model.backend = "python"  # eager's reference: the loop the export records
    return model


def _run(path, feeds) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


@pytest.fixture(autouse=True)
def _quiet():
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.mark.parametrize(("cls", "norm"), CASES)
def test_export_with_a_dynamic_sequence_length(cls, norm, tmp_path):
    model = _model(cls, norm)
    steps = torch.export.Dim("steps", min=2, max=4096)
    program = torch.onnx.export(
        model, (torch.randn(6, 3, 5),), dynamo=True, dynamic_shapes=({0: steps},)
    )
    program.save(tmp_path / "model.onnx")
    for length in (2, 11):
        x = torch.randn(length, 3, 5)
        want = [
            t.detach() for t in (model(x)[0], *((model(x)[1],) if cls == "GRU" else model(x)[1]))
        ]
        got = [torch.from_numpy(a) for a in _run(tmp_path / "model.onnx", {"input": x})]
        assert_close(
            got, want, atol=1e-4, rtol=1e-4
        )  # float32, tanh and sigmoid as ORT computes them


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_export_with_lengths(cls, norm, tmp_path):
    """Padding travels as an input: each sample's own length, for any sequence length."""
    model = _model(cls, norm)
    steps = torch.export.Dim("steps", min=2, max=4096)
    program = torch.onnx.export(
        model,
        (torch.randn(6, 3, 5),),
        kwargs={"lengths": torch.tensor([6, 2, 4])},
        dynamo=True,
        dynamic_shapes={"input": {0: steps}, "lengths": None},
    )
    program.save(tmp_path / "model.onnx")
    for length in (3, 9):
        x, lengths = torch.randn(length, 3, 5), torch.tensor([length, 1, 2])
        got = _run(tmp_path / "model.onnx", {"input": x, "lengths": lengths})[0]
        assert_close(
            torch.from_numpy(got), model(x, lengths=lengths)[0].detach(), atol=1e-4, rtol=1e-4
        )  # float32, tanh and sigmoid as ORT computes them


@pytest.mark.parametrize(("cls", "norm"), CASES)
def test_torchscript_exporter_at_the_traced_length(cls, norm, tmp_path):
    """TorchScript's exporter unrolls the loop at the example's length: the model it writes runs
    at that length, for any batch size, and refuses every other length loudly, even with the time
    axis declared dynamic (where the unrolled steps would run T steps of a longer input)."""
    model = _model(cls, norm)
    path = str(tmp_path / "model.onnx")
    dynamic = {"x": {0: "steps", 1: "batch"}}
    with pytest.warns(
        UserWarning,
        match=r"unrolls seqnorm's time loop at the example's sequence length \(6 steps\)",
    ):
        torch.onnx.export(
            model,
            (torch.randn(6, 3, 5),),
            path,
            dynamo=False,
            input_names=["x"],
            dynamic_axes=dynamic,
        )
    for batch in (3, 4):
        x = torch.randn(6, batch, 5)
        assert_close(
            torch.from_numpy(_run(path, {"x": x})[0]), model(x)[0].detach(), atol=1e-4, rtol=1e-4
        )  # float32, tanh and sigmoid as ORT computes them
    for length in (4, 9):
        with pytest.raises(Exception, match=r"cannot be reshaped.*\{6,3,5\}"):
            _run(path, {"x": torch.randn(length, 3, 5)})


@pytest.mark.parametrize("norm", ["layer", "batch"])
def test_torchscript_exporter_keeps_lengths(norm, tmp_path):
    """An example whose samples are all full length still exports the padding mask."""
    model = _model("LSTM", norm)
    path = str(tmp_path / "model.onnx")
    torch.onnx.export(
        model,
        (torch.randn(6, 3, 5), None, torch.tensor([6, 6, 6])),
        path,
        dynamo=False,
        input_names=["x", "lengths"],
    )
    x, lengths = torch.randn(6, 3, 5), torch.tensor([6, 2, 4])
    got = _run(path, {"x": x, "lengths": lengths})[0]
    assert_close(
        torch.from_numpy(got), model(x, lengths=lengths)[0].detach(), atol=1e-4, rtol=1e-4
    )  # float32, tanh and sigmoid as ORT computes them
