"""One data-parallel training step, and the plain gradient sum.

`train_step` is the whole algorithm of a step: forward, loss, backward, the gradient sum
over ranks, the update. How the gradients of this rank's rows are gathered and summed is
the job of a gradient sum, chosen once at start-up (service/startup.py): `PlainSum` here,
one Allreduce of the flat gradient (optionally over micro-batches, optionally sent in 16
bits), or `GrainSum` (parallel/deterministic.py), exact sums that give the same bits at
every world size. Both have the same small interface:

    rows(N)               this rank's rows of a global batch of N rows (a slice)
    parts(N)              [(rows of the shard, gradient buffer), ...] to backpropagate
    add_loss(losses, d)   a part's per-row losses; a non-finite one poisons d with NaN
    sum_()                collective: model.grads = the global batch's gradient on every
                          rank; returns (loss sum, ok)
    epoch_loss(s)         collective: the epoch's loss sum over all ranks
    saved_loss(s)         what this rank stores of its partial sum in a checkpoint
    resumed_loss(sums, world_size)   this rank's partial sum from a checkpoint's sums
    batch_sum(partial)    collective: a small array summed over every rank's part of the
                          global batch, in its dtype; handed to every layer (Context), so
                          that a layer whose statistics span the batch never sees a
                          communicator. Every rank must call it as often: a layer calling
                          it once per part does so under PlainSum (k parts on every rank),
                          under GrainSum only where the grains split evenly over the
                          ranks. No shipped layer calls it yet

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
      collective: every rank calls it every step, ranks with no rows included; and what
      a layer sums with ctx.batch_sum (no shipped layer does).
    - A non-finite loss on any rank makes the summed gradient non-finite on every rank
      alike: then no rank updates, and every rank returns ok = False.
    - Never communicated: parameters, activations, per-step losses (but under GrainSum).
    - Identical on every rank after the call: model.params and the optimizer state, since
      every rank applies the same update to the same summed gradient.
    Returns (loss sum, ok): this rank's sum of per-sample losses (GrainSum: the batch's).
    """
    for rows, grads in summed.parts(N):             # the shard, its micro-batches or grains
        ctx = Context(None if keys is None else keys[rows], summed.batch_sum)   # DP: the sum
        outputs = model.forward(x[rows], ctx)                   # forward
        losses, doutputs = loss_fn(outputs, y[rows], N)         # loss, gradient of the GLOBAL mean
        summed.add_loss(losses, doutputs)
        model.backward(doutputs, grads, ctx)                    # backward, into the part's buffer
    loss_sum, ok = summed.sum_()                    # DP: the global batch's gradient, every rank
    norm = clip_grad_norm_(model.grads, clip_norm) if ok else math.inf
    if not math.isfinite(norm):                     # the same verdict on every rank
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

    def parts(self, N):
        """The k micro-batches of this rank's shard, each backpropagated into model.grads;
        after each but the last, its gradient is added to the running sum (so this is a
        generator)."""
        self.loss, rows = 0.0, self.rows(N)
        B = rows.stop - rows.start
        for i in range(self.k):
            yield sharding.shard(B, i, self.k), self.grads
            if i == 0 and self.k > 1:
                np.copyto(self.earlier, self.grads)
            elif i < self.k - 1:
                self.earlier += self.grads

    def add_loss(self, losses, doutputs):
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

    def batch_sum(self, partial):
        return self.comm.allreduce_(np.array(partial))   # DP: over ranks; a copy: the
                                                         # caller's array stays its own

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
