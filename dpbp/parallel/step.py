"""One data-parallel training step, and the plain gradient sum.

`train_step` is the whole algorithm of a step: forward, loss, backward, the gradient sum
over ranks, the update. How the gradients of this rank's rows are gathered and summed is
the job of a gradient sum, chosen once at start-up (service/startup.py): `PlainSum` here,
one Allreduce of the flat gradient (optionally over micro-batches, optionally sent in 16
bits), or `GrainSum` (parallel/deterministic.py), exact sums that give the same bits at
every world size. Both have the same small interface:

    rows(N)               this rank's rows of a global batch of N rows (a slice)
    passes(N)             [(rows of the shard, segments, gradient buffers), ...]: the
                          passes through the network, each cut into segments (slices
                          of its rows; None: one) with a gradient buffer per segment
    add_loss(losses, d, segments)   a pass's per-row losses; a non-finite one poisons d
    sum_()                collective: model.grads = the global batch's gradient on every
                          rank; returns (loss sum, ok)
    epoch_loss(s)         collective: the epoch's loss sum over all ranks
    saved_loss(s)         what this rank stores of its partial sum in a checkpoint
    resumed_loss(sums, world_size)   this rank's partial sum from a checkpoint's sums
    batch_sum(partials)   collective: small arrays, one per segment of the pass, summed
                          over every segment of every rank, in their dtype; handed to
                          every layer (Context), so that a layer whose statistics span
                          the batch (BatchNorm) never sees a communicator. Every rank
                          makes one pass per step (PlainSum without micro-batches,
                          GrainSum always), so a layer calling it a fixed number of times
                          per pass calls it as often as every other rank

Shapes: B rows in this rank's shard of a global batch of N rows.
"""

import math

import numpy as np

from dpbp.nn.layers import Context
from dpbp.parallel import half, sharding


def train_step(model, optimizer, loss_fn, x, y, N, summed, clip_norm=0.0, keys=None):
    """One data-parallel step on this rank's shard (x, y) of a global batch of N rows;
    with dropout, `keys` holds each row's key for its masks (nn.noise.row_keys).

    The data-parallel contract:
    - Identical on every rank before the call: model.params, the optimizer state, N, and
      the kind of gradient sum `summed` (every rank chose it from the same config).
    - Each rank passes its own rows, summed.rows(N) of the global batch; it may have none.
      Their dropout keys depend on the rows alone (the sample, the step, the seed), so a
      row's masks are the same whichever rank holds it.
    - The loss gradient is normalised by the global N, not by B, so the sum over ranks is
      the gradient of the global batch's mean loss: what one process computes on the
      whole batch, up to floating-point rounding (PlainSum) or bit for bit (GrainSum).
    - Communicated: the flat gradient, summed over ranks inside summed.sum_(), which is
      collective: every rank calls it every step, ranks with no rows included. Inside
      forward and backward, what a layer sums with ctx.batch_sum, collective too: each
      batchnorm layer sums per-channel counts and sums of x, then of (x - mean)^2, in
      forward, and of dy and dy x_hat in backward (3 sums, of 1 + C, C and 2 C values),
      every rank in the same order because every rank runs the same layers, one pass.
      Under GrainSum the pass is the rank's grains, segments of it: a layer computes
      each grain's products and gradients on their own and batch_sum adds every grain's
      partial exactly, so the bits do not depend on which rank holds a grain.
    - Running statistics (batchnorm's buffers) change in forward, the same on every
      rank since they come from batch_sum's totals; a step that does not update (ok =
      False) puts them back as they were.
    - A non-finite loss on any rank makes the summed gradient non-finite on every rank
      alike: then no rank updates, and every rank returns ok = False.
    - Never communicated: parameters, activations, per-step losses (but under GrainSum).
    - Identical on every rank after the call: model.params and the optimizer state, since
      every rank applies the same update to the same summed gradient.
    Returns (loss sum, ok): this rank's sum of per-sample losses (GrainSum: the batch's).
    """
    kept = model.save_buffers()                     # running statistics, if no update
    for rows, segments, grads in summed.passes(N):  # the shard (micro-batches), its grains
        ctx = Context(None if keys is None else keys[rows], summed.batch_sum, segments)  # DP
        outputs = model.forward(x[rows], ctx)                   # forward
        losses, doutputs = loss_fn(outputs, y[rows], N)         # loss, gradient of the GLOBAL mean
        summed.add_loss(losses, doutputs, segments)
        model.backward(doutputs, grads, ctx)                    # backward, a buffer per segment
    loss_sum, ok = summed.sum_()                    # DP: the global batch's gradient, every rank
    norm = clip_grad_norm_(model.grads, clip_norm) if ok else math.inf
    if not math.isfinite(norm):                     # the same verdict on every rank
        model.restore_buffers(kept)
        return loss_sum, False
    optimizer.step()                                            # update, the same everywhere
    return loss_sum, True


def clip_grad_norm_(grads, max_norm):
    """The L2 norm of grads, which are scaled down to `max_norm` if above it (as torch's
    clip_grad_norm_; 0 = no clipping). One BLAS dot, in float64 only where float32 squares
    overflow (a finite gradient must not look non-finite); NaN or Inf give a non-finite
    norm and no scaling."""
    norm = math.sqrt(np.dot(grads, grads))
    if math.isinf(norm) and grads.dtype != np.float64:
        norm = math.sqrt(np.dot(grads.astype(np.float64), grads.astype(np.float64)))
    if max_norm and math.isfinite(norm) and norm > max_norm:
        grads *= max_norm / (norm + 1e-6)
    return norm


class PlainSum:
    """The gradient of this rank's rows, summed over ranks with one Allreduce(SUM).

    With accumulation_steps = k the shard goes through the network as k micro-batches
    (contiguous, the last never empty), to bound the rows held at once; the gradients of
    all but the last are added up in a scratch buffer. With comm_dtype "float16" or
    "bfloat16" the sum is sent in 16 bits (parallel/half.py).
    """

    def __init__(self, comm, grads, accumulation_steps=1, comm_dtype="float32"):
        self.comm, self.grads = comm, grads
        self.k, self.comm_dtype = accumulation_steps, comm_dtype
        self.earlier = np.empty_like(grads) if accumulation_steps > 1 else None
        self.half = (half.Buffers(grads.size, comm.rank, comm.size)
                     if comm_dtype != "float32" and comm.size > 1 else None)
        self.loss = 0.0

    def rows(self, N):
        return sharding.shard(N, self.comm.rank, self.comm.size)

    def passes(self, N):
        """The k micro-batches of this rank's shard, one segment each, backpropagated into
        model.grads; after each but the last, its gradient is added to the running sum
        (so this is a generator)."""
        self.loss, rows = 0.0, self.rows(N)
        B = rows.stop - rows.start
        for i in range(self.k):
            yield sharding.shard(B, i, self.k), None, [self.grads]
            if i == 0 and self.k > 1:
                np.copyto(self.earlier, self.grads)
            elif i < self.k - 1:
                self.earlier += self.grads

    def add_loss(self, losses, doutputs, segments):
        self.loss += losses.sum()
        if not math.isfinite(self.loss):
            doutputs[...] = np.nan   # NaN reaches every gradient, then every rank's sum

    def sum_(self):
        if self.earlier is not None:
            self.grads += self.earlier
        if self.comm_dtype == "float32":
            self.comm.allreduce_(self.grads)   # DP: sum of shard gradients = global gradient
        else:
            half.allreduce_16_(self.comm, self.grads, self.comm_dtype, self.half)
        return self.loss, True

    def batch_sum(self, partials):
        return self.comm.allreduce_(np.asarray(partials).sum(axis=0))   # DP: over ranks

    def epoch_loss(self, loss_sum):
        return self.comm.allreduce_(np.array([loss_sum]))[0]   # DP: every rank's rows

    def saved_loss(self, loss_sum):
        return loss_sum

    def resumed_loss(self, sums, world_size):
        if world_size == self.comm.size:
            return float(sums[self.comm.rank])
        return math.fsum(sums) if self.comm.rank == 0 else 0.0   # rank 0 carries it all

    def scratch_bytes(self):
        return sum(0 if a is None else a.nbytes for a in
                   (self.earlier, *((self.half.packed, self.half.parts) if self.half else ())))

    def describe(self, batch_size):
        per_rank = sharding.shard_sizes(batch_size, self.comm.size)
        return f"batch: global {batch_size}, per rank {joined(per_rank)}"


def joined(sizes):
    """'32' or '2-3': the distinct sizes, smallest first."""
    return "-".join(map(str, sorted(set(sizes))))
