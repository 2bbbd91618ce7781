"""dpbp/parallel/evaluation.py in one process: evaluate, class_counts and outputs.

Their bits do not depend on the BLAS thread count, nor on the world size (2 to 4 ranks
as threads, tests/thread_ranks.py, with products whose bits depend on their rows,
tests/sensitive.py); the confusion matrix agrees with the accuracy; rows that are not
finite stop with one line.
"""

import numpy as np
import pytest
from threadpoolctl import threadpool_limits

from dpbp.nn.losses import cross_entropy, mse, softmax
from dpbp.parallel import comm as mpi
from dpbp.parallel.comm import Comm
from dpbp.parallel.evaluation import MAX_MATRIX_CLASSES, class_counts, evaluate, outputs
from tests.conftest import mlp, small_model
from tests.thread_ranks import run_ranks


@pytest.mark.parametrize("blas", [1, 2])
def test_evaluate_and_predict_do_not_depend_on_the_thread_count(sensitive, blas):
    """600 rows, 3 blocks: at 1 or 2 BLAS threads (2 workers), the bits of 1 thread."""
    model = small_model()
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(600, 12)).astype(np.float32), rng.integers(0, 3, size=600)
    with threadpool_limits(1, user_api="blas"):
        want = [model.forward(x[i:i + 256]).copy() for i in range(0, 600, 256)]
    with threadpool_limits(blas, user_api="blas"):
        loss, accuracy = evaluate(model, cross_entropy, x, y, 3, Comm(None))
        out = outputs(model, x, np.float32, False, Comm(None))
    assert out.tobytes() == np.concatenate(want).astype(np.float64).tobytes()
    losses = np.concatenate([cross_entropy(o, y[i * 256:(i + 1) * 256], 1, False)[0]
                             for i, o in enumerate(want)])
    assert loss == pytest.approx(losses.mean(), rel=1e-15)
    assert accuracy == np.mean(np.concatenate(want).argmax(axis=1) == y)


def everything(model, x, y, comm):
    """evaluate, class_counts and outputs (raw and probabilities) on this rank."""
    return (evaluate(model, cross_entropy, x, y, 4, comm),
            class_counts(model, x, y, 4, comm),
            outputs(model, x, np.float32, False, comm).tobytes(),
            outputs(model, x, np.float32, True, comm).tobytes())


@pytest.mark.parametrize("size", [2, 3, 4])
def test_evaluation_has_the_bits_of_one_process_at_any_world_size(sensitive, size):
    """700 rows (3 blocks, the last short) shared by 2, 3 or 4 ranks (one without a
    block): every rank gets the bits of one process, under products whose bits depend
    on their rows as some CPUs' kernels' do: so each row must go through the network in
    the same block at every world size."""
    model = small_model((12, 16, 4))
    rng = np.random.default_rng(size)
    x, y = rng.normal(size=(700, 12)).astype(np.float32), rng.integers(0, 4, size=700)
    with threadpool_limits(1, user_api="blas"):   # the ranks' threads share the BLAS
        one = everything(model, x, y, Comm(None))
        many, _ = run_ranks(size, lambda comm: everything(model, x, y, comm))
    for got in many:
        assert got[0] == one[0] and got[2:] == one[2:]
        assert all(np.array_equal(a, b) for a, b in zip(got[1], one[1]))


def in_blocks(model, x, block=256):
    """forward over blocks of `block` rows at fixed offsets, on one BLAS thread: the bits
    evaluation promises (those of a product do depend on its rows with some kernels)."""
    with threadpool_limits(1, user_api="blas"):
        return np.concatenate([np.empty((0, *model.output_shape))] + [
            model.forward(x[i:i + block]).copy() for i in range(0, len(x), block)])


def random_model_and_data(n, classes, seed):
    rng = np.random.default_rng(seed)
    model = mlp([6, 8, classes], "tanh", np.float64)
    model.init_(rng)
    return model, rng.normal(size=(n, 6)), rng.integers(0, classes, size=n)


@pytest.mark.parametrize("n,block", [(1, 256), (600, 256), (45, 7)])
def test_evaluate_is_the_mean_loss_and_the_accuracy_of_all_rows(n, block):
    model, x, y = random_model_and_data(n, 4, n)
    loss, accuracy = evaluate(model, cross_entropy, x, y, 4, Comm(None), block=block)
    z = in_blocks(model, x, block)
    losses = cross_entropy(z, y, 1)[0]
    assert loss == pytest.approx(losses.mean(), rel=1e-13)
    assert accuracy == np.count_nonzero(z.argmax(axis=1) == y) / n


def test_evaluate_without_classes_gives_the_loss_only():
    rng = np.random.default_rng(1)
    model = mlp([3, 2], "relu", np.float64)
    model.init_(rng)
    x, y = rng.normal(size=(10, 3)), rng.normal(size=(10, 2))
    loss, accuracy = evaluate(model, mse, x, y, None, Comm(None))
    assert accuracy is None
    assert loss == pytest.approx(((in_blocks(model, x) - y) ** 2).mean(), rel=1e-13)


@pytest.mark.parametrize("n,classes,block", [(600, 5, 256), (37, 3, 8), (50, 12, 256)])
def test_class_counts_agree_with_evaluate(n, classes, block):
    """The confusion matrix counts every row once, its diagonal is evaluate's hits, and
    per_class is its row sums and diagonal."""
    model, x, y = random_model_and_data(n, classes, classes)
    _, accuracy = evaluate(model, cross_entropy, x, y, classes, Comm(None), block=block)
    confusion, per_class = class_counts(model, x, y, classes, Comm(None), block=block)
    assert confusion.shape == (classes, classes) and confusion.dtype == np.int64
    assert confusion.sum() == n and np.trace(confusion) / n == accuracy
    predicted = in_blocks(model, x, block).argmax(axis=1)
    assert confusion.tolist() == [[int(np.sum((y == i) & (predicted == j)))
                                   for j in range(classes)] for i in range(classes)]
    assert per_class.shape == (2, classes)
    assert per_class[0].tolist() == np.bincount(y, minlength=classes).tolist()
    assert per_class[0].tolist() == confusion.sum(axis=1).tolist()
    assert per_class[1].tolist() == np.diag(confusion).tolist()


@pytest.mark.parametrize("classes", [MAX_MATRIX_CLASSES, MAX_MATRIX_CLASSES + 1])
def test_class_counts_beyond_the_matrix_limit_give_per_class_counts_only(classes):
    model, x, y = random_model_and_data(40, classes, 2)
    confusion, per_class = class_counts(model, x, y, classes, Comm(None))
    _, accuracy = evaluate(model, cross_entropy, x, y, classes, Comm(None))
    assert (confusion is None) == (classes > MAX_MATRIX_CLASSES)
    assert per_class[0].sum() == 40 and per_class[1].sum() / 40 == accuracy


def test_outputs_are_the_networks_outputs_or_probabilities():
    model, x, _ = random_model_and_data(300, 4, 3)
    z = in_blocks(model, x)
    raw = outputs(model, x, np.float64, False, Comm(None))
    assert raw.dtype == np.float64 and raw.tobytes() == z.tobytes()
    p = outputs(model, x, np.float64, True, Comm(None))
    assert p.tobytes() == softmax(z).tobytes()
    np.testing.assert_allclose(p.sum(axis=1), 1, rtol=0, atol=1e-12)


def test_outputs_stop_at_a_row_that_is_not_finite(capsys):
    model, x, _ = random_model_and_data(300, 4, 4)
    x[270, 1] = np.inf   # in the second block
    with pytest.raises(mpi.AgreedExit) as stop:
        outputs(model, x, np.float64, False, Comm(None), where="x.npy")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "dpbp: error: x.npy: row 270 holds NaN or Inf (or " \
                                      "values beyond float64)\n"


def test_outputs_stop_where_the_networks_outputs_overflow(capsys):
    """Finite inputs within the limit, weights so large that the outputs overflow: one
    line naming the first row, never an infinite or NaN probability."""
    model, x, _ = random_model_and_data(300, 4, 4)
    model.params[...] = 1e308
    with pytest.raises(mpi.AgreedExit) as stop:
        outputs(model, x, np.float64, True, Comm(None), where="x.npy")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "dpbp: error: x.npy: row 0: the network's outputs " \
        "overflow float64; scale the inputs as the training data were\n"
