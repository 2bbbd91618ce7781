"""Finite-difference checks, in float64, of Linear and every activation (empty shards too)."""

import numpy as np
import pytest

from dpbp.nn.layers import Linear, ReLU, Sigmoid, Tanh
from tests.conftest import assert_close, numeric_grad

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


SHAPES = [(1, 1, 1), (4, 3, 5), (7, 10, 2), (0, 3, 4)]   # (B, D_in, D_out); B = 0: no rows


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
