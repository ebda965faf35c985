"""Random configurations of the layers, each run on the C++ kernel and on the readable Python loop
in float64: the combinations the parametrized tests take one axis at a time (cell, norm, layers,
direction, batch_first, bias, padding by lengths or PackedSequence, unbatched input, initial
states, train or eval, batch norm's max_steps) drawn together. Outputs, final states, the
gradients of the input, the states and every parameter, and the running statistics must agree;
in eval mode, a run without a backward (which keeps nothing, and reads batch norm's running rows
in place) must give the kernel's outputs again, bit for bit."""

import copy
import random

import pytest
import torch
from helpers import flat, randomize_running
from torch.nn.utils.rnn import pack_padded_sequence
from torch.testing import assert_close

import seqnorm


def _configuration(seed: int) -> dict:
    rng = random.Random(seed)
    norm = rng.choice(["none", "layer", "group", "batch"])
    form = rng.choice(["plain", "lengths", "packed", "unbatched"])
    if form == "unbatched" and norm == "batch":  # one sample: no batch statistics
        form = "plain"
    return dict(
        cls=rng.choice(["LSTM", "GRU"]),
        norm=norm,
        hidden=rng.choice([4, 8, 12]) if norm == "group" else rng.choice([1, 2, 4, 8, 12]),
        groups=rng.choice([1, 2, 4]) if norm == "group" else 1,
        input_size=rng.choice([1, 3, 5]),
        layers=rng.choice([1, 2]),
        bidirectional=rng.random() < 0.5,
        batch_first=rng.random() < 0.5,
        bias=rng.random() < 0.8,
        max_steps=rng.choice([1, 3, 1000]),
        batch=rng.choice([2, 3, 5]) if norm == "batch" else rng.choice([1, 2, 3, 5]),
        steps=rng.choice([1, 2, 4, 7]),
        form=form,
        training=rng.random() < 0.6,
        states=rng.random() < 0.5,
        rng=rng,
    )


@pytest.mark.parametrize("seed", range(40))
def test_a_random_configuration_on_the_kernel_equals_the_loop(seed):
    c = _configuration(seed)
    torch.manual_seed(seed)
    kw = dict(num_layers=c["layers"], bidirectional=c["bidirectional"], norm=c["norm"])
    kw.update(batch_first=c["batch_first"], bias=c["bias"], dtype=torch.float64)
    if c["norm"] == "group":
        kw["groups"] = c["groups"]
    if c["norm"] == "batch":
        kw["max_steps"] = c["max_steps"]
    loop = getattr(seqnorm, c["cls"])(c["input_size"], c["hidden"], **kw)
    with torch.no_grad():  # gains and shifts away from 1 and 0
        for p in loop.parameters():
            p.add_(0.1 * torch.randn_like(p))
    randomize_running(loop)
    loop.train(c["training"])
    kernel = copy.deepcopy(loop)
    loop.backend, kernel.backend = "python", "cpp"
    n, t, size = c["batch"], c["steps"], c["input_size"]
    unbatched = c["form"] == "unbatched"
    shape = (t, size) if unbatched else (n, t, size) if c["batch_first"] else (t, n, size)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([c["rng"].randint(1, t) for _ in range(n)])
    directions = 2 if c["bidirectional"] else 1
    state_shape = (directions * c["layers"], c["hidden"])
    if not unbatched:
        state_shape = (state_shape[0], n, c["hidden"])
    count = 2 if c["cls"] == "LSTM" else 1
    states = [
        torch.randn(state_shape, dtype=torch.float64, requires_grad=True) for _ in range(count)
    ]

    def run(model):
        hx = None
        if c["states"]:
            hx = tuple(states) if c["cls"] == "LSTM" else states[0]
        if c["form"] == "lengths":
            return model(x, hx, lengths=lengths)
        if c["form"] == "packed":
            packed = pack_padded_sequence(
                x, lengths, batch_first=c["batch_first"], enforce_sorted=False
            )
            return model(packed, hx)
        return model(x, hx)

    got, want = flat(run(kernel)), flat(run(loop))
    weights = [torch.randn_like(w) for w in want]
    inputs = [x, *(states if c["states"] else [])]
    got_grads = torch.autograd.grad(
        sum((g * w).sum() for g, w in zip(got, weights)),
        [*inputs, *kernel.parameters()],
        allow_unused=True,
    )
    want_grads = torch.autograd.grad(
        sum((g * w).sum() for g, w in zip(want, weights)),
        [*inputs, *loop.parameters()],
        allow_unused=True,
    )
    for g, w in zip(got, want):
        assert_close(g, w, rtol=1e-9, atol=1e-9)
    for g, w in zip(got_grads, want_grads):
        assert (g is None) == (w is None)
        if w is not None:
            assert_close(g, w, rtol=1e-8, atol=1e-8)
    for (name, g), (_, w) in zip(kernel.named_buffers(), loop.named_buffers()):
        assert_close(g, w, rtol=1e-9, atol=1e-9, msg=lambda m, name=name: f"{name}: {m}")
    if not c["training"]:  # without a backward: nothing kept, batch norm's rows read in place
        with torch.no_grad():
            for g, w in zip(flat(run(kernel)), got):
                assert_close(g, w, rtol=0, atol=0)
