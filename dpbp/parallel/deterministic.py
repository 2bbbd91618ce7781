"""train.deterministic: the gradient sum whose bits are the same at every world size.

`GrainSum` has the interface of step.PlainSum, so train_step does not know which one it
runs. Each global batch of N rows is cut into `grains` parts whose rows never depend on
the world size (sharding.grain_rows), and each rank takes whole grains. A rank runs one
pass over its grains' rows, the grains its segments (layers.Context): each grain's
products and gradients are computed on their own, with single-threaded BLAS (set at
start-up), so they have the same bits whichever rank computes them: each grain's
gradient into a scratch buffer, the last grain's into model.grads. A rank with no grain
makes a pass of no rows (its layers' batch sums are collective). batch_sum adds every
grain's partial statistics exactly (math.fsum). Then, both collective, every rank
calling them every step:
- Allreduce(MAX) of a few floats: per parameter array, the largest |gradient| of any
  grain, and every grain's loss sum (-inf from the ranks that do not have it). Each
  grain's gradient is rounded to the grid exact.grid picks from those maxima and added
  up on this rank, which is exact (parallel/exact.py).
- Allreduce(SUM) of model.grads, exact too, so any order gives the same bits.
The loss is math.fsum of the grains' losses: exact, in grain order, the whole batch's on
every rank. A non-finite loss or gradient in any grain makes the agreed maxima
non-finite, and so does a gradient too large for any grid (beyond about 1e34 in
float32) or losses whose sum overflows: then ok = False on every rank.
"""

import math

import numpy as np

from dpbp.parallel import exact, sharding
from dpbp.parallel.step import joined


class GrainSum:
    def __init__(self, comm, model, grains):
        self.comm, self.model, self.grains = comm, model, grains
        self.mine = range(grains)[sharding.shard(grains, comm.rank, comm.size)]
        scratch = max(len(self.mine) - 1, 0)   # one buffer per grain of this rank but the last
        self.scratch = np.empty((scratch, model.grads.size), model.grads.dtype)
        self.buffers = list(self.scratch) + [model.grads]   # model.grads alone: no grain
        A = len(model.shapes)
        self.agreed = np.empty(A + grains)     # max |gradient| per array, then grain losses
        self.held = [len(range(grains)[sharding.shard(grains, r, comm.size)])
                     for r in range(comm.size)]   # every rank's number of grains

    def rows(self, N):
        return sharding.batch_shard(N, self.comm.rank, self.comm.size, self.grains)

    def passes(self, N):
        """One pass over this rank's shard of a global batch of N rows, its grains the
        segments (rows of the shard), each with a gradient buffer of its own."""
        grain_rows, shard = sharding.grain_rows(N, self.grains), self.rows(N)
        A = len(self.model.shapes)
        self.agreed[:A], self.agreed[A:] = 0.0, -np.inf
        segments = [slice(grain_rows[j].start - shard.start, grain_rows[j].stop - shard.start)
                    for j in self.mine]
        return [(slice(0, shard.stop - shard.start), segments, self.buffers[:len(segments)])]

    def add_loss(self, losses, doutputs, segments):
        for j, s in zip(self.mine, segments):
            loss = losses[s].sum()
            if not math.isfinite(loss):   # every rank will see an infinite maximum
                loss = math.inf
                doutputs[s] = np.nan
            self.agreed[len(self.model.shapes) + j] = loss

    def sum_(self):
        A, grads = len(self.model.shapes), self.model.grads
        if not self.mine:
            grads.fill(0)                       # a rank with no grain adds nothing
        for buffer in self.buffers:
            for i, g in enumerate(self.model.split(buffer)):
                self.agreed[i] = max(self.agreed[i], exact.abs_max(g))
        self.comm.allreduce_max_(self.agreed, like=grads)   # DP: the grids, every grain's loss
        grids = [exact.grid(largest, self.grains, grads.dtype) for largest in self.agreed[:A]]
        if None in grids or not np.isfinite(self.agreed[A:]).all():
            return math.inf, False
        try:
            loss = math.fsum(self.agreed[A:])
        except OverflowError:                   # finite grain losses beyond the float range
            return math.inf, False
        exact.add_rounded_([self.model.split(b) for b in self.buffers], grids)   # into grads
        self.comm.allreduce_(grads)             # DP: exact, the same bits in any order
        return loss, True

    def batch_sum(self, partials):
        """partials (grains of this rank, ...) -> (...): exact, so the result does not
        depend on which rank holds which grain: integers summed as they are; floats,
        every grain's partial, gathered from every rank and added with math.fsum, which
        rounds once (to float64, then to the partials' dtype)."""
        partials = np.asarray(partials)
        shape, n = partials.shape[1:], math.prod(partials.shape[1:])
        if partials.dtype.kind in "iu":
            return self.comm.allreduce_(partials.sum(axis=0))     # DP: exact in any order
        mine = partials.astype(np.float64).reshape(-1)
        every = self.comm.allgatherv_(mine, np.empty(self.grains * n),   # DP: every grain's
                                      [held * n for held in self.held])
        total = [math.fsum(column) for column in every.reshape(self.grains, n).T]
        return np.array(total, dtype=partials.dtype).reshape(shape)

    def epoch_loss(self, loss_sum):
        return loss_sum                         # every rank holds the whole batch's sums

    def saved_loss(self, loss_sum):
        return loss_sum if self.comm.rank == 0 else 0.0   # rank 0 saves the whole sum

    def resumed_loss(self, sums, world_size):
        return math.fsum(sums)                  # the whole sum, at any world size

    def scratch_bytes(self):
        return self.scratch.nbytes

    def describe(self, batch_size):
        per_rank = sharding.shard_sizes(self.grains, self.comm.size)
        grains = f"{self.grains} grain{'s' * (self.grains != 1)}"
        return (f"batch: global {batch_size} in {grains} of "
                f"{joined(sharding.shard_sizes(batch_size, self.grains))} rows, "
                f"{joined(per_rank)} grain{'s' * (per_rank != [1] * self.comm.size)} per "
                "rank (deterministic)")
