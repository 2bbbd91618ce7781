"""Which samples each rank trains on: pure functions of (seed, epoch, step, rank, world size).

The global batch sequence depends on the seed and epoch only, never on the world size;
each global batch is then split into `size` contiguous shards whose lengths differ by at
most one. A shard may be empty (fewer samples than ranks in a final partial batch).
Under train.deterministic the batch is first cut into `grains` equal parts, the same at
every world size, and each rank takes whole grains.
"""

import numpy as np


def epoch_order(n, seed, epoch, shuffle):
    """The order of the n training samples in this epoch, identical on every rank."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch, 0xDA7A]).permutation(n)


def global_batches(order, batch_size):
    """The epoch's global minibatches: order[k*B:(k+1)*B]; the last one may be shorter."""
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


def num_batches(n, batch_size):
    """Global batches per epoch: ceil(n / batch_size)."""
    return -(-n // batch_size)


def shard(n, rank, size):
    """This rank's slice of n rows: contiguous, lengths differ by at most one, may be empty."""
    return slice(rank * n // size, (rank + 1) * n // size)


def shard_sizes(n, size):
    """[rows of rank 0, rows of rank 1, ...] when n rows are sharded over `size` ranks."""
    return [len(range(n)[shard(n, r, size)]) for r in range(size)]


def grain_rows(n, grains):
    """train.deterministic: the grains of a global batch of n rows, [slice, ...]: contiguous,
    lengths differ by at most one (some empty when n < grains), never world-size dependent."""
    return [shard(n, j, grains) for j in range(grains)]


def batch_shard(n, rank, size, grains=None):
    """This rank's slice of a global batch of n rows: shard(n, rank, size), or, with
    `grains`, the rows of whole grains: grains shard(grains, rank, size), contiguous."""
    if grains is None:
        return shard(n, rank, size)
    mine = shard(grains, rank, size)
    return slice(mine.start * n // grains, mine.stop * n // grains)


def blocks(n, block, rank, size):
    """Evaluation: this rank's rows of n, as slices of at most `block` rows. The rows are
    cut into blocks at fixed offsets (0, block, 2 block, ...), the blocks sharded over the
    ranks; so each row goes through the network in the same block at every world size."""
    mine = shard(-(-n // block), rank, size)
    return [slice(i * block, min((i + 1) * block, n)) for i in range(mine.start, mine.stop)]


def block_sizes(n, block, size):
    """[rows of rank 0, rows of rank 1, ...] when n rows are shared as `blocks` shares them."""
    return [sum(rows.stop - rows.start for rows in blocks(n, block, r, size))
            for r in range(size)]
