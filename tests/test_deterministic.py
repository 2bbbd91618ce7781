"""GrainSum steps (train.deterministic) in one process: the plain gradient, overflows.

Steps follow the plain gradient to the dtype's precision; grain losses whose sum
overflows stop the step. The arithmetic: test_exact.py; whole runs at 1 to 4 ranks:
test_reproducibility.py; every step on real ranks: tests/mpi/test_deterministic_mpi.py.
"""

import math

import numpy as np
import pytest

from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.optim import SGD
from dpbp.parallel.comm import Comm
from dpbp.parallel.step import train_step
from dpbp.service.config import TrainConfig
from dpbp.service.startup import gradient_sum
from tests.conftest import mlp


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_deterministic_steps_follow_the_plain_gradient(dtype, tol):
    """The rounding of the grains only moves a step at the last bits: after ten steps the
    parameters agree with plain training to about the dtype's precision."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(64, 7)).astype(dtype), rng.integers(0, 4, size=64)

    def run(tc):
        model = mlp([7, 16, 4], "tanh", dtype)
        model.init_(np.random.default_rng(6))
        opt = SGD(model.params, model.grads, lr=0.1, momentum=0.9)
        summed = gradient_sum(tc, Comm(None), model)
        for _ in range(10):
            assert train_step(model, opt, cross_entropy, x, y, 64, summed)[1]
        return model.params

    plain = run(TrainConfig())
    for grains in (1, 3, 8):
        np.testing.assert_allclose(run(TrainConfig(deterministic=True, grains=grains)),
                                   plain, rtol=0, atol=tol)


def test_grain_losses_whose_sum_overflows_make_a_non_finite_step():
    """Two grains, each with a finite loss near the float64 maximum: their sum is not
    finite, which stops the step as a NaN would, instead of raising."""
    model = mlp([2, 1], "relu", np.float64)
    model.init_(np.random.default_rng(0))
    before = model.params.copy()
    opt = SGD(model.params, model.grads, lr=0.1)
    x, targets = np.zeros((2, 2)), np.full((2, 1), 1.3e154)   # each row's loss ~ 1.7e308
    tc = TrainConfig(deterministic=True, grains=2, loss="mse")
    loss, ok = train_step(model, opt, mse, x, targets, 2, gradient_sum(tc, Comm(None), model))
    assert not ok and loss == math.inf
    assert model.params.tobytes() == before.tobytes()
