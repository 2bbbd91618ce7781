"""dpbp/parallel/step.py in one process: train_step, accumulation, clipping, bad losses.

train_step against an SGD step written by hand, accumulation against one pass,
clip_grad_norm_, non-finite losses that leave the parameters unchanged, and 16-bit
gradient sums that send 16-bit values (two ranks as threads: tests/thread_ranks.py).
"""

import math

import numpy as np
import pytest

from dpbp.nn import noise
from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.optim import SGD
from dpbp.parallel.comm import Comm
from dpbp.parallel.deterministic import GrainSum
from dpbp.parallel.step import PlainSum, clip_grad_norm_, train_step
from dpbp.service.config import TrainConfig
from dpbp.service.startup import gradient_sum
from tests.conftest import mlp, small_model
from tests.thread_ranks import ThreadComm, World, run_ranks


def make(widths=(5, 7, 3), activation="tanh", dtype=np.float64, momentum=0.9):
    model = mlp(list(widths), activation, dtype)
    model.init_(np.random.default_rng(1))
    return model, SGD(model.params, model.grads, lr=0.1, momentum=momentum)


def test_one_step_is_sgd_written_by_hand():
    """A Linear-only network, cross-entropy, lr 0.1, no momentum: W -= lr dW, b -= lr db,
    with dW and db of the batch's mean loss computed here with numpy."""
    rng = np.random.default_rng(2)
    model, opt = make((4, 3), momentum=0.0)
    W, b = model.layers[0].W.copy(), model.layers[0].b.copy()
    x, y = rng.normal(size=(6, 4)), np.array([0, 2, 1, 1, 0, 2])
    loss, ok = train_step(model, opt, cross_entropy, x, y, 6, PlainSum(Comm(None), model.grads))
    z = x @ W.T + b
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    dz = (p - np.eye(3)[y]) / 6
    assert ok
    assert loss == pytest.approx(-np.log(p[np.arange(6), y]).sum(), rel=1e-12)
    np.testing.assert_allclose(model.layers[0].W, W - 0.1 * dz.T @ x, rtol=0, atol=1e-12)
    np.testing.assert_allclose(model.layers[0].b, b - 0.1 * dz.sum(axis=0), rtol=0, atol=1e-12)


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("loss_fn", [cross_entropy, mse])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_accumulation_equals_one_pass(k, loss_fn, dropout):
    """k micro-batches of a shard of 11 rows (which k does not divide): the same steps
    as the whole shard at once, to rounding in float64; with dropout, each micro-batch
    gets its own rows' keys, so every row keeps its mask."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(44, 5)), rng.integers(0, 3, size=44)
    keys = noise.row_keys(1, 0, np.arange(44))

    def run(steps):
        model = mlp([5, 7, 3], "tanh", np.float64, dropout)
        model.init_(np.random.default_rng(1))
        opt = SGD(model.params, model.grads, lr=0.1, momentum=0.9)
        summed = PlainSum(Comm(None), model.grads, accumulation_steps=steps)
        losses = []
        for start in range(0, 44, 11):
            loss, ok = train_step(model, opt, loss_fn, x[start:start + 11],
                                  y[start:start + 11], 11, summed,
                                  keys=keys[start:start + 11] if dropout else None)
            assert ok
            losses.append(loss)
        return model.params, opt.momentum_buffer, losses

    params, momentum, losses = run(1)
    params_k, momentum_k, losses_k = run(k)
    assert params_k.tobytes() != make()[0].params.tobytes()   # it trained
    np.testing.assert_allclose(params_k, params, rtol=0, atol=1e-12)
    np.testing.assert_allclose(momentum_k, momentum, rtol=0, atol=1e-12)
    assert losses_k == pytest.approx(losses, rel=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_clip_grad_norm_scales_a_gradient_above_the_limit(dtype):
    g = np.array([3.0, -4.0, 0.0, 12.0], dtype)   # norm 13
    norm = clip_grad_norm_(g, 1.0)
    assert norm == pytest.approx(13.0, rel=1e-7)
    want = np.array([3.0, -4.0, 0.0, 12.0]) * (1.0 / (13.0 + 1e-6))
    np.testing.assert_allclose(g, want.astype(dtype), rtol=1e-6)
    assert math.sqrt(float(np.dot(g.astype(np.float64), g.astype(np.float64)))) < 1.0


@pytest.mark.parametrize("max_norm", [0.0, 13.5, 100.0])
def test_clip_grad_norm_leaves_a_gradient_below_the_limit(max_norm):
    g = np.array([3.0, -4.0, 0.0, 12.0])
    before = g.copy()
    assert clip_grad_norm_(g, max_norm) == pytest.approx(13.0, rel=1e-15)
    assert g.tobytes() == before.tobytes()


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_clip_grad_norm_of_a_non_finite_gradient_scales_nothing(bad):
    g = np.array([3.0, bad, 4.0])
    before = g.copy()
    assert not math.isfinite(clip_grad_norm_(g, 1.0))
    assert g.tobytes() == before.tobytes()


def test_clip_grad_norm_of_float32_squares_that_overflow_stays_finite():
    g = np.full(4, 1e20, np.float32)   # each square beyond float32's largest
    with np.errstate(over="ignore"):
        norm = clip_grad_norm_(g, 1.0)
    assert norm == pytest.approx(2e20, rel=1e-6)
    np.testing.assert_allclose(g, 0.5, rtol=1e-6)


@pytest.mark.parametrize("part", [0, 1])
@pytest.mark.parametrize("cause", ["nan input", "loss overflows"])
def test_a_non_finite_loss_in_one_part_leaves_the_parameters(part, cause):
    """A NaN row, or a loss that overflows to Inf while its gradient stays finite, in one
    of two micro-batches: ok is False and neither the parameters nor the momentum move."""
    rng = np.random.default_rng(4)
    model, opt = make((5, 2), momentum=0.9)
    N = 8
    x, y = rng.normal(size=(N, 5)) * 1e-3, rng.normal(size=(N, 2))
    row = 1 if part == 0 else 6   # micro-batches: rows 0-3 and 4-7
    if cause == "nan input":
        x[row, 2] = np.nan
    else:   # a loss of 9e308 (Inf) in that row; gradients of 4e153 at most, finite
        y[row] = 3e154
    summed = PlainSum(Comm(None), model.grads, accumulation_steps=2)
    train_step(model, opt, mse, x[:N], np.zeros_like(y), N, summed)   # a momentum to keep
    params, momentum = model.params.copy(), opt.momentum_buffer.copy()
    with np.errstate(over="ignore"):
        loss, ok = train_step(model, opt, mse, x, y, N, summed)
    assert not ok and not math.isfinite(loss)
    assert model.params.tobytes() == params.tobytes()
    assert opt.momentum_buffer.tobytes() == momentum.tobytes()


def summed_at_two_ranks(comm_dtype):
    """One step's summed gradient at two ranks, as train.comm_dtype asks, and what went
    over the wire: [(verb, dtype, values), ...] of the arrays larger than a few values."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(10, 12)).astype(np.float32), rng.integers(0, 3, size=10)

    def rank(comm):
        model = small_model()
        summed = gradient_sum(TrainConfig(comm_dtype=comm_dtype), comm, model)
        rows = summed.rows(10)
        train_step(model, SGD(model.params, model.grads, lr=0.0), cross_entropy, x[rows],
                   y[rows], 10, summed)
        return model.grads.copy()

    (first, second), world = run_ranks(2, rank)
    assert first.tobytes() == second.tobytes()   # every rank ends with the same bits
    return first, [(verb, dtype, n) for verb, _, dtype, n in world.sent if n > 8]


def test_16_bit_sums_send_16_bit_values():
    """train.comm_dtype = float16 or bfloat16: the gradient crosses the wire in 16-bit
    values, at least once in full, and nothing larger than a few values goes in 32 or
    64 bits; the sum is float32's to 16-bit rounding, and not bit for bit; float16's
    11 bits of mantissa round less than bfloat16's 8."""
    exact, wide = summed_at_two_ranks("float32")
    assert wide and {np.dtype(dtype) for _, dtype, _ in wide} == {np.dtype(np.float32)}
    error = {}
    for comm_dtype in ("float16", "bfloat16"):
        summed, sent = summed_at_two_ranks(comm_dtype)
        assert sent and all(np.dtype(dtype).itemsize == 2 for _, dtype, _ in sent), sent
        assert sum(n for _, _, n in sent) >= exact.size
        np.testing.assert_allclose(summed, exact, rtol=0, atol=1e-2 * np.abs(exact).max())
        assert summed.tobytes() != exact.tobytes()
        error[comm_dtype] = np.abs(summed - exact).mean()
    assert error["float16"] < error["bfloat16"] / 4, error


def test_train_step_clips_the_summed_gradient():
    """clip_norm: the update is the summed gradient scaled down to that norm (SGD, lr 1,
    no momentum: the parameters move by exactly the clipped gradient)."""
    model, opt = make(momentum=0.0)
    opt.lr = 1.0
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(8, 5)) * 10, rng.integers(0, 3, size=8)
    before = model.params.copy()
    _, ok = train_step(model, opt, cross_entropy, x, y, 8, PlainSum(Comm(None), model.grads),
                       clip_norm=1e-3)
    assert ok
    assert np.linalg.norm(model.params - before) == pytest.approx(1e-3, rel=1e-5)


@pytest.mark.parametrize("size,k", [(2, 3), (3, 2)])
def test_steps_at_two_and_three_ranks_are_one_processs_to_rounding(size, k):
    """PlainSum at 2 and 3 ranks (threads), each shard in k micro-batches, uneven shards
    and a last batch with fewer rows than ranks: the parameters of one process's steps
    on the same global batches, to rounding in float64."""
    rng = np.random.default_rng(size)
    x, y = rng.normal(size=(37, 5)), rng.integers(0, 3, size=37)
    batches = [np.arange(0, 16), np.arange(16, 35), np.arange(35, 37)]

    def steps(comm, k):
        model, opt = make()
        summed = PlainSum(comm, model.grads, accumulation_steps=k)
        for batch in batches:   # a rank's shard may have fewer rows than k, or none
            rows = batch[summed.rows(len(batch))]
            assert train_step(model, opt, cross_entropy, x[rows], y[rows], len(batch), summed)[1]
        return model.params.copy()

    one = steps(Comm(None), 1)
    many, _ = run_ranks(size, lambda comm: steps(comm, k))
    for params in many:
        np.testing.assert_allclose(params, one, rtol=0, atol=1e-12)
        assert params.tobytes() == many[0].tobytes()   # replicas identical


@pytest.mark.parametrize("saved,world", [(3, 2), (2, 3), (2, 2), (1, 4), (3, 1)])
def test_a_resumed_epoch_counts_every_ranks_partial_loss(saved, world):
    """A mid-epoch checkpoint keeps each rank's partial loss sum of the epoch; resumed at
    any world size, the ranks' sums still add up to the whole (at the same world size,
    each rank its own); the epoch's loss sums them over the ranks. Under GrainSum every
    rank holds the whole, and rank 0 saves it."""
    sums = [1.5, 2.25, 4.0][:saved]

    def rank(comm):
        plain = PlainSum(comm, np.zeros(3))
        mine = plain.resumed_loss(sums, saved)
        grains = GrainSum(comm, small_model(), 4)
        return (mine, plain.epoch_loss(mine), grains.resumed_loss(sums, saved),
                grains.saved_loss(7.0), grains.epoch_loss(7.0))

    out, _ = run_ranks(world, rank)
    assert math.fsum(o[0] for o in out) == pytest.approx(sum(sums), rel=1e-15)
    if saved == world:
        assert [o[0] for o in out] == sums
    assert all(o[1] == pytest.approx(sum(sums), rel=1e-15) for o in out)
    assert all(o[2] == math.fsum(sums) and o[4] == 7.0 for o in out)
    assert [o[3] for o in out] == [7.0] + [0.0] * (world - 1)


def test_the_batch_line_says_how_the_ranks_share_each_batch():
    """The start-up line of each gradient sum: rows per rank, or grains of how many rows
    and how many grains per rank (some ranks none when ranks outnumber grains)."""
    def lines(size):
        comm = ThreadComm(World(size), 0)
        return [PlainSum(comm, np.zeros(3)).describe(12),
                GrainSum(comm, small_model(), 5).describe(12),
                GrainSum(comm, small_model(), 1).describe(12)]

    assert lines(1) == ["batch: global 12, per rank 12",
                        "batch: global 12 in 5 grains of 2-3 rows, 5 grains per rank "
                        "(deterministic)",
                        "batch: global 12 in 1 grain of 12 rows, 1 grain per rank "
                        "(deterministic)"]
    assert lines(3) == ["batch: global 12, per rank 4",
                        "batch: global 12 in 5 grains of 2-3 rows, 1-2 grains per rank "
                        "(deterministic)",
                        "batch: global 12 in 1 grain of 12 rows, 0-1 grains per rank "
                        "(deterministic)"]
    assert PlainSum(ThreadComm(World(5), 0), np.zeros(3)).describe(12) == \
        "batch: global 12, per rank 2-3"
