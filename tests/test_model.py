"""The MLP: whole-model gradients, flat buffers and their views, infer against forward."""

import numpy as np
import pytest

from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.model import MLP
from tests.conftest import assert_close, numeric_grad

ACTIVATIONS = ("relu", "sigmoid", "tanh")


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


def test_params_and_grads_are_one_flat_buffer_each_and_the_layers_views():
    model = MLP([4, 6, 5, 3], "tanh", np.float32)
    sizes = [6 * 4, 6, 5 * 6, 5, 3 * 5, 3]
    for flat in (model.params, model.grads):
        assert flat.ndim == 1 and flat.size == sum(sizes) and flat.flags.c_contiguous
        assert flat.dtype == np.float32
    offset = 0
    for linear in model.linears:
        for view, flat in ((linear.W, model.params), (linear.b, model.params),
                           (linear.dW, model.grads), (linear.db, model.grads)):
            assert view.base is flat or view.base.base is flat
            assert np.shares_memory(view, flat)
        for view, flat in ((linear.W, model.params), (linear.dW, model.grads)):
            view[1, 2] = 7.0   # writing through a view changes the flat buffer
            assert flat[offset + 1 * view.shape[1] + 2] == 7.0
            flat[offset] = -3.0   # and the other way round
            assert view[0, 0] == -3.0
        offset += linear.W.size
        for view, flat in ((linear.b, model.params), (linear.db, model.grads)):
            view[-1] = 9.0
            assert flat[offset + view.size - 1] == 9.0
        offset += linear.b.size
    assert offset == model.params.size
    assert not np.shares_memory(model.params, model.grads)
    for name, view in model.state_dict().items():   # the checkpoint's arrays, too
        assert np.shares_memory(view, model.params), name


def test_backward_writes_the_flat_gradient_and_leaves_the_parameters():
    rng = np.random.default_rng(7)
    model = MLP([3, 4, 2], "relu", np.float64)
    model.init_(rng)
    before = model.params.copy()
    model.grads[...] = np.nan   # every value is overwritten, none accumulated
    x, y = rng.normal(size=(5, 3)), rng.integers(0, 2, size=5)
    _, dout = cross_entropy(model.forward(x), y, 5)
    model.backward(dout)
    assert np.isfinite(model.grads).all() and np.any(model.grads != 0)
    assert model.params.tobytes() == before.tobytes()
    views = model.split(model.grads)   # [dW_0, db_0, dW_1, db_1]
    for i, linear in enumerate(model.linears):
        assert linear.dW.tobytes() == views[2 * i].tobytes()
        assert linear.db.tobytes() == views[2 * i + 1].tobytes()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [0, 1, 9])
def test_infer_equals_forward_bit_for_bit(activation, dtype, B):
    model = MLP([5, 7, 6, 3], activation, dtype)
    model.init_(np.random.default_rng(8))
    x = (np.random.default_rng(9).normal(size=(B, 5)) * 3).astype(dtype)
    x_before = x.copy()
    want = model.forward(x).copy()   # forward's output buffer is reused by its next call
    got = model.infer(x)
    assert got.shape == (B, 3) and got.dtype == dtype
    assert got.tobytes() == want.tobytes()
    assert x.tobytes() == x_before.tobytes()   # neither touches its input


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_whole_model_with_dropout(activation):
    """With the rows' keys fixed, the masks are too: backward through the flat buffer
    matches finite differences, and the layers are numbered as torch.nn.Sequential with
    an nn.Dropout after each activation."""
    from dpbp.nn import noise
    rng = np.random.default_rng(6)
    model = MLP([4, 7, 6, 3], activation, np.float64, dropout=0.3)
    model.init_(rng)
    assert model.names == ["model.0.weight", "model.0.bias", "model.3.weight", "model.3.bias",
                           "model.6.weight", "model.6.bias"]
    B = 6
    x, y = rng.normal(size=(B, 4)), rng.integers(0, 3, size=B)
    keys = noise.row_keys(0, 3, np.arange(B))
    loss = lambda: cross_entropy(model.forward(x, keys), y, B)[0].sum() / B
    _, dout = cross_entropy(model.forward(x, keys), y, B)
    model.backward(dout)
    assert_close(model.grads, numeric_grad(loss, model.params))
    plain = MLP(model.widths, activation, np.float64)   # evaluation: no dropout
    plain.params[...] = model.params
    assert model.infer(x).tobytes() == plain.infer(x).tobytes()


def test_initial_weights_are_torch_linears():
    """model.init_ draws as torch.nn.Linear does: every weight and bias of a layer
    uniform in [-1/sqrt(D_in), 1/sqrt(D_in)] (its fan-in), filling that range."""
    model = MLP([64, 32, 10], "relu", np.float64)
    model.init_(np.random.default_rng(0))
    state = model.state_dict()
    for i, fan_in in ((0, 64), (2, 32)):
        bound = 1 / np.sqrt(fan_in)
        for name, fill in ((f"model.{i}.weight", 0.99), (f"model.{i}.bias", 0.7)):
            a = state[name]
            assert np.abs(a).max() <= bound, name
            assert a.max() > fill * bound and a.min() < -fill * bound, name
