"""With norm="none", seqnorm equals torch.nn with the same weights."""

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence
from torch.testing import assert_close

import seqnorm

CASES = [
    pytest.param(
        cls,
        layers,
        bidir,
        bf,
        packed,
        id=f"{cls}-l{layers}-{'bi' if bidir else 'uni'}-{'bf' if bf else 'tf'}-{'packed' if packed else 'padded'}",
    )
    for cls in ["LSTM", "GRU"]
    for layers in [1, 2]
    for bidir in [False, True]
    for bf in [False, True]
    for packed in [False, True]
]


@pytest.mark.parametrize(("cls", "layers", "bidir", "batch_first", "packed"), CASES)
def test_layer_equals_torch(cls, layers, bidir, batch_first, packed):
    kw = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    ref = getattr(torch.nn, cls)(5, 7, **kw)
    ours = getattr(seqnorm, cls)(5, 7, norm="none", **kw)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 6, 5) if batch_first else torch.randn(6, 4, 5)
    if packed:
        x = pack_padded_sequence(
            x, torch.tensor([3, 6, 1, 5]), batch_first=batch_first, enforce_sorted=False
        )
    out, state = ours(x)
    ref_out, ref_state = ref(x)
    if packed:
        assert isinstance(out, PackedSequence)
        assert torch.equal(out.batch_sizes, ref_out.batch_sizes)
        assert torch.equal(out.sorted_indices, ref_out.sorted_indices)
        out, ref_out = out.data, ref_out.data
    assert_close(out, ref_out)
    for a, b in zip(
        state if cls == "LSTM" else [state], ref_state if cls == "LSTM" else [ref_state]
    ):
        assert_close(a, b)
    loss, ref_loss = out.square().sum(), ref_out.square().sum()
    loss.backward()
    ref_loss.backward()
    grads = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        assert_close(grads[name].grad, p.grad, msg=lambda m, name=name: f"grad of {name}: {m}")


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_lengths_equal_torch_packed(cls):
    ref = getattr(torch.nn, cls)(5, 7, bidirectional=True)
    ours = getattr(seqnorm, cls)(5, 7, norm="none", bidirectional=True)
    ours.load_state_dict(ref.state_dict())
    x, lengths = torch.randn(6, 4, 5), torch.tensor([3, 6, 1, 5])
    out, state = ours(x, lengths=lengths)
    ref_out, ref_state = ref(pack_padded_sequence(x, lengths, enforce_sorted=False))
    ref_out = torch.nn.utils.rnn.pad_packed_sequence(ref_out)[0]
    assert_close(out, ref_out)
    assert_close(state[0] if cls == "LSTM" else state, ref_state[0] if cls == "LSTM" else ref_state)


@pytest.mark.parametrize("cls", ["LSTMCell", "GRUCell"])
@pytest.mark.parametrize("batched", [True, False])
def test_cell_equals_torch(cls, batched):
    ref = getattr(torch.nn, cls)(5, 7)
    ours = getattr(seqnorm, cls)(5, 7, norm="none")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5) if batched else torch.randn(5)
    h = torch.randn(3, 7) if batched else torch.randn(7)
    hx = (h, torch.randn_like(h)) if cls == "LSTMCell" else h
    got, want = ours(x, hx), ref(x, hx)
    assert_close(got, want)
    assert_close(ours(x), ref(x))


@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_unbatched_and_hx_equal_torch(cls):
    ref = getattr(torch.nn, cls)(5, 7, num_layers=2)
    ours = getattr(seqnorm, cls)(5, 7, num_layers=2, norm="none")
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(6, 5)
    h = torch.randn(2, 7)
    hx = (h, torch.randn(2, 7)) if cls == "LSTM" else h
    out, state = ours(x, hx)
    ref_out, ref_state = ref(x, hx)
    assert out.shape == (6, 7)
    assert_close(out, ref_out)
    assert_close(state, ref_state)


def test_torch_state_dict_loads_with_strict_false():
    ref = torch.nn.LSTM(5, 7, num_layers=2, bidirectional=True)
    ours = seqnorm.LSTM(5, 7, num_layers=2, bidirectional=True, norm="layer")
    result = ours.load_state_dict(ref.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert result.missing_keys and all(k.startswith("norm_") for k in result.missing_keys)
    for name, p in ref.named_parameters():
        assert torch.equal(getattr(ours, name), p)
