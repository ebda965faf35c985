"""The four normalizations against their formulas in float64 and against torch.nn."""

import pytest
import torch
from torch.testing import assert_close

import seqnorm
from seqnorm import functional as SF
from seqnorm import norms


def formula(x, dims, eps=1e-5):
    mean = x.mean(dim=dims, keepdim=True)
    var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def affine(y, w, b):
    shape = [1, -1] + [1] * (y.dim() - 2)
    return y * w.reshape(shape) + b.reshape(shape)


def randomize(module):
    with torch.no_grad():
        module.weight.uniform_(0.5, 1.5)
        module.bias.uniform_(-0.5, 0.5)
    return module


X = torch.randn(6, 8, 5, dtype=torch.float64)


def test_layer_norm_formula():
    m = randomize(norms.LayerNorm(8, dtype=torch.float64))
    assert_close(m(X), affine(formula(X, (1, 2)), m.weight, m.bias))


def test_instance_norm_formula():
    m = randomize(norms.InstanceNorm(8, dtype=torch.float64))
    assert_close(m(X), affine(formula(X, (2,)), m.weight, m.bias))


def test_group_norm_formula():
    m = randomize(norms.GroupNorm(4, 8, dtype=torch.float64))
    y = formula(X.reshape(6, 4, 2, 5), (2, 3)).reshape(X.shape)
    assert_close(m(X), affine(y, m.weight, m.bias))


def test_batch_norm_formula_and_running_statistics():
    m = randomize(norms.BatchNorm(8, dtype=torch.float64))
    assert_close(m(X), affine(formula(X, (0, 2)), m.weight, m.bias))
    var = X.var(dim=(0, 2), unbiased=True)
    assert_close(m.running_mean, 0.1 * X.mean(dim=(0, 2)))
    assert_close(m.running_var, 0.9 + 0.1 * var)
    m.eval()
    want = (X - m.running_mean.reshape(1, -1, 1)) / torch.sqrt(
        m.running_var.reshape(1, -1, 1) + 1e-5
    )
    assert_close(m(X), affine(want, m.weight, m.bias))


@pytest.mark.parametrize(
    ("ours", "theirs", "x"),
    [
        pytest.param(
            lambda: norms.GroupNorm(4, 8), lambda: torch.nn.GroupNorm(4, 8), X.float(), id="group"
        ),
        pytest.param(
            lambda: norms.LayerNorm(8),
            lambda: torch.nn.LayerNorm(8),
            X.float()[:, :, 0],
            id="layer-2d",
        ),
        pytest.param(
            lambda: norms.LayerNorm(8, affine=False),
            lambda: torch.nn.LayerNorm([8, 5], elementwise_affine=False),
            X.float(),
            id="layer-3d",
        ),
        pytest.param(
            lambda: norms.InstanceNorm(8),
            lambda: torch.nn.InstanceNorm1d(8, affine=True),
            X.float(),
            id="instance",
        ),
        pytest.param(
            lambda: norms.BatchNorm(8), lambda: torch.nn.BatchNorm1d(8), X.float(), id="batch"
        ),
    ],
)
def test_equals_torch(ours, theirs, x):
    a, b = ours(), theirs()
    if a.weight is not None:
        randomize(a)
        b.load_state_dict(a.state_dict(), strict=False)
    for training in (True, False):
        a.train(training)
        b.train(training)
        assert_close(a(x), b(x))
    if isinstance(a, norms.BatchNorm):
        assert_close(a.running_var, b.running_var)


def test_bad_input():
    with pytest.raises(ValueError, match="divide num_channels=8, got groups=3"):
        norms.GroupNorm(3, 8)
    with pytest.raises(ValueError, match=r"\(N, 8, \*\)"):
        norms.LayerNorm(8)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="single number"):
        norms.InstanceNorm(8)(torch.randn(2, 8))
    with pytest.raises(ValueError, match="more than one value per channel"):
        norms.BatchNorm(8)(torch.randn(1, 8))


def test_bad_input_to_the_recurrent_norms():
    """A negative or fractional step read another step's running statistics or failed inside an
    index; a feature count that is not the norm's failed with a message about groups."""
    bn = norms.RecurrentBatchNorm(8, max_steps=5)
    x = torch.randn(4, 8)
    for step, error, match in [
        (-1, ValueError, "step must be non-negative, got -1"),
        (1.5, TypeError, "step should be of type int, got: float 1.5"),
        (True, TypeError, "step should be of type int, got: bool True"),
        (
            torch.tensor(1.0),
            TypeError,
            r"`step` to be an integer, got a tensor of dtype torch\.float32",
        ),
        (torch.tensor([1, 2]), TypeError, r"got a tensor of dtype torch\.int64 and shape \(2,\)"),
    ]:
        with pytest.raises(error, match=match):
            bn(x, step)
    for mask in (torch.full((4,), 0.5), torch.ones(5, dtype=torch.bool)):  # weights, not a mask
        with pytest.raises(ValueError, match=r"`mask` to be a bool tensor of shape \(4,\)"):
            bn(x, 0, mask)
    with pytest.raises(ValueError, match=r"input of shape \(T, N, 8\) or \(N, 8\), got \(8,\)"):
        bn(x[0])
    for momentum in (None, -0.1, 1.5):
        for cls in (norms.RecurrentBatchNorm, norms.BatchNorm):
            with pytest.raises(
                ValueError, match=rf"`momentum` to be a number in \[0, 1\], got {momentum}"
            ):
                cls(8, momentum=momentum)
    bn.eval()
    assert_close(bn(x, torch.tensor(2)), bn(x, 2))
    cell = seqnorm.LSTMCell(4, 8, norm="batch")
    with pytest.raises(ValueError, match="step must be non-negative, got -3"):
        cell(torch.randn(3, 4), step=-3)
    gn = norms.RecurrentGroupNorm(2, 8)
    with pytest.raises(ValueError, match=r"Expected input of shape \(\*, 8\), got \(4, 7\)"):
        gn(torch.randn(4, 7))
    assert_close(gn(x[0]), gn(x[:1])[0])  # one sample, unbatched


def test_bad_input_to_the_functions():
    """The functions check what the modules check: integers would normalize to a few rounded
    values, and a group count that does not divide the channels failed inside a reshape."""
    ints = torch.arange(16).reshape(2, 8)
    for call in (
        lambda: SF.group_norm(ints, 2),
        lambda: SF.layer_norm(ints),
        lambda: SF.batch_norm(ints, None, None),
        lambda: SF.recurrent_batch_norm(ints.unsqueeze(0), torch.zeros(1, 8), torch.ones(1, 8)),
    ):
        with pytest.raises(
            TypeError, match=r"`x` to be a floating-point tensor, got dtype torch\.int64"
        ):
            call()
    for groups, error, match in [
        (3, ValueError, r"`groups` to divide the channels of x \(N, C, \*\), C=8, got groups=3"),
        (0, ValueError, "groups must be greater than zero, got 0"),
        (2.0, TypeError, "groups should be of type int, got: float 2.0"),
        (True, TypeError, "groups should be of type int, got: bool True"),
    ]:
        with pytest.raises(error, match=match):
            SF.group_norm(torch.randn(2, 8), groups)
    with pytest.raises(ValueError, match=r"`x` of shape \(N, C, \*\), got shape \(8,\)"):
        SF.layer_norm(torch.randn(8))


class TestRecurrentBatchNorm:
    def test_per_step_statistics_over_valid_samples(self):
        bn = norms.RecurrentBatchNorm(3, max_steps=10, dtype=torch.float64)
        x = torch.randn(4, 5, 3, dtype=torch.float64)
        mask = torch.ones(4, 5, dtype=torch.bool)
        mask[2, 3:] = False  # step 2: samples 3 and 4 are padding
        y = bn(x, mask=mask)
        for t in range(4):
            valid = x[t][mask[t]]
            want = 0.1 * formula(valid, (0,))
            assert_close(y[t][mask[t]], want)

    def test_fewer_than_two_valid_uses_that_steps_running_statistics(self):
        bn = norms.RecurrentBatchNorm(3, max_steps=10, dtype=torch.float64)
        with torch.no_grad():
            bn.running_mean[5] = torch.tensor([1.0, 2.0, 3.0])
            bn.running_var[5] = torch.tensor([4.0, 5.0, 6.0])
        before = bn.running_mean.clone()
        x = torch.randn(3, 4, 3, dtype=torch.float64)  # steps 4, 5, 6
        mask = torch.ones(3, 4, dtype=torch.bool)
        mask[1, 1:] = False
        y = bn(x, step=4, mask=mask)
        want = (
            0.1
            * (x[1, 0] - before[5])
            / torch.sqrt(torch.tensor([4.0, 5.0, 6.0], dtype=torch.float64) + 1e-5)
        )
        assert_close(y[1, 0], want)
        assert torch.equal(bn.running_mean[5], before[5])  # not updated from a single sample
        assert not torch.equal(bn.running_mean[4], before[4])

    def test_batch_of_one_in_training_raises(self):
        bn = norms.RecurrentBatchNorm(3)
        with pytest.raises(ValueError, match=r"batch size 1.*norm='layer'"):
            bn(torch.randn(4, 1, 3))
        bn.eval()
        assert bn(torch.randn(4, 1, 3)).shape == (4, 1, 3)

    def test_one_step_call_equals_slice_of_sequence_call(self):
        a = norms.RecurrentBatchNorm(3, max_steps=4)
        b = norms.RecurrentBatchNorm(3, max_steps=4)
        x = torch.randn(6, 5, 3)
        whole = a(x)
        steps = torch.stack([b(x[t], step=t) for t in range(6)])
        assert_close(whole, steps)
        assert_close(a.running_mean, b.running_mean)
        assert_close(a.running_var, b.running_var)
