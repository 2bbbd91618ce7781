"""batchnorm1d and batchnorm2d: against a numpy reference of BatchNorm on the whole global
batch and finite differences (float64), against torch where installed, N ranks against
one process (threads of this process, tests/thread_ranks.py: uneven shards, a rank with
no rows), the bits of train.deterministic at 1 to 4 ranks with products whose bits
depend on their row count (tests/sensitive.py), a skipped step, a constant channel and
the float32 variance. Whole runs under mpirun, resume and start-up: test_batchnorm_runs.py.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dpbp.nn.layers import Context
from dpbp.nn.losses import cross_entropy
from dpbp.nn.model import Model
from dpbp.nn.optim import SGD
from dpbp.parallel.comm import Comm
from dpbp.parallel.step import train_step
from dpbp.service.config import TrainConfig
from dpbp.service.startup import gradient_sum
from tests.conftest import assert_close, numeric_grad
from tests.thread_ranks import run_ranks

NET = [{"type": "conv2d", "out_channels": 3, "kernel_size": 3, "padding": 1},
       {"type": "batchnorm2d", "momentum": 0.2},
       {"type": "relu"},
       {"type": "maxpool2d", "kernel_size": 2},
       {"type": "flatten"},
       {"type": "linear", "out_features": 5},
       {"type": "batchnorm1d", "momentum": "cumulative", "eps": 1e-3},
       {"type": "tanh"},
       {"type": "linear", "out_features": 3}]


def reference(x, weight, bias, eps):
    """BatchNorm of the whole batch x (N, C, ...), written out in numpy: (y, the mean, the
    biased variance), the statistics over every axis but the channels'."""
    axes = (0,) + tuple(range(2, x.ndim))
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean, var = x.mean(axis=axes), x.var(axis=axes)
    y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps)
    return y * weight.reshape(shape) + bias.reshape(shape), mean, var


def layer_of(kind, shape, **arguments):
    model = Model([{"type": kind, **arguments}], shape, np.float64)
    model.init_(None)
    return model, model.layers[0]


@pytest.mark.parametrize("kind,shape", [("batchnorm1d", (4,)), ("batchnorm2d", (3, 2, 3))])
def test_the_whole_batch_statistics_and_finite_differences(kind, shape):
    """Forward is the reference's, running statistics move by momentum with the unbiased
    variance; dx, dweight and dbias are the finite differences of the normalised loss."""
    rng = np.random.default_rng(1)
    model, layer = layer_of(kind, shape, momentum=0.25, eps=1e-4)
    model.params[...] = rng.normal(size=model.params.size)
    x, R = rng.normal(size=(5, *shape)) * 2 + 3, rng.normal(size=(5, *shape))
    y = model.forward(x.copy())
    ref, mean, var = reference(x, layer.gamma, layer.beta, 1e-4)
    np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12)
    M = x.size / shape[0]
    np.testing.assert_allclose(layer.running_mean, 0.25 * mean, rtol=0, atol=1e-14)
    np.testing.assert_allclose(layer.running_var, 0.75 + 0.25 * var * M / (M - 1), rtol=1e-14)
    assert layer.tracked == 1
    np.testing.assert_allclose(model.infer(x), reference(x, layer.gamma, layer.beta, 1e-4)[0]
                               * 0 + (x - layer.channel(layer.running_mean))
                               / np.sqrt(layer.channel(layer.running_var) + 1e-4)
                               * layer.channel(layer.gamma) + layer.channel(layer.beta),
                               rtol=0, atol=1e-12)
    loss = lambda: float((reference(x, layer.gamma, layer.beta, 1e-4)[0] * R).sum())
    model.forward(x.copy())
    grads = np.zeros_like(model.params)
    layer.place(1, input_grad=True, input_free=False)
    dx = layer.backward(R.copy(), [model.split(grads)], Context())
    assert_close(dx, numeric_grad(loss, x))
    assert_close(grads, numeric_grad(loss, model.params))


def test_float32_variance_of_a_channel_far_from_zero():
    """A channel of mean 1000 and spread 0.01 in float32: the two-pass variance keeps
    3 digits, where sum x^2 / M - mean^2 would keep none."""
    rng = np.random.default_rng(2)
    x = (1000 + 0.01 * rng.normal(size=(64, 2))).astype(np.float32)
    model = Model([{"type": "batchnorm1d", "momentum": 1.0}], (2,), np.float32)
    model.init_(None)
    model.forward(x.copy())
    exact = x.astype(np.float64).var(axis=0, ddof=1)
    np.testing.assert_allclose(model.layers[0].running_var, exact, rtol=1e-3)


def test_a_constant_channel_gives_its_bias_and_passes_the_gradient_on():
    """Zero variance, as torch: x_hat = 0, so y = bias; dx = weight / sqrt(eps) (dy - its
    mean)."""
    model, layer = layer_of("batchnorm1d", (2,))
    model.params[...] = [2.0, 3.0, 0.5, -1.0]   # weight, bias
    x = np.array([[7.0, 1.0], [7.0, 2.0], [7.0, 4.0]])
    y = model.forward(x.copy())
    assert (y[:, 0] == 0.5).all() and layer.running_var[0] == 0.9
    layer.place(1, input_grad=True, input_free=False)
    dy = np.array([[1.0, 0.0], [2.0, 0.0], [6.0, 0.0]])
    dx = layer.backward(dy.copy(), [model.split(np.zeros(4))], Context())
    np.testing.assert_allclose(dx[:, 0], 2 / np.sqrt(1e-5) * (dy[:, 0] - 3), rtol=1e-12)


# ----------------------------------------------------------------------------- torch

@pytest.mark.parametrize("kind,shape,momentum", [("batchnorm1d", (3,), 0.1),
                                                 ("batchnorm2d", (2, 3, 3), "cumulative")])
def test_torch_gives_the_same_steps_buffers_and_evaluation(kind, shape, momentum):
    """Three training passes, one channel constant; then eval mode. The state dict loads
    into torch.nn.Sequential by its names."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(3)
    model, layer = layer_of(kind, shape, momentum=momentum)
    model.params[...] = rng.normal(size=model.params.size)
    layer.place(1, input_grad=True, input_free=False)
    net = torch.nn.Sequential((torch.nn.BatchNorm1d if kind == "batchnorm1d" else
                               torch.nn.BatchNorm2d)(shape[0], momentum=None if momentum ==
                                                     "cumulative" else momentum)).double()
    net.load_state_dict({k.removeprefix("model."): torch.from_numpy(np.array(v))
                         for k, v in model.state_dict().items()})
    for step in range(3):
        x = rng.normal(size=(4, *shape)) * (step + 1) + step
        x[:, 0] = 1.5                               # zero variance
        dy = rng.normal(size=x.shape)
        xt = torch.from_numpy(x.copy()).requires_grad_()
        net.zero_grad()
        yt = net(xt)
        yt.backward(torch.from_numpy(dy))
        np.testing.assert_allclose(model.forward(x.copy()), yt.detach().numpy(), atol=1e-12)
        grads = np.zeros_like(model.params)
        dx = layer.backward(dy.copy(), [model.split(grads)], Context())
        np.testing.assert_allclose(dx, xt.grad.numpy(), atol=1e-10)
        np.testing.assert_allclose(grads, np.concatenate([net[0].weight.grad.numpy(),
                                                          net[0].bias.grad.numpy()]), atol=1e-12)
    theirs = net.state_dict()
    for name, mine in model.state_dict().items():
        np.testing.assert_allclose(mine, theirs[name.removeprefix("model.")].numpy(),
                                   rtol=1e-14, err_msg=name)
    loaded, _ = layer_of(kind, shape)                       # and back, as model.init loads
    assert loaded.load_state_dict({f"model.{k}": v.numpy() for k, v in theirs.items()},
                                  "torch") is None
    assert loaded.buffers[np.dtype(np.int64)] == 3
    net.eval()
    x = rng.normal(size=(6, *shape))
    np.testing.assert_allclose(model.infer(x), net(torch.from_numpy(x)).detach().numpy(),
                               atol=1e-12)


# ----------------------------------------------------------------------------- across ranks

def steps(comm, tc, batches, x, y, dtype):
    """SGD steps of NET on global batches of row indices: (parameters, buffers, losses)."""
    model = Model(NET, x.shape[1:], dtype)
    model.init_(np.random.default_rng(4))
    opt = SGD(model.params, model.grads, lr=0.2, momentum=0.9)
    summed, losses = gradient_sum(tc, comm, model), []
    for batch in batches:
        rows = batch[summed.rows(len(batch))]
        loss, ok = train_step(model, opt, cross_entropy, x[rows].astype(dtype), y[rows],
                              len(batch), summed)
        assert ok
        losses.append(summed.epoch_loss(loss))
    return model.params.copy(), {d: b.copy() for d, b in model.buffers.items()}, losses


def data(n):
    rng = np.random.default_rng(n)
    return rng.normal(size=(n, 1, 4, 4)), rng.integers(0, 3, size=n)


@pytest.mark.parametrize("size", [2, 3])
def test_n_ranks_match_one_process_in_float64(size):
    """Global batches of 7, 5 and 2 rows: uneven shards, and at 3 ranks a rank with no
    rows; weights, running statistics and losses agree to 1e-10."""
    x, y = data(14)
    batches = [np.arange(0, 7), np.arange(7, 12), np.arange(12, 14)]
    one = steps(Comm(None), TrainConfig(), batches, x, y, np.float64)
    many, _ = run_ranks(size, lambda comm: steps(comm, TrainConfig(), batches, x, y,
                                                 np.float64))
    for params, buffers, losses in many:
        np.testing.assert_allclose(params, one[0], rtol=0, atol=1e-10)
        np.testing.assert_allclose(buffers[np.dtype(np.float64)],
                                   one[1][np.dtype(np.float64)], rtol=0, atol=1e-10)
        assert (buffers[np.dtype(np.int64)] == 3).all()
        np.testing.assert_allclose(losses, one[2], rtol=1e-12)
    assert np.abs(one[1][np.dtype(np.float64)]).max() > 0.1   # the statistics moved


@pytest.mark.parametrize("size", [2, 3, 4])
def test_deterministic_bits_at_any_world_size(size, sensitive):
    """float32, products whose bits depend on their row count: batches of 2 to 9 rows,
    1 to 5 grains (empty grains, ranks without grains), the bits of one process:
    parameters, running statistics, losses."""
    x, y = data(9)
    batches = [np.random.default_rng(n).permutation(9)[:n] for n in range(2, 10)]
    with threadpool_limits(1, user_api="blas"):
        for grains in (1, 2, 3, 5):
            tc = TrainConfig(deterministic=True, grains=grains)
            one = steps(Comm(None), tc, batches, x, y, np.float32)
            many, _ = run_ranks(size, lambda comm: steps(comm, tc, batches, x, y, np.float32))
            for params, buffers, losses in many:
                assert params.tobytes() == one[0].tobytes(), (grains, size)
                assert all(buffers[d].tobytes() == one[1][d].tobytes() for d in buffers)
                assert losses == one[2]


def test_a_skipped_step_leaves_the_running_statistics():
    """A NaN label row's loss is non-finite: no update, and the running statistics and
    num_batches_tracked are as before the step."""
    x, y = data(6)
    model = Model(NET, x.shape[1:], np.float64)
    model.init_(np.random.default_rng(4))
    opt = SGD(model.params, model.grads, lr=0.2)
    summed = gradient_sum(TrainConfig(), Comm(None), model)
    assert train_step(model, opt, cross_entropy, x, y, 6, summed)[1]
    before = {d: b.copy() for d, b in model.buffers.items()}
    x[2, 0, 1, 1] = np.nan
    assert not train_step(model, opt, cross_entropy, x, y, 6, summed)[1]
    assert all(before[d].tobytes() == b.tobytes() for d, b in model.buffers.items())
