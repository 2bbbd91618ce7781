"""Finite-difference checks, in float64, of every layer, both losses and the whole model."""

import numpy as np
import pytest

from dpbp.nn.layers import Linear, ReLU, Sigmoid, Tanh
from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.model import MLP

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}
SHAPES = [(1, 1, 1), (4, 3, 5), (7, 10, 2), (0, 3, 4)]   # (B, D_in, D_out); B = 0: no rows


def numeric_grad(f, x, eps=1e-6):
    """Central differences of the scalar f() with respect to array x, changed in place."""
    g = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + eps
        up = f()
        x[i] = old - eps
        down = f()
        x[i] = old
        g[i] = (up - down) / (2 * eps)
    return g


def assert_close(analytic, numeric):
    np.testing.assert_allclose(analytic, numeric, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("B,D_in,D_out", SHAPES)
def test_linear(B, D_in, D_out):
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(D_out, D_in)), rng.normal(size=D_out)
    dW, db = np.zeros_like(W), np.zeros_like(b)
    x, R = rng.normal(size=(B, D_in)), rng.normal(size=(B, D_out))
    layer = Linear(W, b, dW, db)
    loss = lambda: float((layer.forward(x) * R).sum())   # dloss/dy = R
    layer.forward(x)
    dx = layer.backward(R.copy())
    assert_close(dx, numeric_grad(loss, x))
    assert_close(dW, numeric_grad(loss, W))
    assert_close(db, numeric_grad(loss, b))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("B,D", [(1, 1), (5, 4), (3, 9), (0, 2)])
def test_activation(name, B, D):
    rng = np.random.default_rng(1)
    x, R = rng.normal(size=(B, D)) * 3, rng.normal(size=(B, D))
    if name == "relu":
        x[np.abs(x) < 1e-3] = 0.5   # keep finite differences away from the kink
    act = ACTIVATIONS[name]()
    loss = lambda: float((act.forward(x.copy()) * R).sum())   # forward overwrites its input
    act.forward(x.copy())
    assert_close(act.backward(R.copy()), numeric_grad(loss, x))


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


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss_name,widths", [("cross_entropy", [4, 6, 5, 3]),
                                              ("mse", [3, 4, 2]), ("cross_entropy", [5, 3])])
def test_whole_model(activation, loss_name, widths):
    """Backward through the flat buffer matches finite differences of every parameter."""
    rng = np.random.default_rng(4)
    model = MLP(widths, activation, np.float64)
    model.init_(rng)
    B = 6
    x = rng.normal(size=(B, widths[0]))
    if loss_name == "cross_entropy":
        y, loss_fn = rng.integers(0, widths[-1], size=B), cross_entropy
    else:
        y, loss_fn = rng.normal(size=(B, widths[-1])), mse
    loss = lambda: loss_fn(model.forward(x), y, B)[0].sum() / B
    _, dout = loss_fn(model.forward(x), y, B)
    model.backward(dout)
    assert_close(model.grads, numeric_grad(loss, model.params))
