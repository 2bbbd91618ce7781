"""Validation and predictions, sharded over the ranks in fixed blocks.

The rows go through the network in blocks of BLOCK rows at fixed offsets (0, BLOCK,
2 BLOCK, ...), the blocks shared among the ranks (sharding.blocks): every row counts once
and is computed in the same block at every world size, and each block with one BLAS
thread (threads.blockwise), so its bits depend neither on the world size nor on the
rank's thread count nor on how the CPU's BLAS kernels split work between threads.
"""

import math

import numpy as np

from dpbp.errors import UserError
from dpbp.nn.losses import correct, softmax
from dpbp.parallel import comm as mpi
from dpbp.parallel import sharding
from dpbp.parallel.threads import blas_threads, blockwise

BLOCK = 256                 # rows per forward pass, on fixed offsets
MAX_MATRIX_CLASSES = 1000   # beyond this, a confusion matrix is too large to be of use


def input_limit(dtype):
    """The largest input magnitude a network takes in `dtype`: the square root of its
    largest finite value, beyond which a product of two inputs overflows (training's
    rule for data, and predict's for its inputs)."""
    return math.sqrt(np.finfo(dtype).max)


def evaluate(model, loss_fn, x, y, num_classes, comm, block=BLOCK):
    """Collective. (mean loss, accuracy or None) over (x, y), rows sharded across ranks.

    The rows go through the network in blocks of `block` at fixed offsets, the blocks
    sharded over the ranks (sharding.blocks), so every sample counts exactly once and is
    computed in the same block at every world size; each block with single-threaded BLAS
    (threads.blockwise), so its bits do not depend on the threads either. The per-sample
    losses are gathered and summed with math.fsum, which is exact, and the hits are
    counted in integers: the results do not depend on how the rows were split.
    Reading the rows (x may be read from disk: data.Rows) can fail with a UserError on
    some rank: every rank stops then (comm.agreement).
    """
    def losses_and_hits(rows):
        outputs = model.infer(x[rows])
        hits = correct(outputs, y[rows]) if num_classes else 0
        return loss_fn(outputs, y[rows], 1, need_grad=False)[0], hits

    mine = sharding.blocks(len(x), block, comm.rank, comm.size)
    counts = sharding.block_sizes(len(x), block, comm.size)
    with mpi.agreement(comm):   # DP: a rank that cannot read its rows stops them all
        done = blockwise(losses_and_hits, mine, blas_threads())
    losses = np.concatenate([np.empty(0)] + [losses for losses, _ in done])
    hits = sum(h for _, h in done)
    every_loss = comm.allgatherv_(losses, np.empty(len(x)), counts)   # DP: all samples
    total_hits = comm.allreduce_(np.array([hits], dtype=np.int64))[0]   # DP: exact count
    return math.fsum(every_loss) / len(x), (total_hits / len(x) if num_classes else None)


def class_counts(model, x, y, num_classes, comm, block=BLOCK):
    """Collective. (confusion, per_class): confusion[i, j] = validation samples of class i
    predicted as j (None beyond MAX_MATRIX_CLASSES classes), per_class = [samples of class
    i, of them correct] as an int64 array (2, C). Rows are sharded like `evaluate`'s."""
    C = num_classes
    with_matrix = C <= MAX_MATRIX_CLASSES

    def counted(rows):   # on several threads at once: nothing shared is written
        predicted, truth = model.infer(x[rows]).argmax(axis=1), y[rows]
        counts = np.zeros(C * C + 2 * C if with_matrix else 2 * C, dtype=np.int64)
        counts[:C] = np.bincount(truth, minlength=C)
        counts[C:2 * C] = np.bincount(truth[predicted == truth], minlength=C)
        if with_matrix:
            counts[2 * C:] = np.bincount(truth * C + predicted, minlength=C * C)
        return counts

    mine = sharding.blocks(len(x), block, comm.rank, comm.size)
    with mpi.agreement(comm):   # DP: a rank that cannot read its rows stops them all
        counts = sum(blockwise(counted, mine, blas_threads()),
                     np.zeros(C * C + 2 * C if with_matrix else 2 * C, dtype=np.int64))
    comm.allreduce_(counts)                 # DP: exact sums of every rank's counts
    confusion = counts[2 * C:].reshape(C, C) if with_matrix else None
    return confusion, counts[:2 * C].reshape(2, C)


def outputs(model, x, dtype, probabilities, comm, where="--input", block=BLOCK):
    """Collective. The outputs (float64, (n, C)) for every row of x, computed in blocks at
    fixed offsets shared among the ranks (as evaluation does, so each row's output is the
    same at any world size) and gathered. A row that is not finite in `dtype`, or beyond
    input_limit (training's rule for data), or whose outputs overflow, stops every rank
    with one line naming the first (and `where`): never a NaN for an answer."""
    n, C = len(x), math.prod(model.output_shape)
    mine = sharding.blocks(n, block, comm.rank, comm.size)
    counts = sharding.block_sizes(n, block, comm.size)

    def outputs_of(rows):   # on several threads at once: nothing shared is written
        with np.errstate(over="ignore"):   # overflow is reported just below
            xb = np.ascontiguousarray(x[rows], dtype=dtype)
        check_rows(xb, rows.start, dtype, where)
        with np.errstate(over="ignore", invalid="ignore"):
            z = model.infer(xb).reshape(len(xb), C)
        bad = np.flatnonzero(~np.isfinite(z).all(axis=1))
        if len(bad):
            raise UserError(f"{where}: row {rows.start + bad[0]}: the network's outputs "
                            f"overflow {np.dtype(dtype).name}; scale the inputs as the "
                            "training data were")
        return softmax(z) if probabilities else z.astype(np.float64)

    with mpi.agreement(comm):
        done = blockwise(outputs_of, mine, blas_threads())
    computed = np.concatenate([np.empty((0, C))] + done)
    every = np.empty((n, C))
    comm.allgatherv_(computed.reshape(-1), every.reshape(-1), [c * C for c in counts])   # DP
    return every


def check_rows(xb, first, dtype, where):
    """A UserError naming the first row of `xb` (row `first` of the input) that is not
    finite in `dtype`, or holds a value beyond input_limit(dtype)."""
    xb = xb.reshape(len(xb), -1)   # rows of any shape
    bad = np.flatnonzero(~np.isfinite(xb).all(axis=1))
    if len(bad):
        raise UserError(f"{where}: row {first + bad[0]} holds NaN or Inf (or values beyond "
                        f"{np.dtype(dtype).name})")
    big = np.flatnonzero((np.abs(xb) > input_limit(dtype)).any(axis=1))
    if len(big):
        row = xb[big[0]]
        raise UserError(f"{where}: row {first + big[0]} holds {row[np.argmax(np.abs(row))]:.3g}: "
                        f"beyond {input_limit(dtype):.3g} a network's products of inputs "
                        f"overflow {np.dtype(dtype).name}; scale the inputs as the training "
                        "data were")
