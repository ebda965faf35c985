"""Bad input fails up front with a message naming the argument, the value and what was expected."""

import pytest
import torch

import seqnorm

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
        r"`groups` to be at least 1, got 0",
        id="groups-0",
    ),
    pytest.param(
        {"norm": "group", "groups": 2.0},
        TypeError,
        r"`groups` to be an int, got float",
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
        {"max_steps": 0}, ValueError, r"`max_steps` to be at least 1, got 0", id="max-steps"
    ),
    pytest.param(
        {"hidden_size": -1}, ValueError, r"`hidden_size` to be at least 1, got -1", id="hidden"
    ),
]


@pytest.mark.parametrize("cls", ["LSTM", "GRU", "LSTMCell", "GRUCell"])
@pytest.mark.parametrize(("kwargs", "error", "match"), CONSTRUCTOR_ERRORS)
def test_constructor(cls, kwargs, error, match):
    kwargs = {"input_size": 4, "hidden_size": 8, **kwargs}
    with pytest.raises(error, match=match):
        getattr(seqnorm, cls)(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"num_layers": 0}, r"`num_layers` to be at least 1, got 0", id="layers"),
        pytest.param(
            {"dropout": 1.5}, r"`dropout` to be a number in \[0, 1\], got 1.5", id="dropout"
        ),
    ],
)
def test_layer_constructor(kwargs, match):
    with pytest.raises(ValueError, match=match):
        seqnorm.LSTM(4, 8, **kwargs)


LSTM = seqnorm.LSTM(4, 8, num_layers=2)
X = torch.randn(5, 3, 4)
H = torch.zeros(2, 3, 8)

FORWARD_ERRORS = [
    pytest.param(
        dict(input=torch.randn(2, 5, 3, 4)),
        ValueError,
        r"`input` to be 3-D \(L, N, H_in\).*got 4-D",
        id="rank",
    ),
    pytest.param(
        dict(input=torch.randn(5, 3, 6)),
        ValueError,
        r"input_size=4 features.*got shape \(5, 3, 6\)",
        id="features",
    ),
    pytest.param(
        dict(input=[1, 2]),
        TypeError,
        r"`input` to be a Tensor or PackedSequence, got list",
        id="type",
    ),
    pytest.param(
        dict(hx=(torch.zeros(1, 3, 8), H)),
        ValueError,
        r"`hx\[0\] \(h_0\)` of shape \(2, 3, 8\).*got \(1, 3, 8\)",
        id="h0",
    ),
    pytest.param(
        dict(hx=(H, torch.zeros(2, 3, 7))),
        ValueError,
        r"`hx\[1\] \(c_0\)` of shape \(2, 3, 8\).*got \(2, 3, 7\)",
        id="c0",
    ),
    pytest.param(
        dict(hx=H), TypeError, r"`hx` to be a tuple \(h_0, c_0\), got Tensor", id="hx-tuple"
    ),
    pytest.param(
        dict(lengths=torch.tensor([[5, 5, 5]])),
        ValueError,
        r"`lengths` to be 1-D, got shape \(1, 3\)",
        id="lengths-2d",
    ),
    pytest.param(
        dict(lengths=torch.tensor([5, 5])),
        ValueError,
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


def test_packed_with_lengths():
    packed = torch.nn.utils.rnn.pack_padded_sequence(X, torch.tensor([5, 4, 3]))
    with pytest.raises(ValueError, match="`lengths` to be None for a PackedSequence"):
        LSTM(packed, lengths=torch.tensor([5, 4, 3]))


def test_gru_hx_shape():
    with pytest.raises(ValueError, match=r"`hx` of shape \(1, 3, 8\).*got \(3, 8\)"):
        seqnorm.GRU(4, 8)(X, torch.zeros(3, 8))


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
    with pytest.raises(ValueError, match=r"`input` of shape \(N, 4\) or \(4,\), got \(3, 5\)"):
        cell(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"more than one sample for norm='batch' in training"):
        cell(torch.randn(1, 4))
    state = torch.zeros(3, 7)
    with pytest.raises(ValueError, match=r"of shape \(3, 8\), got \(3, 7\)"):
        cell(torch.randn(3, 4), (state, state) if cls == "LSTMCell" else state)
