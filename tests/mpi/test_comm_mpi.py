"""The communication layer and the training step on real ranks (pytest-mpi).

Run by tests/test_mpi_suite.py as
    mpirun -n 2 python -m mpi4py -m pytest --with-mpi tests/mpi
(`python -m mpi4py` aborts the job when a rank fails instead of letting it hang).
"""

import numpy as np
import pytest

from dpbp.errors import UserError
from dpbp.nn.losses import cross_entropy
from dpbp.nn.optim import SGD
from dpbp.parallel import comm as mpi
from dpbp.parallel import half, sharding
from dpbp.parallel.evaluation import evaluate
from dpbp.parallel.step import PlainSum, train_step
from tests.conftest import mlp

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture(scope="module")
def comm():
    return mpi.init()


def test_world(comm):
    assert comm.size >= 2 and 0 <= comm.rank < comm.size
    assert 1 <= comm.ranks_sharing_cores <= comm.size
    assert comm.library != "no MPI"


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_allreduce_sums_in_place(comm, dtype):
    buf = np.arange(5, dtype=dtype) + comm.rank
    view = buf[1:3]
    out = comm.allreduce_(buf)
    assert out is buf and out.dtype == dtype
    expected = comm.size * np.arange(5) + comm.size * (comm.size - 1) / 2
    np.testing.assert_array_equal(buf, expected)
    np.testing.assert_array_equal(view, expected[1:3])   # views of the buffer see the sum


def test_bcast_and_min(comm):
    buf = np.full(3, float(comm.rank))
    comm.bcast_(buf)
    np.testing.assert_array_equal(buf, 0.0)
    assert comm.bcast_obj({"epoch": comm.rank}) == {"epoch": 0}
    assert comm.allreduce_min(10 - comm.rank) == 10 - (comm.size - 1)
    comm.barrier()


def test_replicas_identical(comm):
    assert comm.replicas_identical(np.linspace(0, 1, 100))
    differs = np.linspace(0, 1, 100)
    differs[comm.size - 1] += 1e-16 * (comm.rank == 1) + 1e-9 * (comm.rank == 1)
    assert not comm.replicas_identical(differs)   # False on every rank, not only rank 1


def test_agreement_stops_every_rank_together(comm, capsys):
    with mpi.agreement(comm):
        pass   # nothing wrong anywhere: no exit
    with pytest.raises(mpi.AgreedExit) as stop:
        with mpi.agreement(comm):
            if comm.rank == 1:
                raise UserError("only rank 1 sees this")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert ("dpbp: error (rank 1): only rank 1 sees this" in err) == (comm.rank == 1)


def test_agreement_passes_other_errors_through(comm):
    # A bug is not bad input: it skips the agreement and reaches run(), which aborts the
    # whole job (tests/test_failures.py checks that). Raised on every rank here, so that no
    # rank is left waiting in the agreement's collective.
    with pytest.raises(ZeroDivisionError):
        with mpi.agreement(comm):
            1 / 0


def test_train_step_matches_one_process_and_replicas_stay_identical(comm):
    """Steps on shards of global batches (one of them smaller than the world) equal steps
    on the whole batches in one process; every rank ends with the same bits."""
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(23, 6)), rng.integers(0, 4, size=23)
    batches = sharding.global_batches(np.arange(23), 10)       # 10, 10, 3 rows
    batches.append(np.arange(1))                                # 1 row: empty shards
    serial, world = mpi.Comm(None), comm

    def run(c):
        model = mlp([6, 7, 4], "relu", np.float64)
        model.init_(np.random.default_rng(1))
        opt = SGD(model.params, model.grads, lr=0.3, momentum=0.9, nesterov=True,
                  weight_decay=0.01)
        for batch in batches:
            rows = batch[sharding.shard(len(batch), c.rank, c.size)]
            train_step(model, opt, cross_entropy, x[rows], y[rows], len(batch),
                       PlainSum(c, model.grads))
        return model.params

    one, many = run(serial), run(world)
    np.testing.assert_allclose(many, one, rtol=0, atol=1e-12)
    assert comm.replicas_identical(many)
    gathered = np.zeros((comm.size, many.size))
    gathered[comm.rank] = many
    comm.allreduce_(gathered)
    for r in range(comm.size):
        np.testing.assert_array_equal(gathered[r], many)


def test_allgatherv_concatenates_in_rank_order(comm):
    counts = sharding.shard_sizes(7, comm.size)
    mine = np.arange(7, dtype=np.float64)[sharding.shard(7, comm.rank, comm.size)]
    out = comm.allgatherv_(mine, np.empty(7), counts)
    np.testing.assert_array_equal(out, np.arange(7.0))


@pytest.mark.parametrize("rows", [1001, 1])
def test_evaluate_gives_the_same_numbers_at_any_world_size(comm, rows):
    """Validation at N ranks equals validation in one process, bit for bit."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(rows, 8)), rng.integers(0, 5, size=rows)
    model = mlp([8, 16, 5], "tanh", np.float64)
    model.init_(np.random.default_rng(4))
    one = evaluate(model, cross_entropy, x, y, 5, mpi.Comm(None), block=64)
    many = evaluate(model, cross_entropy, x, y, 5, comm, block=64)
    assert many == one


def sum16(x, kind):
    comm = mpi.init()   # the world of the module's fixture
    return half.allreduce_16_(comm, x, kind, half.Buffers(x.size, comm.rank, comm.size))


@pytest.mark.parametrize("kind,rtol", [("float16", 2e-3), ("bfloat16", 2e-2)])
def test_16_bit_allreduce(comm, kind, rtol):
    """Half the bytes, the same sum to the format's rounding, bitwise the same on every
    rank; float16 is scaled so that neither huge nor tiny values are lost."""
    rng = np.random.default_rng(comm.rank)
    for magnitude in (1e-7, 1.0, 3e4, 1e30 if kind == "bfloat16" else 6e4):
        x = (rng.normal(size=1000) * magnitude).astype(np.float32)
        every = np.empty(comm.size * x.size, np.float32)
        comm._comm.Allgather(x, every)
        exact = every.reshape(comm.size, -1).astype(np.float64).sum(axis=0)
        out = sum16(x.copy(), kind)
        assert np.isfinite(out).all()
        scale = np.abs(every).max() * comm.size
        np.testing.assert_allclose(out, exact, rtol=0, atol=rtol * scale)
        assert comm.replicas_identical(out)
    poisoned = np.ones(10, np.float32)
    if comm.rank == 1:
        poisoned[3] = np.nan
    out = sum16(poisoned, kind)
    assert np.isnan(out[3]) and np.isfinite(np.delete(out, 3)).all()


def test_float16_sum_at_the_edge_of_its_range(comm):
    """Every rank holding the largest value the scaling allows for, with the same sign:
    rounding each part up to float16 must not push the sum past 65504; tiny values must
    not be scaled past float32's range."""
    edge = np.full(4, 65504.0 / comm.size * 0.9999, np.float32)
    out = sum16(edge.copy(), "float16")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, edge * comm.size, rtol=2e-3)
    tiny = np.array([1e-36, 0.0, 5e-37], np.float32)
    out = sum16(tiny.copy(), "float16")
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, tiny * comm.size, rtol=2e-3)
