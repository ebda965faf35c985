"""Per-sample normalization, padding and packing: the properties seqnorm exists for."""

import pytest
import torch
from helpers import make
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from torch.testing import assert_close

LAYERS = ["LSTM", "GRU"]


# In float32 a batch of 1 and a batch of 32 sum the matrix products in a different order; group
# norm over groups of two units amplified that rounding to 1.6e-5 here (10 steps, 2 layers).
# Mixing samples would show as differences of order 0.1.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("norm", ["layer", "group"])
def test_per_sample_norms_give_the_same_output_alone_and_in_a_batch_of_32(cls, norm, dtype):
    model = make(cls, norm, num_layers=2, bidirectional=True, dtype=dtype)
    x = torch.randn(10, 32, 5, dtype=dtype)
    batch_out, _ = model(x)
    tolerance = {} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-4}
    for i in [0, 7, 31]:
        alone, _ = model(x[:, i : i + 1])
        assert_close(alone[:, 0], batch_out[:, i], **tolerance)


@pytest.mark.parametrize("cls", LAYERS)
def test_batch_norm_output_depends_on_the_rest_of_the_batch(cls):
    model = make(cls, "batch", dtype=torch.float32)
    x = torch.randn(10, 32, 5)
    batch_out, _ = model(x)
    small_out, _ = model(x[:, :4])
    difference = (small_out[:, 0] - batch_out[:, 0]).abs().max()
    assert difference > 1e-2, f"batch norm should mix samples, max difference {difference}"


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("norm", ["none", "layer", "group"])
def test_padded_batch_equals_each_sample_alone(cls, norm):
    model = make(cls, norm, num_layers=2, bidirectional=True)
    lengths = torch.tensor([7, 2, 5, 7, 1])
    x = torch.randn(7, 5, 5, dtype=torch.float64)
    out, state = model(x, lengths=lengths)
    h_n = state[0] if cls == "LSTM" else state
    assert torch.all(out[torch.arange(7).unsqueeze(1) >= lengths] == 0)
    for i, n in enumerate(lengths.tolist()):
        alone, alone_state = model(x[:n, i : i + 1])
        assert_close(out[:n, i], alone[:, 0])
        assert_close(h_n[:, i], (alone_state[0] if cls == "LSTM" else alone_state)[:, 0])


@pytest.mark.parametrize("cls", LAYERS)
def test_batch_norm_more_padding_changes_no_valid_output(cls):
    model = make(cls, "batch", bidirectional=True)
    lengths = torch.tensor([6, 2, 5, 4])
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    out, state = model(x, lengths=lengths)
    longer = torch.cat([x, 100 * torch.randn(5, 4, 5, dtype=torch.float64)])  # loud garbage padding
    longer[torch.arange(11).unsqueeze(1) >= lengths] = 1e3
    out2, state2 = model(longer, lengths=lengths)
    valid = torch.arange(6).unsqueeze(1) < lengths
    assert_close(out2[:6][valid], out[valid])
    assert_close(state2, state)


@pytest.mark.parametrize("cls", LAYERS)
@pytest.mark.parametrize("norm", ["none", "layer", "group", "batch"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_packed_equals_lengths(cls, norm, batch_first):
    model = make(cls, norm, num_layers=2, bidirectional=True, batch_first=batch_first)
    lengths = torch.tensor([3, 6, 2, 6])
    x = (
        torch.randn(4, 6, 5, dtype=torch.float64)
        if batch_first
        else torch.randn(6, 4, 5, dtype=torch.float64)
    )
    out, state = model(x, lengths=lengths)
    packed_out, packed_state = model(
        pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
    )
    padded, out_lengths = pad_packed_sequence(packed_out, batch_first=batch_first)
    assert torch.equal(out_lengths, lengths)
    assert_close(padded, out)
    assert_close(packed_state, state)
