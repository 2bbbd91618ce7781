"""Data-parallel training of a multilayer perceptron, in one process or many under MPI.

    python -m dpbp.train                      # one process
    mpirun -n 4 python -m dpbp.train          # four ranks, the same result to rounding

Every rank holds a full replica of the model, computes gradients on its own shard of
each global minibatch, and the gradients are summed with one Allreduce; every rank then
applies the same SGD update, so the replicas stay identical. Rank 0 logs and writes a
checkpoint every epoch.
"""

import argparse
import math
import sys
import time
import zlib

import numpy as np

from dpbp import __version__, checkpoint, comm as mpi, config, data as datasets, faults
from dpbp import run_dir, sharding
from dpbp.errors import UserError
from dpbp.losses import correct, cross_entropy, mse
from dpbp.model import MLP
from dpbp.optim import SGD
from dpbp.threads import limit_blas_threads

EXIT_DIVERGED = 3   # training stopped: a non-finite loss, or replicas that differ


# ----------------------------------------------------------------------------- one step

def train_step(model, optimizer, loss_fn, x, y, N, comm):
    """One data-parallel SGD step on this rank's shard (x, y) of a global batch of N rows.

    The data-parallel contract:
    - Identical on every rank before the call: model.params, the optimizer state, N.
    - Each rank passes its own rows of the global batch; a rank may have none (B = 0).
    - Communicated: the flat gradient buffer, summed with Allreduce(SUM): once after
      backpropagation, or, with comm.overlap, in buckets started as backpropagation
      finishes them (non-blocking; the same sums, to rounding beyond 2 ranks, where MPI
      may add the ranks' values in another order). It is collective: every rank calls it
      every step, ranks with no rows included, and all ranks must agree on comm.overlap.
    - The loss gradient is normalised by the global N, not by B, so the sum over ranks is
      the gradient of the global batch's mean loss: what one process computes on the
      whole batch, up to floating-point rounding.
    - Never communicated: parameters, activations, per-step losses.
    - Identical on every rank after the call: model.params and the optimizer state, since
      every rank applies the same update to the same summed gradient.
    Returns this rank's sum of per-sample losses.
    """
    outputs = model.forward(x)
    losses, doutputs = loss_fn(outputs, y, N)
    if comm.overlap:   # DP: each bucket of gradients is summed while backward goes on
        for ready in model.backward_steps(doutputs):
            comm.allreduce_ready_(model.grads, ready)
        comm.allreduce_wait()
    else:
        model.backward(doutputs)
        comm.allreduce_(model.grads)      # DP: sum of shard gradients = global gradient
    optimizer.step()
    return losses.sum()


def train_epoch(model, optimizer, loss_fn, data, cfg, epoch, step, comm):
    """Collective. One epoch over the training set, its first optimizer step numbered
    `step`; returns the mean training loss."""
    order = sharding.epoch_order(len(data.x), cfg.run.seed, epoch, cfg.data.shuffle)
    loss_sum = 0.0
    for k, batch in enumerate(sharding.global_batches(order, cfg.train.batch_size)):
        faults.inject(comm.rank, step + k)   # test hook, off unless DPBP_FAULT is set
        rows = batch[sharding.shard(len(batch), comm.rank, comm.size)]   # DP: my shard
        loss_sum += train_step(model, optimizer, loss_fn, data.x[rows], data.y[rows],
                               len(batch), comm)
    total = comm.allreduce_(np.array([loss_sum]))                      # DP: epoch total
    return total[0] / len(data.x)


def evaluate(model, loss_fn, x, y, num_classes, comm, chunk=2048):
    """Collective. (mean loss, accuracy or None) over (x, y), rows sharded across ranks.

    Each rank takes a contiguous block of rows, so every sample counts exactly once: no
    padding, no duplicates. The per-sample losses are gathered and summed with math.fsum,
    which is exact, so the mean does not depend on how the rows were split.
    """
    counts = sharding.shard_sizes(len(x), comm.size)
    mine = sharding.shard(len(x), comm.rank, comm.size)
    losses, hits = np.empty(counts[comm.rank]), 0
    for start in range(mine.start, mine.stop, chunk):
        rows = slice(start, min(start + chunk, mine.stop))
        outputs = model.forward(x[rows])
        losses[rows.start - mine.start:rows.stop - mine.start] = loss_fn(
            outputs, y[rows], 1, need_grad=False)[0]
        hits += correct(outputs, y[rows]) if num_classes else 0
    every_loss = comm.allgatherv_(losses, np.empty(len(x)), counts)   # DP: all samples
    total_hits = comm.allreduce_(np.array([hits], dtype=np.int64))[0]   # DP: exact count
    return math.fsum(every_loss) / len(x), (total_hits / len(x) if num_classes else None)


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    comm = mpi.init()
    say = print if comm.rank == 0 else (lambda *a, **k: None)   # rank 0 speaks for all
    if comm.rank == 0 and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)   # each epoch's line as it ends, in pipes too
    setup = set_up(argv, comm, say)
    if setup is None:   # --help, or a resumed run that is already complete
        return 0
    cfg, data, model, optimizer, start, lock = setup   # rank 0 holds the run dir's lock
    loss_fn = {"cross_entropy": cross_entropy, "mse": mse}[cfg.train.loss]
    steps_per_epoch = sharding.num_batches(len(data.x), cfg.train.batch_size)
    epochs = cfg.train.epochs

    step = start["step"]
    for epoch in range(start["epoch"], epochs):
        t0 = time.perf_counter()
        # every rank: train on its shards, validate on its share, check replicas agree
        with np.errstate(over="ignore", invalid="ignore"):   # divergence is caught below
            train_loss = train_epoch(model, optimizer, loss_fn, data, cfg, epoch, step, comm)
            train_seconds = time.perf_counter() - t0
            val_loss, val_accuracy = None, None
            if data.x_val is not None:
                val_loss, val_accuracy = evaluate(model, loss_fn, data.x_val, data.y_val,
                                                  data.num_classes, comm)
        stop_unless_healthy(comm, model, epoch + 1, train_loss, val_loss)
        step += steps_per_epoch
        record = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss,
                      val_accuracy=val_accuracy, lr=cfg.train.lr,
                      seconds=time.perf_counter() - t0,
                      samples_per_second=len(data.x) / train_seconds, world_size=comm.size)
        with mpi.agreement(comm):          # rank 0 alone writes; a full disk stops all
            if comm.rank == 0:
                run_dir.save_epoch(cfg, model, optimizer, step, comm.size, record)
        say(format_epoch(record, epochs))
    say(f"done: {plural(epochs, 'epoch')}; checkpoint "
        f"{checkpoint.path_for(cfg.run.dir, epochs)}, metrics {run_dir.metrics_path(cfg.run.dir)}")
    return 0


def plural(n, noun):
    return f"{n} {noun}{'s' * (n != 1)}"


def stop_unless_healthy(comm, model, epoch, train_loss, val_loss):
    """Collective. Stop every rank, before anything is saved, if the losses are not finite
    or the replicas no longer hold identical parameters."""
    identical = comm.replicas_identical(model.params)
    with mpi.agreement(comm, code=EXIT_DIVERGED):
        if not math.isfinite(train_loss) or (val_loss is not None and not math.isfinite(val_loss)):
            raise UserError(f"training diverged in epoch {epoch}: train loss {train_loss}, "
                            f"val loss {val_loss}; nothing of this epoch was saved. Lower "
                            "train.lr, or start from an earlier checkpoint")
        if not identical:
            raise UserError(f"replicas diverged in epoch {epoch}: the ranks' parameters "
                            "differ (a fault in a node or in MPI); nothing was saved")


def format_epoch(r, epochs):
    val = "val_loss -  val_acc -" if r["val_loss"] is None else (
        f"val_loss {r['val_loss']:.4f}  val_acc "
        + ("-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"))
    return (f"epoch {r['epoch']:>{len(str(epochs))}}/{epochs}  train_loss {r['train_loss']:.4f}"
            f"  {val}  lr {r['lr']:g}  {r['seconds']:.2f} s  "
            f"{r['samples_per_second']:,.0f} samples/s")


# ----------------------------------------------------------------------------- set-up

def set_up(argv, comm, say):
    """Collective. Parse arguments, resolve the config (on --resume, the checkpoint's own
    with the command line's changes on top), load data, build model and optimizer, and
    prepare the run directory. Bad input on any rank stops every rank with one message
    and nothing written. Returns (cfg, data, model, optimizer, start, lock), or None after
    --help or for a resumed run that is already complete; start = {"epoch", "step"} to
    continue from, lock = the run directory's lock on rank 0 (None elsewhere)."""
    with mpi.agreement(comm):
        args = parse_args(argv)
    if args.help:
        say(PARSER.format_help(), end="")
        return None
    threads, why = limit_blas_threads(comm.ranks_sharing_cores)

    ckpt_path, state = None, None       # rank 0, on --resume: the newest checkpoint
    with mpi.agreement(comm):
        cfg = config.load(args.config, args.set)
        if args.resume and comm.rank == 0:
            ckpt_path, state = run_dir.newest_checkpoint(cfg.run.dir)
    saved = comm.bcast_obj(None if state is None else (ckpt_path, state["config"]))
    notes = []
    with mpi.agreement(comm):
        if saved is not None:
            ckpt_path, saved_toml = saved
            cfg, notes = run_dir.resumed_config(saved_toml, ckpt_path, cfg.run.dir,
                                                args.config, args.set)
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
        optimizer = SGD(model.params, model.grads, tc.lr, tc.momentum, tc.nesterov,
                        tc.weight_decay)
        if comm.rank == 0:
            if state is None:
                notes = run_dir.check_new(cfg)
            else:
                checkpoint.restore(state, ckpt_path, model, optimizer)

    # DP: every rank must have read the same config and data; then replicas start
    # identical, parameters and optimizer state coming from rank 0.
    same_inputs = comm.replicas_identical(fingerprint(cfg, data))
    with mpi.agreement(comm):
        if not same_inputs:
            raise UserError("the ranks loaded different configs or data; check that every "
                            "node sees the same files")
    comm.bcast_(model.params)
    if optimizer.momentum_buffer is not None:
        comm.bcast_(optimizer.momentum_buffer)
    start = comm.bcast_obj({"epoch": 0, "step": 0} if state is None else
                           {"epoch": state["epoch"], "step": state["step"]})
    if start["epoch"] >= tc.epochs:   # before prepare: a finished run is left untouched
        say(f"nothing to do: the run in {cfg.run.dir} already completed "
            f"{plural(start['epoch'], 'epoch')} of {tc.epochs}")
        return None
    lock = None
    with mpi.agreement(comm):
        if comm.rank == 0:
            lock, more_notes = run_dir.prepare(cfg, start["epoch"])
            notes = notes + more_notes

    say(describe_run(comm, threads, why, cfg, data, model))
    if saved is not None:
        say(f"resume: from {ckpt_path} (epoch {start['epoch']}, step {start['step']})")
    for note in notes:
        say(note)
    return cfg, data, model, optimizer, start, lock


def describe_run(comm, threads, why, cfg, data, model):
    """The start-up lines: world, data, model, batch."""
    per_rank = sorted(set(sharding.shard_sizes(cfg.train.batch_size, comm.size)))
    steps = sharding.num_batches(len(data.x), cfg.train.batch_size)
    return "\n".join([
        f"dpbp {__version__}: {plural(comm.size, 'rank')} ({comm.library}), "
        f"{plural(threads, 'BLAS thread')} per rank ({why})",
        f"data: {cfg.data.source}, {data.describe()}",
        f"model: {'-'.join(map(str, model.widths))} {cfg.model.activation} "
        f"{cfg.model.dtype}, {model.params.size:,} parameters; loss {cfg.train.loss}",
        f"batch: global {cfg.train.batch_size}, per rank {'-'.join(map(str, per_rank))}; "
        f"{plural(steps, 'step')} per epoch; run dir {cfg.run.dir}"])


def fingerprint(cfg, data):
    """CRCs of the resolved config and of every data array, to compare across ranks."""
    arrays = [data.x, data.y] + ([data.x_val, data.y_val] if data.x_val is not None else [])
    crcs = [zlib.crc32(config.to_toml(cfg).encode())]
    crcs += [zlib.crc32(np.ascontiguousarray(a).view(np.uint8)) for a in arrays]
    return np.array(crcs, dtype=np.int64)


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # a UserError, so ranks agree and report it once
        raise UserError(f"{message} (see python -m dpbp.train --help)")


def _epilog():
    lines = ["config keys and their defaults (configs/default.toml spells them out):"]
    for section, keys in config.defaults_by_section().items():
        lines.append(f"  [{section}]  " + ", ".join(f"{k} = {v}" for k, v in keys.items()))
    lines += ["", "exit codes: 0 done; 2 bad input (config, data, run directory, checkpoint), "
              "reported once;", f"  {EXIT_DIVERGED} training diverged (a loss not finite) "
              "or replicas differ, nothing of that epoch saved;",
              "  any other non-zero code: a rank failed and the job was ended."]
    return "\n".join(lines)


PARSER = _Parser(
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
PARSER.add_argument("--resume", action="store_true",
                    help="continue the run in run.dir from its newest checkpoint, with its "
                         "saved config; --config and --set change it (not the network or "
                         "the global batch)")


def parse_args(argv):
    return PARSER.parse_args(argv)


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
