"""Gradients summed in buckets during backpropagation (comm.overlap) equal the one
blocking Allreduce after it, on real ranks (run by tests/test_mpi_suite.py)."""

import numpy as np
import pytest

from dpbp.nn.losses import cross_entropy
from dpbp.nn.model import MLP
from dpbp.nn.optim import SGD
from dpbp.parallel import comm as mpi
from dpbp.parallel import sharding
from dpbp.service.config import TrainConfig
from dpbp.train import scratch_for, train_step

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    return mpi.init()


def assert_same_sums(comm, got, want):
    """Bit for bit with 2 ranks (a + b == b + a); with more, MPI may add the ranks'
    values in another order for another message size, so to rounding."""
    if comm.size == 2:
        np.testing.assert_array_equal(got, want)
    else:
        tol = 1e-12 if got.dtype == np.float64 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bucket_bytes", [1, 8 * 40, 1 << 20])   # many, some, one bucket
@pytest.mark.parametrize("oversubscribed", [False, True])
def test_buckets_sum_like_one_allreduce(comm, monkeypatch, bucket_bytes, oversubscribed):
    monkeypatch.setattr(mpi, "BUCKET_BYTES", bucket_bytes)
    monkeypatch.setattr(comm, "oversubscribed", oversubscribed)   # the yielding wait...
    monkeypatch.setattr(mpi, "YIELD_MIN_BYTES", 0)                 # ...for any size
    rng = np.random.default_rng(comm.rank)
    values = rng.normal(size=1000)
    want = comm.allreduce_(values.copy())
    got = values.copy()
    for ready in (990, 990, 700, 650, 100, 3, 0):   # as backward steps would report them
        comm.allreduce_ready_(got, ready)
    comm.allreduce_wait()
    assert_same_sums(comm, got, want)
    exact = np.arange(1000.0) * (comm.rank + 1)   # integers: every order sums exactly
    comm.allreduce_ready_(exact, 0)
    comm.allreduce_wait()
    np.testing.assert_array_equal(exact, np.arange(1000.0) * comm.size * (comm.size + 1) / 2)


def test_wait_seconds_add_up(comm):
    before = comm.wait_seconds
    comm.allreduce_(np.ones(10))
    comm.allreduce_ready_(np.ones(10), 0)
    comm.allreduce_wait()
    assert comm.wait_seconds > before


@pytest.mark.parametrize("dtype,micro", [(np.float64, 1), (np.float32, 1), (np.float64, 3)])
def test_train_step_with_overlap_equals_blocking(comm, monkeypatch, dtype, micro):
    """Steps with gradients summed in buckets during backward give the same parameters as
    steps with one Allreduce after it, and as one process; also when the shard is run as
    `micro` micro-batches whose earlier gradients join the buckets."""
    tc = TrainConfig(accumulation_steps=micro)
    monkeypatch.setattr(mpi, "BUCKET_BYTES", 200)   # several buckets, some within a layer's
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(41, 9)).astype(dtype), rng.integers(0, 5, size=41)
    batches = sharding.global_batches(np.arange(41), 16)       # 16, 16, 9 rows
    batches.append(np.arange(1))                                # 1 row: empty shards

    def run(c, overlap):
        model = MLP([9, 12, 8, 5], "tanh", dtype)
        model.init_(np.random.default_rng(1))
        opt = SGD(model.params, model.grads, lr=0.2, momentum=0.9, weight_decay=0.01)
        monkeypatch.setattr(c, "overlap", overlap)
        scratch = scratch_for(tc, model.grads, c)
        for batch in batches:
            rows = batch[sharding.shard(len(batch), c.rank, c.size)]
            train_step(model, opt, cross_entropy, x[rows], y[rows], len(batch), c, tc,
                       scratch)
        return model.params

    blocking, overlapped = run(comm, False), run(comm, True)
    assert_same_sums(comm, overlapped, blocking)
    assert comm.replicas_identical(overlapped)
    one = run(mpi.Comm(None), True)   # overlap is a no-op in one process
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(overlapped, one, rtol=0, atol=tol)
