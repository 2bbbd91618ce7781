"""Convolution, pooling and Flatten (dpbp/nn/conv.py): against naive references written
here with loops, by finite differences in float64 (away from ties), the gradient of max
pooling on ties, the memory layout a layer hands the next, and blocks counted from the
first row a layer is given. Against torch.nn itself: tests/test_torch_reference.py."""

import numpy as np
import pytest

from dpbp.nn import conv, noise
from dpbp.nn.conv import AvgPool2d, Conv2d, Flatten, MaxPool2d
from dpbp.nn.layers import ALONE, Context, Dropout, is_channels_last
from dpbp.nn.model import Model
from tests.conftest import assert_close, numeric_grad

# ----------------------------------------------------------------------------- references, in loops


def padded(x, padding, fill=0.0):
    (ph, pw), (B, C, H, W) = padding, x.shape
    out = np.full((B, C, H + 2 * ph, W + 2 * pw), fill)
    out[:, :, ph:ph + H, pw:pw + W] = x
    return out


def out_hw(x, kernel, stride, padding):
    return [(n + 2 * p - k) // s + 1 for n, k, s, p in zip(x.shape[2:], kernel, stride, padding)]


def conv_reference(x, W, b, stride, padding, dy):
    """y, and for the gradient dy of y: dx, dW, db; one output pixel at a time."""
    xp, (kh, kw), (sh, sw) = padded(x, padding), W.shape[2:], stride
    Ho, Wo = out_hw(x, (kh, kw), stride, padding)
    y = np.zeros((len(x), len(W), Ho, Wo))
    dxp, dW = np.zeros_like(xp), np.zeros_like(W)
    for p in range(Ho):
        for q in range(Wo):
            patch = xp[:, :, p * sh:p * sh + kh, q * sw:q * sw + kw]   # (B, C, kh, kw)
            y[:, :, p, q] = np.einsum("bcij,ocij->bo", patch, W) + (0 if b is None else b)
            dW += np.einsum("bo,bcij->ocij", dy[:, :, p, q], patch)
            dxp[:, :, p * sh:p * sh + kh, q * sw:q * sw + kw] += \
                np.einsum("bo,ocij->bcij", dy[:, :, p, q], W)
    (ph, pw), (H, Wd) = padding, x.shape[2:]
    return y, dxp[:, :, ph:ph + H, pw:pw + Wd], dW, dy.sum(axis=(0, 2, 3))


def pool_reference(x, kernel, stride, padding, dy, kind):
    """y, and dx for dy: the mean of each window (zeros of the padding counted), or its
    largest element, the gradient going to the first largest in row-major order."""
    xp = padded(x, padding, 0.0 if kind == "avg" else -np.inf)
    (kh, kw), (sh, sw) = kernel, stride
    Ho, Wo = out_hw(x, kernel, stride, padding)
    y, dxp = np.zeros((*x.shape[:2], Ho, Wo)), np.zeros_like(xp)
    for b, c, p, q in np.ndindex(y.shape):
        window = xp[b, c, p * sh:p * sh + kh, q * sw:q * sw + kw]
        if kind == "avg":
            y[b, c, p, q] = window.sum() / (kh * kw)
            dxp[b, c, p * sh:p * sh + kh, q * sw:q * sw + kw] += dy[b, c, p, q] / (kh * kw)
        else:
            i, j = np.unravel_index(np.argmax(window), window.shape)   # the first largest
            y[b, c, p, q] = window[i, j]
            dxp[b, c, p * sh + i, q * sw + j] += dy[b, c, p, q]
    (ph, pw), (H, W) = padding, x.shape[2:]
    return y, dxp[:, :, ph:ph + H, pw:pw + W]


def placed(layer, input_grad=True):
    layer.place(1, input_grad=input_grad, input_free=False)
    return layer


def conv_layer(C, C_out, kernel, stride, padding, bias, rng):
    layer = placed(Conv2d(C_out, kernel, stride, padding, bias))
    declared = layer.declare((C, 9, 9))
    params = [rng.normal(size=shape) for _, shape in declared.params]
    layer.bind(params, [])
    return layer, params


CONVS = [   # (C, C_out, kernel_size, stride, padding, bias)
    (1, 2, 3, 1, 1, True), (3, 2, 1, 1, 0, False), (2, 3, [2, 3], [2, 1], [0, 1], True),
    (2, 2, 3, 2, 2, True)]


# ----------------------------------------------------------------------------- against them

@pytest.mark.parametrize("C,C_out,kernel,stride,padding,bias", CONVS)
@pytest.mark.parametrize("B", [0, 1, 3, conv.BLOCK + 3])   # across a block's end too
def test_conv2d_matches_the_reference(B, C, C_out, kernel, stride, padding, bias):
    rng = np.random.default_rng(B)
    layer, params = conv_layer(C, C_out, kernel, stride, padding, bias, rng)
    x = rng.normal(size=(B, C, 7, 8))
    y = layer.forward(x, ALONE)
    dy = rng.normal(size=y.shape)
    ref = conv_reference(x, params[0], params[1] if bias else None, layer.stride,
                         layer.padding, dy)
    grads = [np.full_like(p, np.nan) for p in params]   # overwritten, not added to
    dx = layer.backward(dy.copy(), [grads], ALONE)
    np.testing.assert_allclose(y, ref[0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(dx, ref[1], rtol=0, atol=1e-12)
    np.testing.assert_allclose(grads[0], ref[2], rtol=0, atol=1e-11)
    if bias:
        np.testing.assert_allclose(grads[1], ref[3], rtol=0, atol=1e-11)
    assert y.shape == ref[0].shape and layer.declare(x.shape[1:]).out == y.shape[1:]


POOLS = [(2, None, 0), (3, 2, 1), ([2, 3], [1, 2], [1, 0]), (2, 1, 0)]   # kernel, stride, padding


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("kernel,stride,padding", POOLS)
@pytest.mark.parametrize("B", [0, 2, 5])
def test_pooling_matches_the_reference(kind, kernel, stride, padding, B):
    """With ties everywhere (rounded values, and ReLU's zeros), max pooling's gradient
    goes to one element per window, the first largest in row-major order."""
    rng = np.random.default_rng(3)
    x = np.maximum(np.round(rng.normal(size=(B, 3, 7, 6)), 1), 0)   # ties in most windows
    layer = placed((MaxPool2d if kind == "max" else AvgPool2d)(kernel, stride, padding))
    y = layer.forward(x, ALONE)
    dy = rng.normal(size=y.shape)
    ref_y, ref_dx = pool_reference(x, layer.kernel, layer.stride, layer.padding, dy, kind)
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-15)
    np.testing.assert_allclose(layer.backward(dy.copy(), [], ALONE), ref_dx, rtol=0, atol=1e-15)


def test_flatten_takes_torchs_order_from_channels_last_memory():
    x = np.random.default_rng(0).normal(size=(4, 2, 3, 5))
    last = np.ascontiguousarray(conv.channels_last(x))    # (B, H, W, C) memory
    layer = placed(Flatten())
    y = layer.forward(conv.images(last), ALONE)
    assert y.tobytes() == x.reshape(4, 30).tobytes()      # c * H W + h * W + w
    dx = layer.backward(y.copy() * 2, [], ALONE)
    assert is_channels_last(dx) and np.array_equal(dx, 2 * x)
    assert np.array_equal(layer.infer(conv.images(last)), y)
    assert layer.declare((2, 3, 5)).out == (30,)


# ----------------------------------------------------------------------------- finite differences

@pytest.mark.parametrize("C,C_out,kernel,stride,padding,bias", CONVS)
def test_conv2d_gradient_by_finite_differences(C, C_out, kernel, stride, padding, bias):
    rng = np.random.default_rng(4)
    layer, params = conv_layer(C, C_out, kernel, stride, padding, bias, rng)
    x = rng.normal(size=(2, C, 5, 6))
    R = rng.normal(size=layer.forward(x, ALONE).shape)
    loss = lambda: float((layer.forward(x, ALONE) * R).sum())   # dloss/dy = R
    layer.forward(x, ALONE)
    grads = [np.zeros_like(p) for p in params]
    assert_close(layer.backward(R.copy(), [grads], ALONE), numeric_grad(loss, x))
    for g, p in zip(grads, params):
        assert_close(g, numeric_grad(loss, p))


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
@pytest.mark.parametrize("kernel,stride,padding", POOLS)
def test_pooling_gradient_by_finite_differences(cls, kernel, stride, padding):
    """Distinct values a step of 0.01 apart: no ties within the differences' reach."""
    rng = np.random.default_rng(5)
    x = rng.permutation(2 * 2 * 5 * 6).reshape(2, 2, 5, 6) * 0.01
    layer = placed(cls(kernel, stride, padding))
    R = rng.normal(size=layer.forward(x, ALONE).shape)
    loss = lambda: float((layer.forward(x, ALONE) * R).sum())
    layer.forward(x, ALONE)
    assert_close(layer.backward(R.copy(), [], ALONE), numeric_grad(loss, x, eps=1e-4))


# ----------------------------------------------------------------------------- in a network

CNN = [{"type": "conv2d", "out_channels": 4, "kernel_size": 3, "padding": 1},
       {"type": "relu"},
       {"type": "maxpool2d", "kernel_size": 2},
       {"type": "conv2d", "out_channels": 3, "kernel_size": 2, "stride": 1},
       {"type": "tanh"},
       {"type": "avgpool2d", "kernel_size": 2, "stride": 1, "padding": 1},
       {"type": "dropout", "p": 0.3},
       {"type": "flatten"},
       {"type": "linear", "out_features": 3}]


def cnn(dtype=np.float64, specs=CNN, shape=(2, 8, 8)):
    model = Model(specs, shape, dtype)
    model.init_(np.random.default_rng(1))
    return model


def test_a_cnns_gradient_through_the_flat_buffer():
    """Every parameter of a CNN with both poolings and dropout, by finite differences."""
    model, rng = cnn(), np.random.default_rng(2)
    x = rng.normal(size=(3, 2, 8, 8))
    ctx = Context(keys=noise.row_keys(0, 1, np.arange(3)))
    R = rng.normal(size=(3, 3))
    loss = lambda: float((model.forward(x, ctx) * R).sum())
    model.forward(x, ctx)
    model.backward(R.copy(), ctx=ctx)
    assert_close(model.grads, numeric_grad(loss, model.params))
    assert model.names == ["model.0.weight", "model.0.bias", "model.3.weight", "model.3.bias",
                           "model.8.weight", "model.8.bias"]
    assert [a.shape for a in model.arrays] == [(4, 2, 3, 3), (4,), (3, 4, 2, 2), (3,),
                                                (3, 48), (3,)]


def test_activations_work_in_place_on_channels_last_memory():
    """A convolution's output is a (B, C, H, W) view of channels-last memory that its
    backward never reads: the ReLU after it works there in place, its mask laid out
    alike; the max pooling after it gets and gives channels-last images, and so does
    the backward of Flatten."""
    model, x = cnn(), np.random.default_rng(3).normal(size=(5, 2, 8, 8))
    conv1, relu, pool = model.layers[:3]
    given = x.copy()
    model.forward(given, Context(keys=noise.row_keys(0, 1, np.arange(5))))
    assert np.array_equal(given, x)                          # the data are never written
    assert relu.input_free and np.shares_memory(relu.mask, relu.positive)
    y = relu.forward(conv1.forward(x, ALONE), ALONE)
    assert np.shares_memory(y, conv1.y) and is_channels_last(y)
    assert is_channels_last(relu.mask) and is_channels_last(pool.forward(y, ALONE))
    assert not model.layers[2].output_free and model.layers[5].output_free


def test_infer_gives_forwards_bits_and_float32_stays_float32():
    for dtype in (np.float32, np.float64):
        model = cnn(dtype, [s for s in CNN if s["type"] != "dropout"])
        x = np.random.default_rng(4).normal(size=(37, 2, 8, 8)).astype(dtype)
        y = model.forward(x)
        assert y.dtype == dtype and model.infer(x).tobytes() == y.tobytes()


def test_dropout_masks_images_in_torchs_unit_order_in_any_layout():
    """Unit u of a (C, H, W) row is its index in torch's flattening; channels-last memory
    gets the same mask as C order."""
    x = np.random.default_rng(5).normal(size=(4, 3, 2, 5))
    last = conv.images(np.ascontiguousarray(conv.channels_last(x)))
    keys = noise.row_keys(0, 2, np.arange(4))
    outs = []
    for rows in (x, last, x.reshape(4, 30)):
        layer = placed(Dropout(0.5))
        outs.append(layer.forward(rows, Context(keys=keys)).reshape(4, 30).copy())
    assert outs[0].tobytes() == outs[1].tobytes() == outs[2].tobytes()


def test_blocks_are_counted_from_the_first_row_a_layer_is_given(sensitive):
    """With products whose bits depend on their row count (tests/sensitive.py), the
    convolutions give the rows of a part of a batch that starts at a block's start the
    bits of those rows in the whole batch, forward and in evaluation, where they make
    whole blocks there too (a short last block computes other bits, and so would a
    Linear's one product over all rows: the bitwise claims rest on every rank computing
    the same grains, the same evaluation blocks)."""
    model = cnn(np.float64, [s for s in CNN if s["type"] not in ("dropout", "linear")])
    x = np.random.default_rng(6).normal(size=(4 * conv.BLOCK + 5, 2, 8, 8))
    whole = model.forward(x).copy()
    B = conv.BLOCK
    for part in (slice(B, 3 * B), slice(2 * B, None)):   # whole blocks, and the batch's end
        assert model.forward(x[part]).tobytes() == whole[part].tobytes()
        assert model.infer(x[part]).tobytes() == whole[part].tobytes()
    head = model.forward(x[:B + 2])   # its first block is the whole batch's; not its last
    assert head[:B].tobytes() == whole[:B].tobytes()
    assert head[B:].tobytes() != whole[B:B + 2].tobytes()


def test_a_convolutions_scratch_is_bounded_whatever_the_batch():
    """Scratch (Layer.scratch_bytes, which dpbp.bench reports) is a few blocks: the same
    after a step of 2 rows as of 20 blocks' worth, and counted."""
    layer = placed(Conv2d(3, 3, padding=1))
    layer.bind([np.ones((3, 2, 3, 3)), np.ones(3)], [])
    used = []
    for B in (2, 20 * conv.BLOCK, 2):
        x = np.ones((B, 2, 6, 6))
        grads = [np.empty((3, 2, 3, 3)), np.empty(3)]
        layer.backward(np.ones_like(layer.forward(x, ALONE)), [grads], ALONE)
        used.append(layer.scratch_bytes())
    assert used[0] > 0 and used[0] == used[1] == used[2]
    assert Flatten().scratch_bytes() == 0


@pytest.mark.parametrize("spec,shape,words", [
    ({"type": "conv2d", "out_channels": 2, "kernel_size": 5}, (1, 4, 4),
     "layer 0 (conv2d): its kernel 5x5 is larger than its input 4x4 (rows of shape (1, 4, 4))"),
    ({"type": "conv2d", "out_channels": 2, "kernel_size": 7, "padding": 1}, (1, 4, 4),
     "its kernel 7x7 is larger than its input 4x4 padded to 6x6"),
    ({"type": "maxpool2d", "kernel_size": 3}, (2, 2, 8),
     "layer 0 (maxpool2d): its kernel 3x3 is larger than its input 2x8"),
    ({"type": "conv2d", "out_channels": 2, "kernel_size": 3}, (64,),
     "layer 0 (conv2d): conv2d takes rows of images (C, H, W), got rows of shape (64,)"),
    ({"type": "avgpool2d", "kernel_size": 2, "padding": 2}, (1, 8, 8),
     "layer 0 (avgpool2d): padding [2, 2] is more than half the kernel [2, 2]"),
    ({"type": "conv2d", "out_channels": 2, "kernel_size": [3]}, (1, 8, 8),
     "kernel_size must be an integer or a pair of integers, got [3]"),
    ({"type": "conv2d", "out_channels": 2, "kernel_size": 3, "stride": 0}, (1, 8, 8),
     "kernel_size and stride must be >= 1, padding >= 0"),
    ({"type": "conv2d", "out_channels": 2, "kernel_size": 3, "bias": 1}, (1, 8, 8),
     "bias must be true or false, got 1"),
])
def test_image_layers_that_do_not_fit_are_named_with_their_shapes(spec, shape, words):
    with pytest.raises(ValueError) as e:
        Model([spec], shape, np.float32)
    assert words in str(e.value)


def test_flops_count_what_the_layers_compute():
    model = Model(CNN[:4], (2, 8, 8), np.float32)   # conv (first: no dx), relu, pool, conv
    first = (2 + 2) * 2 * 9 * 4 * 64 + 2 * 4 * 64
    second = (2 + 2 + 2) * 4 * 4 * 3 * 9 + 2 * 3 * 9
    assert model.flops_per_sample == first + 2 * 4 * 64 + (3 + 8) * 4 * 16 + second
