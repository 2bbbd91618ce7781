"""train.deterministic on real ranks (run by tests/test_mpi_suite.py at 2 and 3 ranks):
every step gives bit for bit the parameters of one process, with uneven grains, empty
grains and ranks that hold no grain."""

import math

import numpy as np
import pytest

from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.optim import SGD
from dpbp.parallel import comm as mpi
from dpbp.parallel import sharding
from dpbp.parallel.deterministic import GrainSum
from dpbp.parallel.step import train_step
from dpbp.parallel.threads import limit_blas_threads
from tests.conftest import mlp

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    c = mpi.init()
    limit_blas_threads(c.ranks_sharing_cores, single=True)
    return c


def run(comm, dtype, loss_fn, grains, batches, x, y):
    """Steps over `batches` (arrays of row indices) under train.deterministic; returns the
    parameters and every step's loss sum."""
    model = mlp([x.shape[1], 12, 8, 5], "tanh", dtype)
    model.init_(np.random.default_rng(1))
    opt = SGD(model.params, model.grads, lr=0.2, momentum=0.9, weight_decay=0.01)
    summed = GrainSum(comm, model, grains)
    losses = []
    for batch in batches:
        rows = batch[sharding.batch_shard(len(batch), comm.rank, comm.size, grains)]
        loss, ok = train_step(model, opt, loss_fn, x[rows], y[rows], len(batch), summed,
                              clip_norm=5.0)
        assert ok
        losses.append(loss)
    return model.params, losses


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("grains", [1, 2, 4, 5])
@pytest.mark.parametrize("loss_fn", [cross_entropy, mse])
def test_every_step_has_the_bits_of_one_process(comm, dtype, grains, loss_fn):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(46, 9)).astype(dtype), rng.integers(0, 5, size=46)
    batches = sharding.global_batches(rng.permutation(46), 16)   # 16, 16, 14 rows
    batches += [np.arange(3), np.arange(1)]   # fewer rows than grains: empty grains
    many, many_losses = run(comm, dtype, loss_fn, grains, batches, x, y)
    one, one_losses = run(mpi.Comm(None), dtype, loss_fn, grains, batches, x, y)
    assert many.tobytes() == one.tobytes()
    assert many_losses == one_losses
    assert comm.replicas_identical(many)


def test_a_nan_in_one_grain_stops_the_step_on_every_rank(comm):
    model = mlp([3, 4, 2], "relu", np.float32)
    model.init_(np.random.default_rng(2))
    before = model.params.copy()
    opt = SGD(model.params, model.grads, lr=0.1)
    x, y = np.ones((8, 3), np.float32), np.zeros(8, int)
    x[7, 0] = np.nan                                   # grain 3: the last rank's
    rows = sharding.batch_shard(8, comm.rank, comm.size, 4)
    with np.errstate(invalid="ignore", over="ignore"):
        loss, ok = train_step(model, opt, cross_entropy, x[rows], y[rows], 8,
                              GrainSum(comm, model, 4))
    assert not ok and math.isinf(loss)
    assert model.params.tobytes() == before.tobytes()   # no rank updated


def test_the_batch_sum_is_exact_and_alike_on_every_rank(comm):
    """GrainSum.batch_sum, which layers receive: each rank hands one partial per grain it
    holds (2 each here); floats add up to math.fsum of every grain's values (one
    rounding, whatever the order: any order of plain additions misses 1e16 + 2 in one of
    the first two), integers as integers."""
    parts = np.array([[[1e16, 1.0, 1.0][g % 3], [1.0, 1.0, 1e16][g % 3], -(g + 0.5)]
                      for g in range(2 * comm.size)])
    summed = GrainSum(comm, mlp([2, 2]), 2 * comm.size)
    total = summed.batch_sum(parts[2 * comm.rank:2 * comm.rank + 2])
    assert total.tolist() == [math.fsum(parts[:, i]) for i in range(3)]
    assert comm.replicas_identical(total)
    counts = summed.batch_sum(np.array([[comm.rank + 1], [1]], dtype=np.int64))
    assert counts.dtype == np.int64 and counts[0] == comm.size * (comm.size + 3) // 2
