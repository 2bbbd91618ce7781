"""Finite-difference checks, in float64, of Linear and every activation (empty shards too)."""

import numpy as np
import pytest

from dpbp.nn import noise
from dpbp.nn.layers import ALONE, Context, Dropout, Linear, ReLU, Sigmoid, Tanh
from tests.conftest import assert_close, numeric_grad

ACTIVATIONS = {"relu": ReLU, "tanh": Tanh, "sigmoid": Sigmoid}


def dropout(p, index, keys):
    """Dropout(p) as layer `index` of a network, and the context of rows with `keys`."""
    layer = Dropout(p)
    layer.place(index, input_grad=True, input_free=False)
    return layer, Context(keys=keys)


SHAPES = [(1, 1, 1), (4, 3, 5), (7, 10, 2), (0, 3, 4)]   # (B, D_in, D_out); B = 0: no rows


@pytest.mark.parametrize("B,D_in,D_out", SHAPES)
def test_linear(B, D_in, D_out):
    rng = np.random.default_rng(0)
    W, b = rng.normal(size=(D_out, D_in)), rng.normal(size=D_out)
    dW, db = np.zeros_like(W), np.zeros_like(b)
    x, R = rng.normal(size=(B, D_in)), rng.normal(size=(B, D_out))
    layer = Linear(D_out)
    assert layer.declare((D_in,)).params == (("weight", (D_out, D_in)), ("bias", (D_out,)))
    layer.place(1, input_grad=True, input_free=False)
    layer.bind([W, b], [])
    loss = lambda: float((layer.forward(x, ALONE) * R).sum())   # dloss/dy = R
    layer.forward(x, ALONE)
    dx = layer.backward(R.copy(), [(dW, db)], ALONE)
    assert_close(dx, numeric_grad(loss, x))
    assert_close(dW, numeric_grad(loss, W))
    assert_close(db, numeric_grad(loss, b))


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("B,D", [(1, 1), (5, 4), (3, 9), (0, 2)])
@pytest.mark.parametrize("free", [False, True])
def test_activation(name, B, D, free):
    """Over its input where the model says it is free, into a buffer of its own else."""
    rng = np.random.default_rng(1)
    x, R = rng.normal(size=(B, D)) * 3, rng.normal(size=(B, D))
    if name == "relu":
        x[np.abs(x) < 1e-3] = 0.5   # keep finite differences away from the kink
    act = ACTIVATIONS[name]()
    act.place(1, input_grad=True, input_free=free)
    loss = lambda: float((act.forward(x.copy(), ALONE) * R).sum())
    given = x.copy()
    y = act.forward(given, ALONE)
    assert np.shares_memory(y, given) == (free and B > 0)
    assert_close(act.backward(R.copy(), [], ALONE), numeric_grad(loss, x))


@pytest.mark.parametrize("B,D", [(1, 1), (5, 4), (3, 9), (0, 2)])
def test_dropout(B, D):
    """With the mask fixed by the rows' keys, dropout is linear: its gradient is the mask."""
    rng = np.random.default_rng(2)
    x, R = rng.normal(size=(B, D)), rng.normal(size=(B, D))
    layer, ctx = dropout(0.4, 2, noise.row_keys(3, 7, np.arange(10, 10 + B)))
    loss = lambda: float((layer.forward(x, ctx) * R).sum())
    y = layer.forward(x, ctx).copy()   # the layer overwrites its output buffer
    assert_close(layer.backward(R.copy(), [], ctx), numeric_grad(loss, x))
    kept = y != 0   # inverted scaling: kept units are x / (1 - p), exactly as torch scales
    np.testing.assert_array_equal(y[kept], x[kept] * (1 / (1 - 0.4)))
    assert layer.infer(x) is x


def test_dropout_keeps_1_minus_p_and_scales_float32_as_torch():
    x = np.ones((400, 500), np.float32)
    keys = noise.row_keys(0, 0, np.arange(400))
    for p in (0.1, 0.5, 0.9):
        layer, ctx = dropout(p, 2, keys)
        y = layer.forward(x, ctx)
        assert abs((y != 0).mean() - (1 - p)) < 0.005, p
        assert y.dtype == np.float32 and set(np.unique(y)) == {0, np.float32(1 / (1 - p))}


def test_a_rows_mask_depends_on_its_key_alone():
    """The same row (seed, step, index) gets the same mask wherever it sits in a shard,
    and any change of seed, step, index or layer gives another."""
    x = np.ones((6, 64))
    index = np.array([5, 17, 2, 900, 3, 11])

    def masked(rows, seed=1, step=4, shift=0, layer=2):
        layer, ctx = dropout(0.5, layer, noise.row_keys(seed, step, index[rows] + shift))
        return layer.forward(x[rows], ctx).copy()
    whole = masked(slice(None))
    parts = [masked(rows) for rows in (slice(0, 1), slice(1, 4), slice(4, 6))]
    assert whole.tobytes() == np.concatenate(parts).tobytes()
    others = [masked(slice(None), seed=2), masked(slice(None), step=5),
              masked(slice(None), shift=1), masked(slice(None), layer=5)]
    for other in others:
        assert 0.3 < (other != whole).mean() < 0.7   # about half the units differ


def test_noise_bits_look_uniform():
    """Each of the 64 bits is set about half the time, over rows and units."""
    out = np.empty((300, 200), np.uint64)
    bits = noise.bits(noise.row_keys(0, 1, np.arange(300)), 2, out, np.empty_like(out))
    ones = [((bits >> np.uint64(k)) & np.uint64(1)).mean() for k in range(64)]
    assert all(0.48 < f < 0.52 for f in ones), ones


def test_dropout_on_rows_of_any_shape_masks_their_flattened_units():
    """Unit u of a (C, H, W) row is its index in the flattened row: the masks of rows
    (3, 2, 2) are those of the same rows as 12 features."""
    keys = noise.row_keys(0, 2, np.arange(5))
    x = np.random.default_rng(4).normal(size=(5, 3, 2, 2))
    layer, ctx = dropout(0.3, 4, keys)
    flat, ctx_flat = dropout(0.3, 4, keys)
    assert layer.forward(x, ctx).reshape(5, 12).tobytes() == \
        flat.forward(x.reshape(5, 12), ctx_flat).tobytes()
