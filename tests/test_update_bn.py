"""seqnorm.update_bn: running statistics recomputed as equal-weight averages of one pass's batch
statistics, against the statistics each batch gives on its own."""

import copy

import pytest
import torch
from helpers import BACKENDS, make
from torch import nn
from torch.testing import assert_close

import seqnorm
from seqnorm.norms import BatchNorm, RecurrentBatchNorm

BATCHES = [  # (steps, lengths): a step with one valid sample moves nothing
    (6, [6, 6, 4]),
    (5, [5, 1, 3]),
    (4, [4, 4]),
]


def _batches(input_size=5):
    return [
        (torch.randn(t, len(n), input_size, dtype=torch.float64), torch.tensor(n))
        for t, n in BATCHES
    ]


def _norms(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, RecurrentBatchNorm)}


def _expected(model, batches, max_steps):
    """Each batch alone through a copy whose every step has its own row (momentum 1, from reset
    statistics): its statistics per step; averaged per row of ``max_steps`` rows over the steps
    with at least two valid samples."""
    single = copy.deepcopy(model)
    rows = max(t for t, _ in BATCHES)
    sums = {}  # name: (mean, var, hits) of each of max_steps rows
    for name, m in _norms(single).items():
        m.running_mean = torch.zeros(rows, m.num_channels, dtype=torch.float64)
        m.running_var = torch.ones(rows, m.num_channels, dtype=torch.float64)
        m.momentum = 1.0
        zeros = torch.zeros(max_steps, m.num_channels, dtype=torch.float64)
        sums[name] = (zeros, zeros.clone(), torch.zeros(max_steps, 1, dtype=torch.float64))
    for x, lengths in batches:
        for m in _norms(single).values():
            m.running_mean.zero_()
            m.running_var.fill_(1)
        single.train()
        with torch.no_grad():
            single(x, lengths=lengths)
        for name, m in _norms(single).items():
            mean, var, hits = sums[name]
            for t in range(x.shape[0]):
                if (lengths > t).sum() >= 2:
                    row = min(t, max_steps - 1)
                    mean[row] += m.running_mean[t]
                    var[row] += m.running_var[t]
                    hits[row] += 1
    return {
        name: (
            torch.where(hits > 0, mean / hits.clamp(min=1), 0.0),
            torch.where(hits > 0, var / hits.clamp(min=1), 1.0),
        )
        for name, (mean, var, hits) in sums.items()
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", ["LSTM", "GRU"])
def test_update_bn_averages_each_steps_batch_statistics(cls, backend):
    """Two layers, both directions, lengths, steps past max_steps sharing the last row: every
    running row is the average of the statistics its steps had, batch by batch; mode and
    momentum come back; the old running statistics play no part. A torch.compile'd model is
    updated through its module."""
    max_steps = 3
    model = make(
        cls, "batch", backend=backend, num_layers=2, bidirectional=True, max_steps=max_steps
    )
    batches = _batches()
    want = _expected(model, batches, max_steps)
    for m in _norms(model).values():  # stale statistics, as after averaging weights
        m.running_mean.normal_()
        m.running_var.uniform_(2, 3)
    model.eval()
    model.norm_ih_l0.train()  # a module in another mode than the model's keeps it
    seqnorm.update_bn(batches, torch.compile(model), forward=lambda m, b: m(b[0], lengths=b[1]))
    assert not model.training and model.norm_ih_l0.training and not model.norm_hh_l0.training
    assert all(m.momentum == 0.1 for m in _norms(model).values())
    sites = 3 if cls == "LSTM" else 2  # ih, hh (and the LSTM's c) for 2 layers x 2 directions
    assert want.keys() == _norms(model).keys() and len(want) == 4 * sites
    for name, m in _norms(model).items():
        assert_close(m.running_mean, want[name][0])
        assert_close(m.running_var, want[name][1])
    assert (want["norm_hh_l0"][1] != 1).any()  # rows were reached


def test_update_bn_through_cells_and_torch_batch_norms():
    """A cell loop (its step argument picks the row) beside torch's and seqnorm's per-channel
    batch norms, in one pass over batches given as (input, target) tuples moved to a device:
    each statistic is the plain mean over the calls (torch's through momentum None)."""

    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.cell = seqnorm.LSTMCell(4, 6, norm="batch", max_steps=2, dtype=torch.float64)
            self.bn = nn.BatchNorm1d(6, dtype=torch.float64)
            self.ours = BatchNorm(6, dtype=torch.float64)

        def forward(self, x):
            h = None
            outs = []
            for t in range(x.shape[0]):
                h = self.cell(x[t], h, step=t)
                outs.append(self.ours(self.bn(h[0])))
            return torch.stack(outs)

    model = Loop()
    xs = [torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(3)]
    hh, ours, bn = [], [], []  # each call's statistics, from a copy with momentum 1
    single = copy.deepcopy(model)
    single.cell.norm_hh.momentum = single.ours.momentum = single.bn.momentum = 1.0
    for x in xs:
        for t in range(x.shape[0]):
            single.cell.norm_hh.running_mean.zero_()
            single.cell.norm_hh.running_var.fill_(1)
            single(x[: t + 1])
            hh.append((min(t, 1), single.cell.norm_hh.running_mean[min(t, 1)].clone()))
            bn.append(single.bn.running_var.clone())
            ours.append(single.ours.running_mean.clone())
    seqnorm.update_bn([(x, None) for x in xs], model, device="cpu")
    for row in (0, 1):
        want = torch.stack([m for r, m in hh if r == row]).mean(0)
        assert_close(model.cell.norm_hh.running_mean[row], want)
    assert_close(model.bn.running_var, torch.stack(bn).mean(0))  # every call, every step
    assert model.bn.momentum == 0.1 and model.ours.momentum == 0.1
    assert_close(model.ours.running_mean, torch.stack(ours).mean(0))


def test_update_bn_without_batch_norm_runs_nothing():
    def never():
        raise AssertionError("iterated")
        yield

    seqnorm.update_bn(never(), make("LSTM", "layer"))


def test_update_bn_through_an_averaged_model():
    """docs/compatibility.md: a torch.optim.swa_utils.AveragedModel is passed as it is, and its
    averaged module gets the statistics the module itself would."""
    from torch.optim.swa_utils import AveragedModel

    model = make("LSTM", "batch", backend="cpp")
    averaged = AveragedModel(copy.deepcopy(model))
    batches = [x for x, _ in _batches()]
    seqnorm.update_bn(batches, model)
    seqnorm.update_bn(batches, averaged)
    for (name, got), want in zip(averaged.module.named_buffers(), model.buffers()):
        assert_close(got, want, msg=name)
    assert (model.norm_hh_l0.running_var != 1).any()
