"""Both losses: finite-difference gradients (float64) and values as torch defines them."""

import numpy as np
import pytest

from dpbp.nn.losses import cross_entropy, mse, softmax
from tests.conftest import assert_close, numeric_grad


@pytest.mark.parametrize("B,C,N", [(1, 2, 1), (6, 3, 6), (5, 10, 12), (0, 4, 3)])
def test_cross_entropy(B, C, N):
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(size=(B, C)) * 4, rng.integers(0, C, size=B)
    loss = lambda: cross_entropy(logits, labels, N)[0].sum() / N
    losses, dlogits = cross_entropy(logits, labels, N)
    assert_close(dlogits, numeric_grad(loss, logits))
    # the values themselves: -log softmax per sample, as torch.nn.CrossEntropyLoss
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(losses, -np.log(p[np.arange(B), labels]), rtol=1e-12)
    assert losses.shape == (B,) and losses.dtype == np.float64


def test_cross_entropy_extreme_logits_stay_finite():
    logits = np.array([[1000.0, -1000.0, 0.0]])
    losses, dlogits = cross_entropy(logits, np.array([1]), 1)
    assert losses[0] == pytest.approx(2000.0)
    assert np.isfinite(dlogits).all()


@pytest.mark.parametrize("B,C,N", [(1, 1, 1), (4, 3, 4), (6, 2, 9), (0, 3, 2)])
def test_mse(B, C, N):
    rng = np.random.default_rng(3)
    out, target = rng.normal(size=(B, C)), rng.normal(size=(B, C))
    loss = lambda: mse(out, target, N)[0].sum() / N
    losses, dout = mse(out, target, N)
    assert_close(dout, numeric_grad(loss, out))
    # per sample, the mean over its outputs: their mean is torch.nn.MSELoss's value
    np.testing.assert_allclose(losses, ((out - target) ** 2).mean(axis=1), rtol=1e-12)


def test_mse_one_hot_labels():
    out = np.array([[0.2, 0.9], [0.4, 0.1]])
    losses, _ = mse(out, np.array([1, 0]), 2)
    np.testing.assert_array_equal(losses, mse(out, np.array([[0.0, 1.0], [1.0, 0.0]]), 2)[0])


def test_softmax_of_extreme_logits_is_finite_and_sums_to_one():
    """predict's probabilities: float64, finite, each row summing to 1, even for logits
    whose exp overflows (the row's largest is taken away first)."""
    p = softmax(np.array([[1000.0, -1000.0, 0.0], [800.0, 800.0, 0.0]], np.float32))
    assert p.dtype == np.float64 and np.isfinite(p).all()
    np.testing.assert_allclose(p, [[1, 0, 0], [0.5, 0.5, 0]], rtol=0, atol=1e-300)


@pytest.mark.parametrize("loss_fn,targets", [
    (cross_entropy, np.array([0, 2])), (mse, np.array([0, 2])),
    (mse, np.ones((2, 3), np.float32))], ids=["cross_entropy", "mse-labels", "mse-targets"])
def test_float32_outputs_give_float64_losses_and_a_float32_gradient(loss_fn, targets):
    """Per-sample losses in float64 (they are summed exactly, math.fsum), the gradient
    in the network's dtype (it goes into the float32 flat buffer)."""
    out = np.array([[0.1, 0.2, 0.3], [1e-4, 3e3, -2.0]], np.float32)
    losses, grad = loss_fn(out, targets, 2)
    assert losses.dtype == np.float64 and grad.dtype == np.float32
