"""Bad input fails up front with a message naming the argument, the value and what was expected.
Where torch.nn refuses the same thing, the error has torch's type and contains torch's phrase."""

import pytest
import torch

import seqnorm
from seqnorm import ShapeError

CONSTRUCTOR_ERRORS = [
    pytest.param(
        {"norm": "weight"},
        ValueError,
        r"`norm`.*'none', 'layer', 'group', 'batch', got 'weight'",
        id="norm",
    ),
    pytest.param(
        {"norm": "instance"},
        ValueError,
        r"got 'instance'.*always output 0.*norm='layer'",
        id="instance",
    ),
    pytest.param(
        {"norm": "group", "groups": 3},
        ValueError,
        r"`groups` to divide hidden_size=8, got groups=3",
        id="groups",
    ),
    pytest.param(
        {"norm": "group", "groups": 0},
        ValueError,
        r"groups must be greater than zero, got 0",
        id="groups-0",
    ),
    pytest.param(
        {"norm": "group", "groups": 2.0},
        TypeError,
        r"groups should be of type int, got: float 2.0",
        id="groups-float",
    ),
    pytest.param(
        {"norm": "layer", "groups": 2},
        ValueError,
        r"`groups` to be 1 unless norm='group'",
        id="groups-layer",
    ),
    pytest.param({"eps": 0}, ValueError, r"`eps` to be a positive number, got 0", id="eps"),
    pytest.param(
        {"max_steps": 0}, ValueError, r"max_steps must be greater than zero, got 0", id="max-steps"
    ),
    pytest.param({"bias": 1}, TypeError, r"bias should be of type bool, got: int 1", id="bias-int"),
    pytest.param(
        {"bias": "True"}, TypeError, r"bias should be of type bool, got: str 'True'", id="bias-str"
    ),
    pytest.param(
        {"input_size": 3.0},
        TypeError,
        r"input_size should be of type int, got: float",
        id="input-float",
    ),
    pytest.param(
        {"input_size": "10"},
        TypeError,
        r"input_size should be of type int, got: str",
        id="input-str",
    ),
]

LAYER_ERRORS = [
    pytest.param(
        {"num_layers": 0}, ValueError, r"num_layers must be greater than zero, got 0", id="layers"
    ),
    pytest.param(
        {"dropout": 1.5},
        ValueError,
        r"dropout should be a number in range \[0, 1\].*got 1.5",
        id="dropout",
    ),
    pytest.param(
        {"batch_first": 0},
        TypeError,
        r"batch_first should be of type bool, got: int",
        id="batch-first-0",
    ),
    pytest.param(
        {"batch_first": 1},
        TypeError,
        r"batch_first should be of type bool, got: int",
        id="batch-first-1",
    ),
    pytest.param(
        {"batch_first": "False"},
        TypeError,
        r"batch_first should be of type bool, got: str",
        id="batch-first-str",
    ),
    pytest.param(
        {"bidirectional": "False"},
        TypeError,
        r"bidirectional should be of type bool, got: str",
        id="bidir-str",
    ),
    pytest.param(
        {"hidden_size": 0},
        ValueError,
        r"hidden_size must be greater than zero, got 0",
        id="hidden-0",
    ),
    pytest.param(
        {"input_size": 0}, ValueError, r"input_size must be greater than zero, got 0", id="input-0"
    ),
    pytest.param(
        {"input_size": -1},
        ValueError,
        r"input_size must be greater than zero, got -1",
        id="input-negative",
    ),
]


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize(("kwargs", "error", "match"), CONSTRUCTOR_ERRORS)
def test_constructor(cls, kwargs, error, match):
    kwargs = {"input_size": 4, "hidden_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        getattr(seqnorm, cls)(**kwargs)


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
@pytest.mark.parametrize(("kwargs", "error", "match"), LAYER_ERRORS)
def test_layer_constructor(cls, kwargs, error, match):
    kwargs = {"input_size": 4, "hidden_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        getattr(seqnorm, cls)(**kwargs)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
def test_cells_accept_zero_sizes_as_torch_and_refuse_negative_ones(cls):
    for norm in ("none", "layer", "batch"):
        cell = getattr(seqnorm, cls)(10, 0, norm=norm).eval()
        out = cell(torch.randn(3, 10))
        assert (out[0] if cls == "LSTMCell" else out).shape == (3, 0)
    with pytest.raises(ValueError, match=r"hidden_size must be non-negative, got -1"):
        getattr(seqnorm, cls)(10, -1)


def test_projections():
    with pytest.raises(ValueError, match=r"proj_size should be a positive integer or zero.*got -1"):
        seqnorm.LSTM(4, 8, proj_size=-1)
    with pytest.raises(
        ValueError, match=r"proj_size has to be smaller than hidden_size.*proj_size=8"
    ):
        seqnorm.LSTM(4, 8, proj_size=8)
    with pytest.raises(TypeError, match=r"proj_size should be of type int, got: float"):
        seqnorm.LSTM(4, 8, proj_size=2.0)
    with pytest.raises(
        ValueError, match=r"proj_size argument is only supported for LSTM, not RNN or GRU"
    ):
        seqnorm.GRU(4, 8, proj_size=2)


def test_dropout_warns_with_one_layer_as_torch():
    with pytest.warns(
        UserWarning,
        match=r"dropout option adds dropout after all but last recurrent layer.*dropout=0.5 and num_layers=1",
    ):
        seqnorm.LSTM(5, 8, dropout=0.5)


LSTM = seqnorm.LSTM(4, 8, num_layers=2)
X = torch.randn(5, 3, 4)
H = torch.zeros(2, 3, 8)

FORWARD_ERRORS = [
    pytest.param(
        dict(input=torch.randn(2, 5, 3, 4)),
        ValueError,
        r"LSTM: Expected input to be 2D or 3D, got 4D instead.*\(L, N, H_in\)",
        id="rank",
    ),
    pytest.param(
        dict(input=torch.randn(5, 3, 6)),
        ShapeError,
        r"input.size\(-1\) must be equal to input_size. Expected 4, got 6",
        id="features",
    ),
    pytest.param(
        dict(input=torch.randn(0, 3, 4)),
        ShapeError,
        r"Expected sequence length to be larger than 0 in RNN, got input of shape \(0, 3, 4\)",
        id="length-0",
    ),
    pytest.param(
        dict(input=torch.randn(0, 4)),
        ShapeError,
        r"Expected sequence length to be larger than 0",
        id="length-0-unbatched",
    ),
    pytest.param(
        dict(input=X.double()),
        ValueError,
        r"RNN input dtype \(torch.float64\) does not match weight dtype \(torch.float32\). Convert input: input.to\(torch.float32\), or convert model: model.to\(torch.float64\)",
        id="dtype",
    ),
    pytest.param(
        dict(input=X.long()),
        ValueError,
        r"RNN input dtype \(torch.int64\) does not match weight dtype \(torch.float32\). "
        r"Convert input: input.to\(torch.float32\)$",
        id="dtype-integer",
    ),
    pytest.param(
        dict(input=X.to("meta")),
        RuntimeError,
        r"Expected argument `input` on the weights' device \(cpu\), got it on meta: move it with "
        r"\.to\('cpu'\), or the model with \.to\('meta'\)",
        id="device",
    ),
    pytest.param(
        dict(input=[1, 2]),
        TypeError,
        r"`input` to be a Tensor or PackedSequence, got list",
        id="type",
    ),
    pytest.param(
        dict(hx=(torch.zeros(1, 3, 8), H)),
        ShapeError,
        r"Expected hidden\[0\] size \(2, 3, 8\), got \[1, 3, 8\]",
        id="h0",
    ),
    pytest.param(
        dict(hx=(H, torch.zeros(2, 3, 7))),
        ShapeError,
        r"Expected hidden\[1\] size \(2, 3, 8\), got \[2, 3, 7\]",
        id="c0",
    ),
    pytest.param(
        dict(hx=(H[0], H)),
        ShapeError,
        r"For batched 3-D input, hx and cx should also be 3-D but got \(2-D, 3-D\) tensors",
        id="h0-dims",
    ),
    pytest.param(
        dict(hx=H), TypeError, r"`hx` to be a tuple \(h_0, c_0\), got Tensor", id="hx-tuple"
    ),
    pytest.param(
        dict(hx=(H.double(), H)),
        ValueError,
        r"`hx\[0\] \(h_0\)` to have the weights' dtype \(torch.float32\), got torch.float64: "
        r"convert it with .to\(torch.float32\)",
        id="h0-dtype",
    ),
    pytest.param(
        dict(hx=(H, H.to("meta"))),
        RuntimeError,
        r"Expected argument `hx\[1\] \(c_0\)` on the weights' device \(cpu\), got it on meta",
        id="c0-device",
    ),
    pytest.param(
        dict(hx=(H, H.long())),
        ValueError,
        r"`hx\[1\] \(c_0\)` to have the weights' dtype \(torch.float32\), got torch.int64",
        id="c0-dtype",
    ),
    pytest.param(
        dict(lengths=torch.tensor([[5, 5, 5]])),
        ShapeError,
        r"`lengths` to be 1-D, got shape \(1, 3\)",
        id="lengths-2d",
    ),
    pytest.param(
        dict(lengths=torch.tensor([5, 5])),
        ShapeError,
        r"one length per sample \(3\), got 2",
        id="lengths-count",
    ),
    pytest.param(
        dict(lengths=torch.tensor([5, 0, 5])),
        ValueError,
        r"`lengths` to be in \[1, 5\].*got 0",
        id="lengths-zero",
    ),
    pytest.param(
        dict(lengths=torch.tensor([5, -2, 5])),
        ValueError,
        r"`lengths` to be in \[1, 5\].*got -2",
        id="lengths-negative",
    ),
    pytest.param(
        dict(lengths=torch.tensor([5, 6, 5])),
        ValueError,
        r"`lengths` to be in \[1, 5\].*got 6",
        id="lengths-long",
    ),
    pytest.param(
        dict(lengths=torch.tensor([5.0, 4.0, 5.0])),
        TypeError,
        r"`lengths` to hold integers, got dtype torch.float32",
        id="lengths-float",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), FORWARD_ERRORS)
def test_forward(kwargs, error, match):
    kwargs = {"input": X, **kwargs}
    with pytest.raises(error, match=match):
        LSTM(kwargs.pop("input"), **kwargs)


def test_shape_errors_are_runtime_errors_as_in_torch_and_value_errors_as_before():
    for error in (RuntimeError, ValueError):
        with pytest.raises(error):
            LSTM(torch.randn(5, 3, 6))


def test_packed_with_lengths():
    packed = torch.nn.utils.rnn.pack_padded_sequence(X, torch.tensor([5, 4, 3]))
    with pytest.raises(ValueError, match="`lengths` to be None for a PackedSequence"):
        LSTM(packed, lengths=torch.tensor([5, 4, 3]))


def test_gru_hx_shape():
    gru = seqnorm.GRU(4, 8)
    with pytest.raises(
        ShapeError, match=r"For batched 3-D input, hx should also be 3-D but got 2-D tensor"
    ):
        gru(X, torch.zeros(3, 8))
    with pytest.raises(ShapeError, match=r"Expected hidden size \(1, 3, 8\), got \[1, 2, 8\]"):
        gru(X, torch.zeros(1, 2, 8))


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_batch_norm_training_batch_of_one(cls):
    model = getattr(seqnorm, cls)(4, 8, norm="batch")
    with pytest.raises(ValueError, match=r"batch size 1.*norm='layer' or 'group'"):
        model(torch.randn(5, 1, 4))
    with pytest.raises(ValueError, match="batch size 1"):
        model(torch.randn(5, 4))  # unbatched is a batch of one
    model.eval()
    assert model(torch.randn(5, 1, 4))[0].shape == (5, 1, 8)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
def test_cell_forward(cls):
    cell = getattr(seqnorm, cls)(4, 8, norm="batch")
    lstm = cls == "LSTMCell"
    with pytest.raises(ShapeError, match=r"input has inconsistent input_size: got 5 expected 4"):
        cell(torch.randn(3, 5))
    with pytest.raises(ValueError, match=rf"{cls}: Expected input to be 1D or 2D, got 3D instead"):
        cell(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"more than one sample for norm='batch' in training"):
        cell(torch.randn(1, 4))
    state = torch.zeros(3, 7)
    with pytest.raises(
        ShapeError, match=r"hidden0 has inconsistent hidden_size: got 7, expected 8"
    ):
        cell(torch.randn(3, 4), (state, state) if lstm else state)
    state = torch.zeros(5, 8)
    with pytest.raises(ShapeError, match=r"Input batch size 3 doesn't match hidden0 batch size 5"):
        cell(torch.randn(3, 4), (state, state) if lstm else state)
    state = torch.zeros(3, 1, 1, 8)
    which = r"hx\[0\]" if lstm else "hidden"
    with pytest.raises(ValueError, match=rf"Expected {which} to be 1D or 2D, got 4D instead"):
        cell(torch.randn(3, 4), (state, state) if lstm else state)
    with pytest.raises(
        ValueError, match=r"input dtype \(torch.float64\) does not match weight dtype"
    ):
        cell(torch.randn(3, 4, dtype=torch.float64))
    state = torch.zeros(3, 8, dtype=torch.float64)
    which = r"hx\[0\]" if lstm else "hx"
    with pytest.raises(
        ValueError,
        match=rf"`{which}` to have the weights' dtype \(torch.float32\), got torch.float64",
    ):
        cell(torch.randn(3, 4), (state, state.float()) if lstm else state)
    with pytest.raises(
        RuntimeError, match=r"`input` on the weights' device \(cpu\), got it on meta"
    ):
        cell(torch.randn(3, 4, device="meta"))
    state = torch.zeros(3, 8, device="meta")
    with pytest.raises(
        RuntimeError, match=rf"`{which}` on the weights' device \(cpu\), got it on meta"
    ):
        cell(torch.randn(3, 4), (state, torch.zeros(3, 8)) if lstm else state)


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
def test_autocast_mixes_float32_and_half_precision_but_not_float64(cls):
    """Under CPU autocast a bfloat16 input (an autocast layer's output) meets float32 weights, as
    in torch.nn; float64 against float32 stays an error that says which dtypes, where torch.nn
    fails inside its kernel."""
    module = getattr(seqnorm, cls)(4, 8)
    shape = (3, 2, 4) if cls in ("LSTM", "GRU") else (2, 4)
    lstm = cls in ("LSTM", "LSTMCell")
    state = lambda dtype: torch.zeros((1, 2, 8) if cls in ("LSTM", "GRU") else (2, 8), dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        module(torch.randn(*shape, dtype=torch.bfloat16))
        h = state(torch.bfloat16)  # a half-precision state with float32 weights
        module(torch.randn(*shape), (h, h.float()) if lstm else h)
        h = state(torch.float64)
        with pytest.raises(
            ValueError, match=r"weights' dtype \(torch.float32\), got torch.float64"
        ):
            module(torch.randn(*shape), (h, h) if lstm else h)
        with pytest.raises(
            ValueError,
            match=r"input dtype \(torch.float64\) does not match weight dtype \(torch.float32",
        ):
            module(torch.randn(*shape, dtype=torch.float64))
        with pytest.raises(
            ValueError,
            match=r"input dtype \(torch.float32\) does not match weight dtype \(torch.float64",
        ):
            module.double()(torch.randn(*shape))
