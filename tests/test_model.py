"""The model: whole-model gradients, flat buffers and their views, the factory's specs,
buffers, infer against forward."""

import numpy as np
import pytest

from dpbp.nn import noise
from dpbp.nn.layers import Context
from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.model import Model
from tests.conftest import assert_close, mlp, numeric_grad

ACTIVATIONS = ("relu", "sigmoid", "tanh")


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("loss_name,widths", [("cross_entropy", [4, 6, 5, 3]),
                                              ("mse", [3, 4, 2]), ("cross_entropy", [5, 3])])
def test_whole_model(activation, loss_name, widths):
    """Backward through the flat buffer matches finite differences of every parameter."""
    rng = np.random.default_rng(4)
    model = mlp(widths, activation, np.float64)
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
    model = mlp([4, 6, 5, 3], "tanh", np.float32)
    sizes = [6 * 4, 6, 5 * 6, 5, 3 * 5, 3]
    for flat in (model.params, model.grads):
        assert flat.ndim == 1 and flat.size == sum(sizes) and flat.flags.c_contiguous
        assert flat.dtype == np.float32
    linears = [model.layers[i] for i in (0, 2, 4)]
    views = model.split(model.grads)   # [dW_0, db_0, dW_1, db_1, dW_2, db_2]
    offset = 0
    for j, linear in enumerate(linears):
        for view, flat in ((linear.W, model.params), (views[2 * j], model.grads)):
            assert np.shares_memory(view, flat)
            view[1, 2] = 7.0   # writing through a view changes the flat buffer
            assert flat[offset + 1 * view.shape[1] + 2] == 7.0
            flat[offset] = -3.0   # and the other way round
            assert view[0, 0] == -3.0
        offset += linear.W.size
        for view, flat in ((linear.b, model.params), (views[2 * j + 1], model.grads)):
            view[-1] = 9.0
            assert flat[offset + view.size - 1] == 9.0
        offset += linear.b.size
    assert offset == model.params.size
    assert not np.shares_memory(model.params, model.grads)
    for name, view in model.state_dict().items():   # the checkpoint's arrays, too
        assert np.shares_memory(view, model.params), name


def test_backward_writes_the_flat_gradient_it_is_given_and_leaves_the_parameters():
    """Every value of the gradient buffer is overwritten, none accumulated; into a buffer
    of its own (a grain's, under train.deterministic) the same bits, model.grads
    untouched."""
    rng = np.random.default_rng(7)
    model = mlp([3, 4, 2], "relu", np.float64)
    model.init_(rng)
    before = model.params.copy()
    model.grads[...] = np.nan
    x, y = rng.normal(size=(5, 3)), rng.integers(0, 2, size=5)
    _, dout = cross_entropy(model.forward(x), y, 5)
    model.backward(dout.copy())
    assert np.isfinite(model.grads).all() and np.any(model.grads != 0)
    assert model.params.tobytes() == before.tobytes()
    own, grads = np.full_like(model.grads, np.nan), model.grads.copy()
    model.forward(x)
    model.backward(dout.copy(), own)
    assert own.tobytes() == grads.tobytes() and model.grads.tobytes() == grads.tobytes()


def test_the_factory_builds_from_specs_and_walks_the_input_shape():
    """The spec list is the factory's input: names follow torch.nn.Sequential, shapes
    come from the input's, FLOPs and random draws from the layers."""
    layers = [{"type": "dropout", "p": 0.2}, {"type": "linear", "out_features": 6},
              {"type": "sigmoid"}, {"type": "linear", "out_features": 2}]
    model = Model(layers, (5,), np.float32)
    assert model.names == ["model.1.weight", "model.1.bias", "model.3.weight", "model.3.bias"]
    assert model.shapes == [(6, 5), (6,), (2, 6), (2,)] and model.output_shape == (2,)
    assert model.draws and not mlp([5, 6, 2]).draws
    assert model.describe() == "5 -> dropout 0.2, linear 6, sigmoid, linear 2"
    # a layer writes over its input only after one whose output nothing reads again
    assert [layer.input_free for layer in model.layers] == [False, True, True, False]
    assert [layer.input_free for layer in mlp([5, 6, 2], "tanh", dropout=0.5).layers] == \
        [False, True, False, True]
    # no gradient for the data: the first Linear computes no dx, dropout before it no backward
    assert model.flops_per_sample == 3 * 5 + (4 * 5 * 6 + 2 * 6) + 7 * 6 + (6 * 6 * 2 + 2 * 2)
    assert mlp([4, 6, 5, 3]).flops_per_sample == (4 * 4 * 6 + 12) + 2 * 6 + (6 * 6 * 5 + 10) \
        + 2 * 5 + (6 * 5 * 3 + 6)


@pytest.mark.parametrize("layers,words", [
    ([], "the network has no layers"),
    ([{"type": "conv"}], "layer 0: unknown type 'conv'; the types are avgpool2d, "
                         "batchnorm1d, batchnorm2d, conv2d, dropout, flatten, linear"),
    ([{"out_features": 3}], "layer 0: expected a table with a type"),
    ([{"type": "linear"}], "layer 0 (linear): out_features is missing; linear takes "
                           "out_features (out_features required)"),
    ([{"type": "relu", "p": 0.5}], "layer 0 (relu): unknown key 'p'; relu takes no arguments"),
    ([{"type": "dropout", "p": 0.1, "inplace": True}], "layer 0 (dropout): unknown key "
                                                       "'inplace'; dropout takes p (p required)"),
    ([{"type": "conv2d", "out_channels": 2, "kernel_size": 3, "dilation": 2}],
     "layer 0 (conv2d): unknown key 'dilation'; conv2d takes out_channels, kernel_size, "
     "stride, padding, bias (out_channels, kernel_size required)"),
    ([{"type": "linear", "out_features": 0}], "layer 0 (linear): out_features must be an "
                                              "integer >= 1, got 0"),
    ([{"type": "dropout", "p": 1.0}], "layer 0 (dropout): p must be a number in [0, 1)"),
])
def test_specs_that_make_no_network_are_named(layers, words):
    with pytest.raises(ValueError) as e:
        Model(layers, (3,), np.float32)
    assert words in str(e.value)


def test_linear_refuses_rows_that_are_not_vectors():
    with pytest.raises(ValueError, match=r"layer 0 \(linear\): linear takes rows of "
                                         r"features \(D_in,\), got rows of shape \(1, 4, 4\); "
                                         "put a flatten before it"):
        Model([{"type": "linear", "out_features": 3}], (1, 4, 4), np.float32)


def test_activations_keep_any_row_shape_and_never_write_into_their_input():
    """(B, C, H, W) rows pass through activations and dropout with their shape, and their
    gradients match finite differences; neither forward nor infer writes into the array
    it is given (the data, or what the layer before keeps for its backward)."""
    rng = np.random.default_rng(3)
    layers = [{"type": "relu"}, {"type": "tanh"}, {"type": "dropout", "p": 0.5},
              {"type": "sigmoid"}]
    model = Model(layers, (2, 3, 3), np.float64)
    x = rng.normal(size=(4, 2, 3, 3))
    x[np.abs(x) < 1e-3] = 0.5   # finite differences away from ReLU's kink
    before = x.copy()
    ctx = Context(keys=noise.row_keys(0, 1, np.arange(4)))
    y = model.forward(x, ctx)
    assert y.shape == (4, 2, 3, 3) and x.tobytes() == before.tobytes()
    assert model.infer(x).shape == (4, 2, 3, 3) and x.tobytes() == before.tobytes()
    R = rng.normal(size=y.shape)
    loss = lambda: float((model.forward(x, ctx) * R).sum())
    model.forward(x, ctx)
    dy = R.copy()
    for layer in reversed(model.layers):   # the model's backward stops at its first
        dy = layer.backward(dy, [], ctx)   # parameters, which this one lacks
    assert_close(dy, numeric_grad(loss, x))


def test_buffers_are_flat_per_dtype_and_go_where_the_parameters_go(monkeypatch):
    """A layer's non-trainable buffers: one flat array per dtype, named beside the
    parameters in the state dict (so checkpoints hold them), loaded and checked like
    them, and never touched by the optimizer or its weight decay."""
    from dpbp.nn import model as factory
    from dpbp.nn.optim import AdamW
    from tests.custom_layer import RowCounter
    monkeypatch.setitem(factory.LAYERS, "rowcounter", RowCounter)
    model = Model([{"type": "linear", "out_features": 4}, {"type": "rowcounter"},
                   {"type": "linear", "out_features": 2}], (3,), np.float32)
    assert [(d.name, a.size) for d, a in model.buffers.items()] == [("int64", 1), ("float32", 1)]
    assert list(model.state_dict())[-2:] == ["model.1.seen", "model.1.rows"]
    assert model.names[-1] == "model.2.bias" and model.params.size == 4 * 3 + 4 + 2 * 4 + 2
    model.init_(np.random.default_rng(0))
    x, y = np.ones((5, 3), np.float32), np.arange(5) % 2
    _, dout = cross_entropy(model.forward(x), y, 5)
    model.backward(dout)
    opt = AdamW(model.params, model.grads, 0.1, (0.9, 0.999), 1e-8, 0.5, False)
    opt.step()
    state = {k: v.copy() for k, v in model.state_dict().items()}
    assert state["model.1.seen"] == 5 and state["model.1.rows"] == 5.0   # no decay
    fresh = Model(model.specs, (3,), np.float32)
    assert fresh.load_state_dict(state, "ckpt") is None
    assert fresh.buffers[np.dtype(np.int64)][0] == 5
    assert fresh.params.tobytes() == model.params.tobytes()
    assert fresh.load_state_dict(dict(state, **{"model.1.seen": np.float64(2.5)}), "ckpt") \
        == "ckpt: model.1.seen has dtype float64, expected integers"
    del state["model.1.rows"]
    assert "ckpt has no model.1.rows" in fresh.load_state_dict(state, "ckpt")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("B", [0, 1, 9])
def test_infer_equals_forward_bit_for_bit(activation, dtype, B):
    model = mlp([5, 7, 6, 3], activation, dtype)
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
    rng = np.random.default_rng(6)
    model = mlp([4, 7, 6, 3], activation, np.float64, dropout=0.3)
    model.init_(rng)
    assert model.names == ["model.0.weight", "model.0.bias", "model.3.weight", "model.3.bias",
                           "model.6.weight", "model.6.bias"]
    B = 6
    x, y = rng.normal(size=(B, 4)), rng.integers(0, 3, size=B)
    ctx = Context(keys=noise.row_keys(0, 3, np.arange(B)))
    loss = lambda: cross_entropy(model.forward(x, ctx), y, B)[0].sum() / B
    _, dout = cross_entropy(model.forward(x, ctx), y, B)
    model.backward(dout, ctx=ctx)
    assert_close(model.grads, numeric_grad(loss, model.params))
    plain = mlp([4, 7, 6, 3], activation, np.float64)   # evaluation: no dropout
    plain.params[...] = model.params
    assert model.infer(x).tobytes() == plain.infer(x).tobytes()


def test_initial_weights_are_torch_linears():
    """model.init_ draws as torch.nn.Linear does: every weight and bias of a layer
    uniform in [-1/sqrt(D_in), 1/sqrt(D_in)] (its fan-in), filling that range."""
    model = mlp([64, 32, 10], "relu", np.float64)
    model.init_(np.random.default_rng(0))
    state = model.state_dict()
    for i, fan_in in ((0, 64), (2, 32)):
        bound = 1 / np.sqrt(fan_in)
        for name, fill in ((f"model.{i}.weight", 0.99), (f"model.{i}.bias", 0.7)):
            a = state[name]
            assert np.abs(a).max() <= bound, name
            assert a.max() > fill * bound and a.min() < -fill * bound, name
