"""Data-parallel training of a multilayer perceptron, in one process or many under MPI.

    python -m dpbp.train                      # one process
    mpirun -n 4 python -m dpbp.train          # four ranks, the same result to rounding

Every rank holds a full replica of the model, computes gradients on its own shard of
each global minibatch, and the gradients are summed with one Allreduce; every rank then
applies the same SGD update, so the replicas stay identical. Rank 0 logs and writes a
checkpoint every epoch.
"""

import argparse
import hashlib
import math
import os
import sys
import time
import zlib

import numpy as np

from dpbp import __version__, faults
from dpbp.errors import ArgumentParser, UserError
from dpbp.nn import schedule
from dpbp.nn.losses import correct, cross_entropy, mse
from dpbp.nn.model import MLP
from dpbp.nn.optim import SGD
from dpbp.parallel import comm as mpi
from dpbp.parallel import exact, sharding
from dpbp.parallel.threads import (
    arithmetic,
    blas_threads,
    blockwise,
    limit_blas_threads,
)
from dpbp.service import checkpoint, config, run_dir
from dpbp.service import data as datasets
from dpbp.service.supervise import StopSignals, StopVote, Watchdog, signal_name

EXIT_DIVERGED = 3   # training stopped: a non-finite loss, or replicas that differ
EXIT_HUNG = 4       # the watchdog ended the job: no step finished in run.watchdog_seconds
EVAL_BLOCK = 256    # rows per forward pass in evaluation, on fixed offsets


# ----------------------------------------------------------------------------- one step

def train_step(model, optimizer, loss_fn, x, y, N, comm, tc=None, scratch=None):
    """One data-parallel SGD step on this rank's shard (x, y) of a global batch of N rows.

    The data-parallel contract:
    - Identical on every rank before the call: model.params, the optimizer state, N.
    - Each rank passes its own rows of the global batch; a rank may have none (B = 0).
    - Communicated: the flat gradient buffer, summed with Allreduce(SUM): once after
      backpropagation, or, with comm.overlap, in buckets started as backpropagation
      finishes them (non-blocking, the same sums). It is collective: every rank calls it
      every step, ranks with no rows included, and all ranks must agree on comm.overlap.
    - The loss gradient is normalised by the global N, not by B, so the sum over ranks is
      the gradient of the global batch's mean loss: what one process computes on the
      whole batch, up to floating-point rounding.
    - A rank whose loss is not finite makes its loss gradient NaN, so the summed gradient
      is not finite on every rank alike; then no rank updates (returns ok = False).
    - Never communicated: parameters, activations, per-step losses.
    - Identical on every rank after the call: model.params and the optimizer state, since
      every rank applies the same update to the same summed gradient.
    The train config `tc` (defaults without it) may ask for: accumulation_steps = k, the
    shard processed as k micro-batches in turn (see micro_batches_summed); comm_dtype, the
    sum sent in 16 bits; clip_grad_norm, the summed gradient scaled down to that global
    norm (identical on every rank, as the sum is); deterministic, the gradient summed
    exactly grain by grain, the same bits at every world size (see grains_summed), x and
    y then being whole grains (sharding.batch_shard). `scratch` holds the gradient
    buffers these need besides model.grads (scratch_for).
    Returns (loss sum, ok): this rank's sum of per-sample losses, or under deterministic
    the whole batch's, identical on every rank.
    """
    if tc and tc.deterministic:
        loss_sum, ok = grains_summed(model, loss_fn, x, y, N, comm, tc.grains, scratch)
        if not ok:
            return loss_sum, False
    else:
        loss_sum = micro_batches_summed(model, loss_fn, x, y, N, comm, tc, scratch)
    norm = grad_norm(model.grads)   # the same on every rank, as the sum is
    if not math.isfinite(norm):
        return loss_sum, False
    if tc and tc.clip_grad_norm and norm > tc.clip_grad_norm:
        model.grads *= tc.clip_grad_norm / (norm + 1e-6)   # as torch's clip_grad_norm_
    optimizer.step()
    return loss_sum, True


def micro_batches_summed(model, loss_fn, x, y, N, comm, tc, scratch):
    """model.grads = the global batch's gradient, summed over ranks; returns this rank's
    loss sum. With accumulation_steps = k the shard goes through as k micro-batches (the
    last never empty), the gradients of all but the last added up in scratch[0]."""
    k = tc.accumulation_steps if tc else 1
    loss_sum = 0.0
    for i in range(k):   # micro-batches: contiguous parts of the shard
        part = sharding.shard(len(x), i, k)
        outputs = model.forward(x[part])
        losses, doutputs = loss_fn(outputs, y[part], N)
        loss_sum += losses.sum()
        if not math.isfinite(loss_sum):
            doutputs[...] = np.nan            # NaN reaches every gradient, then every rank
        if i < k - 1:                         # all but the last: keep their gradients
            model.backward(doutputs)          # overwrites model.grads
            if i == 0:
                np.copyto(scratch[0], model.grads)
            else:
                scratch[0] += model.grads
    backward_and_sum(model, doutputs, comm, tc, scratch[0] if k > 1 else None)
    return loss_sum


def grains_summed(model, loss_fn, x, y, N, comm, grains, scratch):
    """train.deterministic: model.grads = the global batch's gradient, with the same bits
    at every world size; returns (the batch's loss sum, ok), identical on every rank.

    The batch is cut into `grains` parts whose rows never depend on the world size
    (sharding.grain_rows), and this rank's (x, y) are whole grains. Each grain's gradient
    is computed on its own, with single-threaded BLAS, so it has the same bits whichever
    rank computes it: into scratch[0], scratch[1], ... and the last into model.grads.
    Communicated, both collective, every rank calling them every step:
    - Allreduce(MAX) of a few floats: per parameter array, the largest |gradient| of any
      grain, and every grain's loss sum (-inf from the ranks that do not have it). Each
      grain's gradient is then rounded to the grid exact.grid picks from those maxima
      and added up on this rank, which is exact (dpbp/exact.py).
    - Allreduce(SUM) of model.grads, exact too, so any order gives the same bits.
    The loss is math.fsum of the grains' losses: exact, in grain order. A non-finite loss
    or gradient in any grain makes the agreed maxima non-finite, and so does a gradient
    too large for any grid (beyond about 1e34 in float32) or losses whose sum overflows:
    then ok = False on every rank, and the sum is skipped.
    """
    A = len(model.shapes)
    agreed = np.full(A + grains, -np.inf)   # max |gradient| per array, then grain losses
    agreed[:A] = 0.0
    offset = sharding.batch_shard(N, comm.rank, comm.size, grains).start
    mine = range(grains)[sharding.shard(grains, comm.rank, comm.size)]
    buffers = [scratch[n] for n in range(len(mine) - 1)] + [model.grads]
    if not mine:
        model.grads.fill(0)                   # a rank with no grain adds nothing
    grain_rows = sharding.grain_rows(N, grains)
    for j, grads in zip(mine, buffers):
        part = slice(grain_rows[j].start - offset, grain_rows[j].stop - offset)
        outputs = model.forward(x[part])
        losses, doutputs = loss_fn(outputs, y[part], N)
        loss = losses.sum()
        if not math.isfinite(loss):           # every rank will see an infinite maximum
            loss = math.inf
            doutputs[...] = np.nan
        model.backward(doutputs, grads)
        agreed[A + j] = loss
        for i, g in enumerate(model.split(grads)):
            agreed[i] = max(agreed[i], exact.abs_max(g))
    comm.allreduce_max_(agreed, like=model.grads)   # DP: the grids, every grain's loss
    grids = [exact.grid(largest, grains, model.grads.dtype) for largest in agreed[:A]]
    if None in grids or not np.isfinite(agreed[A:]).all():
        return math.inf, False
    try:
        loss = math.fsum(agreed[A:])
    except OverflowError:                     # finite grain losses beyond the float range
        return math.inf, False
    exact.add_rounded_([model.split(grads) for grads in buffers], grids)   # into model.grads
    comm.allreduce_(model.grads)              # DP: exact, the same bits in any order
    return loss, True


def scratch_for(tc, grads, comm):
    """The gradient buffers train_step needs besides `grads`, made once: the running sum
    of accumulation's micro-batches, or the gradients of this rank's grains but the last."""
    if tc.deterministic:
        n = max(sharding.shard_sizes(tc.grains, comm.size)[comm.rank] - 1, 0)
    else:
        n = 1 if tc.accumulation_steps > 1 else 0
    return np.empty((n, grads.size), grads.dtype)


def grad_norm(g):
    """The L2 norm of g: one BLAS dot, and in float64 only where float32 squares overflow
    (a finite gradient must not look non-finite); NaN or Inf in g give a non-finite norm."""
    norm = math.sqrt(np.dot(g, g))
    if math.isinf(norm) and g.dtype != np.float64:
        norm = math.sqrt(np.dot(g.astype(np.float64), g.astype(np.float64)))
    return norm


def backward_and_sum(model, doutputs, comm, tc, earlier):
    """Backward of the (last) micro-batch, plus the gradients of `earlier` ones if any,
    then model.grads summed over all ranks: in buckets overlapped with backward under
    comm.overlap, in 16 bits under a 16-bit comm_dtype, or with one Allreduce."""
    kind = tc.comm_dtype if tc else "float32"
    if comm.overlap and kind == "float32":   # DP: each bucket summed while backward goes on
        done = model.grads.size
        for ready in model.backward_steps(doutputs):
            if earlier is not None:
                model.grads[ready:done] += earlier[ready:done]
            done = ready
            comm.allreduce_ready_(model.grads, ready)
        comm.allreduce_wait()
        return
    model.backward(doutputs)
    if earlier is not None:
        model.grads += earlier
    if kind == "float32":
        comm.allreduce_(model.grads)          # DP: sum of shard gradients = global gradient
    else:
        comm.allreduce_16_(model.grads, kind)


def evaluate(model, loss_fn, x, y, num_classes, comm, block=EVAL_BLOCK):
    """Collective. (mean loss, accuracy or None) over (x, y), rows sharded across ranks.

    The rows go through the network in blocks of `block` at fixed offsets, the blocks
    sharded over the ranks (sharding.blocks), so every sample counts exactly once and is
    computed in the same block at every world size; each block with single-threaded BLAS
    (threads.blockwise), so its bits do not depend on the threads either. The per-sample
    losses are gathered and summed with math.fsum, which is exact, and the hits are
    counted in integers: the results do not depend on how the rows were split.
    """
    def losses_and_hits(rows):
        outputs = model.infer(x[rows])
        hits = correct(outputs, y[rows]) if num_classes else 0
        return loss_fn(outputs, y[rows], 1, need_grad=False)[0], hits

    mine = sharding.blocks(len(x), block, comm.rank, comm.size)
    counts = sharding.block_sizes(len(x), block, comm.size)
    done = blockwise(losses_and_hits, mine, blas_threads())
    losses = np.concatenate([np.empty(0)] + [losses for losses, _ in done])
    hits = sum(h for _, h in done)
    every_loss = comm.allgatherv_(losses, np.empty(len(x)), counts)   # DP: all samples
    total_hits = comm.allreduce_(np.array([hits], dtype=np.int64))[0]   # DP: exact count
    return math.fsum(every_loss) / len(x), (total_hits / len(x) if num_classes else None)


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    comm = mpi.init()
    with mpi.agreement(comm):
        args = PARSER.parse_args(argv)
    speaks = comm.rank == 0 and not args.quiet   # rank 0 speaks for all
    say = print if speaks else (lambda *a, **k: None)
    if speaks and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)   # each epoch's line as it ends, in pipes too
    setup = set_up(args, comm, say)
    if setup is None:   # --help, or a resumed run that is already complete
        return 0
    cfg, data, model, optimizer, start, lock = setup   # rank 0 holds the run dir's lock
    tc = cfg.train
    loss_fn = {"cross_entropy": cross_entropy, "mse": mse}[tc.loss]
    steps_per_epoch = sharding.num_batches(len(data.x), tc.batch_size)
    scratch = scratch_for(tc, model.grads, comm)
    grains = tc.grains if tc.deterministic else None
    watchdog = Watchdog(cfg.run.watchdog_seconds, comm.rank, end_hung_job)

    step = start["step"]
    with StopSignals() as signals, StopVote(comm, signals) as vote:
        for epoch in range(start["epoch"], tc.epochs):
            t0 = time.perf_counter()
            order = sharding.epoch_order(len(data.x), cfg.run.seed, epoch, cfg.data.shuffle)
            batches = sharding.global_batches(order, tc.batch_size)
            first = start["batch"] if epoch == start["epoch"] else 0   # mid-epoch resume
            loss_sum, counted, skipped = ((start["loss_sum"], start["counted"],
                                           start["skipped"]) if first else (0.0, 0, 0))
            bar = progress_bar(speaks, len(batches), first, f"epoch {epoch + 1}/{tc.epochs}")
            stop = 0
            for b in range(first, len(batches)):
                # every rank: train on its shard of global batch b
                watchdog.feed()
                bar.update()
                rows = batches[b][sharding.batch_shard(len(batches[b]), comm.rank,
                                                       comm.size, grains)]
                x, y = data.x[rows], data.y[rows]
                faults.inject(comm.rank, step, x, model.params)   # test hook, off by default
                optimizer.lr = schedule.lr_at(tc, step, steps_per_epoch)
                with np.errstate(over="ignore", invalid="ignore"):   # non-finite: caught
                    loss, ok = train_step(model, optimizer, loss_fn, x, y, len(batches[b]),
                                          comm, tc, scratch)
                step += 1
                if ok:
                    loss_sum, counted = loss_sum + loss, counted + len(batches[b])
                else:
                    skipped += 1
                    stop_on_nonfinite(comm, tc.on_nonfinite, epoch + 1, b + 1, step)
                if cfg.run.sync_check_steps and step % cfg.run.sync_check_steps == 0:
                    check_replicas(comm, model, f"by step {step}")
                stop = vote.poll()   # DP: the ranks agree to stop, one step behind
                due = tc.checkpoint_every_steps and step % tc.checkpoint_every_steps == 0
                if b + 1 < len(batches) and (stop or due):
                    position = (epoch, b + 1, step, skipped, counted)
                    path = save_checkpoint(comm, cfg, model, optimizer, position, loss_sum)
                    if stop:
                        return stopped_by(stop, path, epoch, b + 1, say)
            watchdog.feed()
            bar.close()
            # every rank: the epoch's loss, then validation on its share of the rows
            train_seconds = time.perf_counter() - t0
            trained = sum(len(batch) for batch in batches[first:])   # rows in this process
            # the epoch's loss: summed over ranks, or under deterministic already whole
            total = loss_sum if tc.deterministic else comm.allreduce_(np.array([loss_sum]))[0]
            train_loss = total / counted if counted else None   # None: every step skipped
            val_loss, val_accuracy = None, None
            with np.errstate(over="ignore", invalid="ignore"):   # divergence is caught below
                if data.x_val is not None:
                    val_loss, val_accuracy = evaluate(model, loss_fn, data.x_val, data.y_val,
                                                      data.num_classes, comm)
            stop_unless_finite(comm, epoch + 1, total, val_loss)
            check_replicas(comm, model, f"in epoch {epoch + 1}")
            watchdog.feed()
            record = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss,
                          val_accuracy=val_accuracy, lr=optimizer.lr,
                          seconds=time.perf_counter() - t0,
                          samples_per_second=trained / train_seconds,
                          world_size=comm.size, skipped_steps=skipped)
            path = save_checkpoint(comm, cfg, model, optimizer, (epoch + 1, 0, step, 0, 0),
                                   0.0, record)
            say(format_epoch(record, tc.epochs))
            if stop and epoch + 1 < tc.epochs:   # agreed in the epoch's last step
                return stopped_by(stop, path, epoch + 1, 0, say)
    watchdog.stop()
    weights = hashlib.sha256(model.params.tobytes()).hexdigest()[:16]   # to compare runs
    say(f"done: {plural(tc.epochs, 'epoch')}; weights sha256 {weights}; checkpoint "
        f"{checkpoint.path_for(cfg.run.dir, tc.epochs)}, "
        f"metrics {run_dir.metrics_path(cfg.run.dir)}")
    return 0


def end_hung_job():
    """The watchdog's last act, on the first rank whose watchdog fires."""
    time.sleep(2)   # the other ranks' watchdogs fire too: let them print their stacks
    mpi.abort(EXIT_HUNG)


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


def progress_bar(speaks, total, done, description):
    """A progress bar of the epoch's steps on rank 0 when stdout is a terminal (not in logs
    or CI), and under --quiet never."""
    if not (speaks and sys.stdout.isatty()):
        return _NoBar()
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc=description, unit="step", leave=False,
                file=sys.stdout, dynamic_ncols=True)


def save_checkpoint(comm, cfg, model, optimizer, position, loss_sum, record=None):
    """Collective. Rank 0 writes the checkpoint at `position` = (epoch, batch, step,
    skipped, counted), with every rank's partial loss sum (so that a resumed epoch adds up
    its loss exactly as an uninterrupted one), and `record`'s metrics at an epoch's end.
    A failure to write (a full disk) stops every rank. Returns the path."""
    if cfg.train.deterministic and comm.rank > 0:
        loss_sum = 0.0   # every rank holds the whole batch's sum: rank 0 saves it
    sums = comm.allgatherv_(np.array([loss_sum]), np.empty(comm.size), [1] * comm.size)
    with mpi.agreement(comm):
        if comm.rank == 0:
            run_dir.save(cfg, model, optimizer, position, comm.size, sums, record)
    return checkpoint.path_for(cfg.run.dir, *position[:2])


def stopped_by(signum, path, epoch, batch, say):
    say(f"dpbp: stopped by {signal_name(signum)} after {plural(epoch, 'epoch')} and "
        f"{plural(batch, 'batch', 'batches')}; saved {path}; continue with --resume")
    return 128 + signum


def stop_on_nonfinite(comm, policy, epoch, batch, step):
    """Collective. After a step whose loss or summed gradient was not finite (the same
    step on every rank): stop every rank under "stop"; under "skip" the step was dropped."""
    with mpi.agreement(comm, code=EXIT_DIVERGED):
        if policy == "stop":
            raise UserError(f"non-finite loss or gradient in epoch {epoch}, batch {batch} "
                            f"(step {step}); nothing after the last checkpoint was saved. Lower "
                            "train.lr, "
                            'set train.clip_grad_norm, or skip such steps with '
                            'train.on_nonfinite = "skip"')


def check_replicas(comm, model, when):
    """Collective. Stop every rank, before anything more is saved, if the ranks'
    parameters differ; `when` says where in the run (for the message)."""
    identical = comm.replicas_identical(model.params)
    with mpi.agreement(comm, code=EXIT_DIVERGED):
        if not identical:
            raise UserError(f"replicas diverged {when}: the ranks' parameters differ (a "
                            "fault in a node or in MPI); nothing more was saved")


def plural(n, noun, nouns=None):
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def stop_unless_finite(comm, epoch, train_loss_sum, val_loss):
    """Collective. Stop every rank, before anything more is saved, if the epoch's losses
    are not finite."""
    with mpi.agreement(comm, code=EXIT_DIVERGED):
        if not math.isfinite(train_loss_sum) or (val_loss is not None
                                                 and not math.isfinite(val_loss)):
            raise UserError(f"training diverged in epoch {epoch}: train loss sum "
                            f"{train_loss_sum}, val loss {val_loss}; nothing after the last "
                            "checkpoint was saved. Lower train.lr, or start from an earlier "
                            "checkpoint")


def format_epoch(r, epochs):
    val = "val_loss -  val_acc -" if r["val_loss"] is None else (
        f"val_loss {r['val_loss']:.4f}  val_acc "
        + ("-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"))
    train = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
    return (f"epoch {r['epoch']:>{len(str(epochs))}}/{epochs}  train_loss {train}"
            f"  {val}  lr {r['lr']:g}  {r['seconds']:.2f} s  "
            f"{r['samples_per_second']:,.0f} samples/s")


# ----------------------------------------------------------------------------- set-up

def set_up(args, comm, say):
    """Collective. Resolve the config (on --resume, the checkpoint's own
    with the command line's changes on top), load data, build model and optimizer, and
    prepare the run directory. Bad input on any rank stops every rank with one message
    and nothing written. Returns (cfg, data, model, optimizer, start, lock), or None after
    --help or --print-config, or for a resumed run that is already complete. start = the
    position to continue from (epoch, batch, step, skipped, counted, and this rank's
    partial loss_sum); lock = the run directory's lock on rank 0 (None elsewhere)."""
    if args.help:
        say(PARSER.format_help(), end="")
        return None

    ckpt_path, state, damaged = None, None, []   # rank 0, on --resume: the checkpoint
    with mpi.agreement(comm):
        cfg = config.load(args.config, args.set)
        if args.resume is True and comm.rank == 0:
            ckpt_path, state, damaged = run_dir.newest_checkpoint(cfg.run.dir)
        elif args.resume and comm.rank == 0:
            ckpt_path, state = args.resume, run_dir.checked(args.resume)
    saved = comm.bcast_obj(None if state is None else (ckpt_path, state["config"]))
    notes = [f"resume: {path} is damaged ({why}); set aside as {os.path.basename(path)}"
             ".damaged" for path, why in damaged]
    with mpi.agreement(comm):
        if saved is not None:
            ckpt_path, saved_toml = saved
            cfg, more_notes = run_dir.resumed_config(
                saved_toml, ckpt_path, args.config, args.set,
                cfg.run.dir if args.resume is True else None)
            notes += more_notes
        if args.print_config:
            say(run_dir.CONFIG_HEADER + config.to_toml(cfg), end="")
            return None
        try:
            data = datasets.load(cfg.data, cfg.train.loss, cfg.model.dtype, cfg.run.seed)
        except MemoryError:
            raise UserError(f"the {cfg.data.source} data does not fit in memory") from None
        widths = [data.num_inputs, *cfg.model.hidden, data.num_outputs]
        try:
            model = MLP(widths, cfg.model.activation, cfg.model.dtype)
        except MemoryError:
            raise UserError(f"the network {'-'.join(map(str, widths))} does not fit in "
                            "memory; check model.hidden and the number of classes") from None
        model.init_(np.random.default_rng([cfg.run.seed, 0x1417]))
        if cfg.model.init and saved is None:   # a resumed run has its own weights
            checkpoint.load_weights(model, cfg.model.init)
        tc = cfg.train
        optimizer = SGD(model.params, model.grads, schedule.base_lr(tc), tc.momentum,
                        tc.nesterov, tc.weight_decay)
        if comm.rank == 0 and state is not None:
            checkpoint.restore(state, ckpt_path, model, optimizer)

    threads, why = limit_blas_threads(comm.ranks_sharing_cores, tc.deterministic)

    # DP: every rank must have read the same config and data; then replicas start
    # identical, parameters and optimizer state coming from rank 0.
    same_inputs = comm.replicas_identical(fingerprint(cfg, data))
    with mpi.agreement(comm):
        if not same_inputs:
            raise UserError("the ranks loaded different configs or data; check that every "
                            "node sees the same files")
    arith = arithmetic() if tc.deterministic else None
    if tc.deterministic:   # DP: the same bits need the same arithmetic on every rank
        mine = faults.arithmetic(comm.rank, arith)
        first = comm.bcast_obj(mine)
        with mpi.agreement(comm):
            if mine != first:
                raise UserError(f"train.deterministic: rank {comm.rank} computes with {mine}, "
                                f"rank 0 with {first}; the same bits need the same CPU type, "
                                "numpy and BLAS on every node (or train.deterministic = false)")
    comm.bcast_(model.params)
    if optimizer.momentum_buffer is not None:
        comm.bcast_(optimizer.momentum_buffer)
    start = comm.bcast_obj(
        dict(epoch=0, batch=0, step=0, skipped=0, counted=0, loss_sums=[0.0], world_size=1)
        if state is None else {k: state[k] for k in (*checkpoint.COUNTERS, "loss_sums")})
    sums = start.pop("loss_sums")   # each rank's partial loss sum of a mid-epoch checkpoint
    if tc.deterministic:                   # every rank holds the whole batch's partial sum
        start["loss_sum"] = math.fsum(sums)
    elif start["world_size"] == comm.size:
        start["loss_sum"] = float(sums[comm.rank])
    else:                                  # saved by another world: rank 0 carries it all
        start["loss_sum"] = math.fsum(sums) if comm.rank == 0 else 0.0
    if start["epoch"] >= tc.epochs:   # before prepare: a finished run is left untouched
        say(f"nothing to do: the run in {cfg.run.dir} already completed "
            f"{plural(start['epoch'], 'epoch')} of {tc.epochs}")
        return None
    lock = None
    with mpi.agreement(comm):
        if comm.rank == 0:
            lock, more_notes = run_dir.prepare(cfg, (start["epoch"], start["batch"]),
                                               ckpt_path, [p for p, _ in damaged])
            notes = notes + more_notes

    say(describe_run(comm, threads, why, cfg, data, model, arith))
    if saved is not None:
        say(f"resume: from {ckpt_path} (epoch {start['epoch']}, batch {start['batch']}, "
            f"step {start['step']})")
    if tc.lr_scaling == "linear":
        say(f"lr: {tc.lr:g} x {tc.batch_size} / {tc.base_batch_size} = "
            f"{schedule.base_lr(tc):g} (linear scaling)")
    for note in notes:
        say(note)
    return cfg, data, model, optimizer, start, lock


def describe_run(comm, threads, why, cfg, data, model, arith):
    """The start-up lines: world, data, model, batch, and under deterministic the
    arithmetic every rank shares (threads.arithmetic)."""
    tc = cfg.train
    joined = lambda sizes: "-".join(map(str, sorted(set(sizes))))   # noqa: E731
    per_rank = sharding.shard_sizes(tc.batch_size, comm.size)
    batch = f"batch: global {tc.batch_size}, per rank {joined(per_rank)}"
    if tc.deterministic:
        per_rank = sharding.shard_sizes(tc.grains, comm.size)
        batch = (f"batch: global {tc.batch_size} in {plural(tc.grains, 'grain')} of "
                 f"{joined(sharding.shard_sizes(tc.batch_size, tc.grains))} rows, "
                 f"{joined(per_rank)} grain{'s' * (per_rank != [1] * comm.size)} per rank "
                 "(deterministic)")
    steps = sharding.num_batches(len(data.x), tc.batch_size)
    lines = [
        f"dpbp {__version__}: {plural(comm.size, 'rank')} ({comm.library}), "
        f"{plural(threads, 'BLAS thread')} per rank ({why})",
        f"data: {cfg.data.source}, {data.describe()}",
        f"model: {'-'.join(map(str, model.widths))} {cfg.model.activation} "
        f"{cfg.model.dtype}, {model.params.size:,} parameters; loss {tc.loss}",
        f"{batch}; {plural(steps, 'step')} per epoch; run dir {cfg.run.dir}"]
    if tc.deterministic:
        lines.append(f"arithmetic: {arith}, the same on every rank")
    if tc.deterministic and tc.grains % comm.size:
        lines.append(f"note: {plural(tc.grains, 'grain')} do not split evenly over "
                     f"{plural(comm.size, 'rank')}; train.grains = a multiple of {comm.size} "
                     "balances the work (and gives other bits)")
    return "\n".join(lines)


def fingerprint(cfg, data):
    """CRCs of the resolved config and of every data array, to compare across ranks."""
    arrays = [data.x, data.y] + ([data.x_val, data.y_val] if data.x_val is not None else [])
    crcs = [zlib.crc32(config.to_toml(cfg).encode())]
    crcs += [datasets.crc32(a) for a in arrays]   # block by block: data may stay on disk
    return np.array(crcs, dtype=np.int64)


def _epilog():
    lines = ["config keys and their defaults (configs/default.toml spells them out):"]
    for section, keys in config.defaults_by_section().items():
        lines.append(f"  [{section}]  " + ", ".join(f"{k} = {v}" for k, v in keys.items()))
    lines += ["", "exit codes: 0 done; 2 bad input (config, data, run directory, checkpoint), "
              "reported once;", f"  {EXIT_DIVERGED} a non-finite loss or gradient, or "
              "replicas that differ: nothing after the last checkpoint saved;",
              f"  {EXIT_HUNG} the watchdog ended the job: no step finished in "
              "run.watchdog_seconds;",
              "  128+N stopped by signal N (143 SIGTERM, 130 SIGINT) after saving a "
              "checkpoint: --resume continues;",
              "  any other non-zero code: a rank failed and the job was ended."]
    return "\n".join(lines)


PARSER = ArgumentParser(
    prog="python -m dpbp.train", add_help=False,
    formatter_class=argparse.RawDescriptionHelpFormatter,
    description="Data-parallel training of a multilayer perceptron. Run as one process, "
                "or as N ranks\nwith: mpirun -n N python -m dpbp.train [options]",
    epilog=_epilog())
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("--config", metavar="PATH",
                    help="TOML config file; without it the built-in defaults")
PARSER.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                    help="override one config key, VALUE in TOML syntax (repeatable), "
                         "e.g. --set train.lr=0.05 --set 'model.hidden=[256,128]' "
                         "--set 'data.source=\"npz\"'")
PARSER.add_argument("--resume", metavar="PATH", nargs="?", const=True, default=None,
                    help="continue the run in run.dir from its newest valid checkpoint, or "
                         "from the checkpoint PATH, with its saved config; --config and --set "
                         "change it (not the network or the global batch). With PATH and a "
                         "new run.dir, the run branches off into that directory")
PARSER.add_argument("--print-config", action="store_true",
                    help="print the resolved config (TOML, overrides applied) and exit; "
                         "saved and passed back with --config, it gives the same run")
PARSER.add_argument("--quiet", action="store_true",
                    help="print nothing but errors (no start-up lines, epochs or progress bar)")


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
