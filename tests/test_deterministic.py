"""GrainSum steps (train.deterministic) in one process: the plain gradient, overflows,
grains cut from the global batch, and the bits of one process at 1 to 4 ranks.

Steps follow the plain gradient to the dtype's precision; grain losses whose sum
overflows stop the step. Each rank's grains are those of the global batch, whatever the
world size (a property test over rows, grains, world size and rank), and steps taken by
2 to 4 ranks (threads of this process, tests/thread_ranks.py) have bit for bit the
parameters and losses of one process, for every grain count from 1 to 8 and batch sizes
that leave every remainder. The arithmetic: test_exact.py; whole runs at 1 to 4 ranks:
test_reproducibility.py; every step on real ranks: tests/mpi/test_deterministic_mpi.py.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from threadpoolctl import threadpool_limits

from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.optim import SGD
from dpbp.parallel.comm import Comm
from dpbp.parallel.step import train_step
from dpbp.service.config import TrainConfig
from dpbp.service.startup import gradient_sum
from tests.conftest import mlp, small_model
from tests.thread_ranks import ThreadComm, World, run_ranks


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


# ----------------------------------------------------------------------------- across world sizes

def grains_of(N, grains, comm):
    """The rows of a global batch of N rows that this rank's grains cover, in the order
    it backpropagates them: [(start, stop), ...] in the batch."""
    summed = gradient_sum(TrainConfig(deterministic=True, grains=grains), comm, small_model())
    shard = summed.rows(N)
    (rows, segments, grads), = summed.passes(N)
    assert rows == slice(0, shard.stop - shard.start) and len(grads) == len(segments)
    parts = [(shard.start + s.start, shard.start + s.stop) for s in segments]
    assert all(shard.start <= a <= b <= shard.stop for a, b in parts)   # within the shard
    return parts


@settings(max_examples=400, deadline=None, derandomize=True)
@given(N=st.integers(0, 70), grains=st.integers(1, 8), size=st.integers(1, 4))
def test_each_ranks_grains_are_cut_from_the_global_batch(N, grains, size):
    """Whatever the world size, rank r's grains are grains of one process, a run of them
    in order: over the ranks, in rank order, they are exactly one process's grains."""
    alone = grains_of(N, grains, Comm(None))
    assert len(alone) == grains
    ranks = [grains_of(N, grains, ThreadComm(World(size), r)) for r in range(size)]
    assert [g for mine in ranks for g in mine] == alone


def steps(comm, grains, batches, x, y):
    """SGD steps with GrainSum over `batches` (global batches of row indices): the final
    parameters and every step's loss."""
    model = small_model((x.shape[1], 6, 3))
    opt = SGD(model.params, model.grads, lr=0.3, momentum=0.9)
    summed = gradient_sum(TrainConfig(deterministic=True, grains=grains), comm, model)
    losses = []
    for batch in batches:
        rows = batch[summed.rows(len(batch))]
        loss, ok = train_step(model, opt, cross_entropy, x[rows], y[rows], len(batch), summed)
        assert ok
        losses.append(loss)
    return model.params.tobytes(), losses


@pytest.mark.parametrize("size", [2, 3, 4])
def test_steps_at_any_world_size_have_the_bits_of_one_process(size):
    """Batch sizes 1 to 2 x 8 + 1 leave every remainder against every grain count and
    world size; the parameters and every step's loss are one process's, bit for bit."""
    rng = np.random.default_rng(size)
    x, y = rng.normal(size=(17, 5)).astype(np.float32), rng.integers(0, 3, size=17)
    batches = [rng.permutation(17)[:n] for n in range(1, 18)]
    with threadpool_limits(1, user_api="blas"):   # as train.deterministic sets it
        for grains in range(1, 9):
            one = steps(Comm(None), grains, batches, x, y)
            many, _ = run_ranks(size, lambda comm: steps(comm, grains, batches, x, y))
            assert all(m == one for m in many), (grains, size)


def test_a_gradient_too_large_for_any_grid_stops_the_step():
    """float32, finite losses (float64) but a gradient of 1e38, near float32's largest:
    no grid lets the grains add up exactly, so the step stops as on a NaN, changing
    nothing."""
    model = small_model((2, 1))
    model.params[...] = 0                       # outputs 0, whatever the inputs
    before = model.params.copy()
    opt = SGD(model.params, model.grads, lr=0.1)
    x, targets = np.full((2, 2), 1e21, np.float32), np.full((2, 1), 1e17, np.float32)
    tc = TrainConfig(deterministic=True, grains=2, loss="mse")
    with np.errstate(over="ignore"):
        loss, ok = train_step(model, opt, mse, x, targets, 2, gradient_sum(tc, Comm(None), model))
    assert not ok and loss == math.inf
    assert model.params.tobytes() == before.tobytes()
