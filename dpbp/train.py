"""Data-parallel training of a multilayer perceptron, in one process or many under MPI.

    python -m dpbp.train                      # one process
    mpirun -n 4 python -m dpbp.train          # four ranks, the same result to rounding

Every rank holds a full replica of the model, computes gradients on its own shard of
each global minibatch, and the gradients are summed with one Allreduce; every rank then
applies the same SGD update, so the replicas stay identical. Rank 0 logs and writes a
checkpoint every epoch.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

from dpbp import __version__, checkpoint, comm as mpi, config, data as datasets, faults, sharding
from dpbp.errors import UserError
from dpbp.losses import LOSSES, correct
from dpbp.model import MLP
from dpbp.optim import SGD
from dpbp.threads import limit_blas_threads

# Keys a resumed run may not change: they define the network or the global batch.
FIXED_ON_RESUME = ("model.hidden", "model.activation", "train.loss", "train.batch_size")


# ----------------------------------------------------------------------------- one step

def train_step(model, optimizer, loss_fn, x, y, N, comm):
    """One data-parallel SGD step on this rank's shard (x, y) of a global batch of N rows.

    The data-parallel contract:
    - Identical on every rank before the call: model.params, the optimizer state, N.
    - Each rank passes its own rows of the global batch; a rank may have none (B = 0).
    - Communicated: the flat gradient buffer, once, with Allreduce(SUM). It is collective:
      every rank calls it every step, ranks with no rows included.
    - The loss gradient is normalised by the global N, not by B, so the sum over ranks is
      the gradient of the global batch's mean loss: what one process computes on the
      whole batch, up to floating-point rounding.
    - Never communicated: parameters, activations, per-step losses.
    - Identical on every rank after the call: model.params and the optimizer state, since
      every rank applies the same update to the same summed gradient.
    Returns this rank's sum of per-sample losses.
    """
    outputs = model.forward(x)
    loss_sum, doutputs = loss_fn(outputs, y, N)
    model.backward(doutputs)
    comm.allreduce_(model.grads)          # DP: sum of shard gradients = global gradient
    optimizer.step()
    return loss_sum


def train_epoch(model, optimizer, loss_fn, data, cfg, epoch, step, comm):
    """Collective. One epoch over the training set, the first optimizer step numbered
    `step`; returns the mean training loss."""
    order = sharding.epoch_order(len(data.x), cfg.run.seed, epoch, cfg.data.shuffle)
    loss_sum = 0.0
    for k, batch in enumerate(sharding.global_batches(order, cfg.train.batch_size)):
        faults.inject(comm.rank, step + k)
        rows = batch[sharding.shard(len(batch), comm.rank, comm.size)]   # DP: my shard
        loss_sum += train_step(model, optimizer, loss_fn, data.x[rows], data.y[rows],
                               len(batch), comm)
    total = comm.allreduce_(np.array([loss_sum]))                      # DP: epoch total
    return total[0] / len(data.x)


def evaluate(model, loss_fn, x, y, num_classes, comm, chunk=2048):
    """Collective. (mean loss, accuracy or None) over (x, y), rows sharded across ranks.

    Each rank takes a contiguous block of rows, so every sample counts exactly once: no
    padding, no duplicates, and the same sums at any world size.
    """
    mine = sharding.shard(len(x), comm.rank, comm.size)
    loss_sum, hits = 0.0, 0
    for start in range(mine.start, mine.stop, chunk):
        rows = slice(start, min(start + chunk, mine.stop))
        outputs = model.forward(x[rows])
        loss_sum += loss_fn(outputs, y[rows], 1, need_grad=False)[0]
        hits += correct(outputs, y[rows]) if num_classes else 0
    total = comm.allreduce_(np.array([loss_sum, hits], dtype=np.float64))
    return total[0] / len(x), (total[1] / len(x) if num_classes else None)


# ----------------------------------------------------------------------------- the run

def main(argv=None):
    comm = mpi.init()
    say = print if comm.rank == 0 else (lambda *a, **k: None)   # rank 0 speaks for all
    if comm.rank == 0 and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)   # each epoch's line as it ends, in pipes too
    setup = set_up(argv, comm, say)
    if setup is None:
        return 0
    cfg, data, model, optimizer, start = setup
    loss_fn, t = LOSSES[cfg.train.loss], cfg.train
    steps_per_epoch = sharding.num_batches(len(data.x), t.batch_size)
    if start["epoch"] >= t.epochs:
        say(f"nothing to do: the run already completed {start['epoch']} of {t.epochs} epochs")
        return 0

    step = start["step"]
    for epoch in range(start["epoch"], t.epochs):
        t0 = time.perf_counter()
        # every rank: train on its shards, validate on its share, check replicas agree
        train_loss = train_epoch(model, optimizer, loss_fn, data, cfg, epoch, step, comm)
        train_seconds = time.perf_counter() - t0
        val_loss, val_accuracy = (None, None) if data.x_val is None else evaluate(
            model, loss_fn, data.x_val, data.y_val, data.num_classes, comm)
        if not comm.replicas_identical(model.params):
            raise RuntimeError(f"replicas diverged in epoch {epoch + 1}: parameters differ "
                               "between ranks")
        step += steps_per_epoch
        record = dict(epoch=epoch + 1, train_loss=train_loss, val_loss=val_loss,
                      val_accuracy=val_accuracy, lr=t.lr, seconds=time.perf_counter() - t0,
                      samples_per_second=len(data.x) / train_seconds, world_size=comm.size)
        # rank 0 alone: checkpoint and metrics (no collective in here)
        if comm.rank == 0:
            save_epoch(cfg, model, optimizer, step, comm.size, record)
        say(format_epoch(record, t.epochs))
    say(f"done: {t.epochs} epochs; checkpoint {checkpoint.path_for(cfg.run.dir, t.epochs)}, "
        f"metrics {metrics_path(cfg)}")
    return 0


def save_epoch(cfg, model, optimizer, step, world_size, record):
    """Rank 0: the epoch's checkpoint, then its line of metrics."""
    epoch = record["epoch"]
    checkpoint.save(checkpoint.path_for(cfg.run.dir, epoch), model, optimizer, epoch, step,
                    world_size, config.to_toml(cfg))
    with open(metrics_path(cfg), "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def format_epoch(r, epochs):
    val = "val_loss -  val_acc -" if r["val_loss"] is None else (
        f"val_loss {r['val_loss']:.4f}  val_acc "
        + ("-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"))
    return (f"epoch {r['epoch']:>{len(str(epochs))}}/{epochs}  train_loss {r['train_loss']:.4f}"
            f"  {val}  lr {r['lr']:g}  {r['seconds']:.2f} s  "
            f"{r['samples_per_second']:,.0f} samples/s")


# ----------------------------------------------------------------------------- set-up

def set_up(argv, comm, say):
    """Collective. Parse arguments, load config and data, build the model and optimizer,
    and (rank 0) check or resume the run directory; bad input on any rank stops all ranks
    with one message and nothing written. Returns (cfg, data, model, optimizer, start),
    or None after --help."""
    with mpi.agreement(comm):
        args = parse_args(argv)
    if args.help:
        say(PARSER.format_help(), end="")
        return None
    threads, why = limit_blas_threads(comm.ranks_sharing_cores)

    with mpi.agreement(comm):
        cfg = config.load(args.config, args.set)
        data = datasets.load(cfg.data, cfg.train.loss, cfg.model.dtype, cfg.run.seed)
        model = MLP([data.num_inputs, *cfg.model.hidden, data.num_outputs],
                    cfg.model.activation, cfg.model.dtype)
        model.init_(np.random.default_rng([cfg.run.seed, 0x1417]))
        if cfg.model.init:
            load_init(model, cfg.model.init)
        t = cfg.train
        optimizer = SGD(model.params, model.grads, t.lr, t.momentum, t.nesterov, t.weight_decay)
        start = check_run_dir(cfg, args.resume, model, optimizer) if comm.rank == 0 else None

    # DP: replicas start identical: parameters and optimizer state come from rank 0.
    comm.bcast_(model.params)
    if optimizer.momentum_buffer is not None:
        comm.bcast_(optimizer.momentum_buffer)
    start = comm.bcast_obj(start)
    with mpi.agreement(comm):
        if comm.rank == 0:
            prepare_run_dir(cfg, start)

    per_rank = sorted({len(range(t.batch_size)[sharding.shard(t.batch_size, r, comm.size)])
                       for r in range(comm.size)})
    say(f"dpbp {__version__}: {comm.size} rank{'s' * (comm.size > 1)} ({comm.library}), "
        f"{threads} BLAS thread{'s' * (threads != 1)} per rank ({why})")
    say(f"data: {cfg.data.source}, {data.describe()}")
    say(f"model: {'-'.join(map(str, model.widths))} {cfg.model.activation} {cfg.model.dtype}, "
        f"{model.params.size:,} parameters; loss {cfg.train.loss}")
    say(f"batch: global {t.batch_size}, per rank {'-'.join(map(str, per_rank))}; "
        f"{sharding.num_batches(len(data.x), t.batch_size)} steps per epoch; "
        f"run dir {cfg.run.dir}")
    for note in start["notes"]:
        say(note)
    return cfg, data, model, optimizer, start


def metrics_path(cfg):
    return os.path.join(cfg.run.dir, "metrics.jsonl")


def load_init(model, path):
    """Start from the model.* weights in an .npz (e.g. saved from PyTorch)."""
    if not os.path.isfile(path):
        raise UserError(f"model.init: no such file {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            problem = model.load_state_dict(f, f"model.init {path}")
    except (OSError, ValueError) as e:
        raise UserError(f"model.init {path}: not a readable .npz file ({e})") from None
    if problem:
        raise UserError(problem)


def check_run_dir(cfg, resume, model, optimizer):
    """Rank 0, before anything is written: is the run directory usable? On --resume, load
    the newest checkpoint into model and optimizer. Returns where training starts."""
    run_dir = cfg.run.dir
    found = checkpoint.list_epochs(run_dir)
    if not resume:
        if found or os.path.exists(metrics_path(cfg)):
            newest = max(found, default=0)
            raise UserError(
                f"run.dir {run_dir} already holds a run ({newest} epochs checkpointed); "
                f"continue it with --resume, or start a new one with --set "
                f"'run.dir=\"{run_dir}-2\"'")
        parent = os.path.abspath(run_dir)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
            raise UserError(f"run.dir {run_dir}: cannot create it ({parent} is not a "
                            "writable folder); choose another with --set 'run.dir=\"...\"'")
        return {"epoch": 0, "step": 0, "notes": []}

    if not found:
        raise UserError(f"--resume: no checkpoint in {os.path.join(run_dir, 'checkpoints')}; "
                        "start the run without --resume")
    path = found[max(found)]
    state = checkpoint.load(path)
    saved = config.from_toml(str(state["config"]), f"checkpoint {path}")
    old, new = config.flat(saved), config.flat(cfg)
    changed = [k for k in old if old[k] != new[k]]
    for key in changed:
        if key in FIXED_ON_RESUME:
            raise UserError(f"--resume: {key} was {config.toml_value(old[key])} in {path}, "
                            f"now {config.toml_value(new[key])}; a resumed run keeps its "
                            "network and global batch")
    problem = model.load_state_dict(state, f"checkpoint {path}")
    if problem:
        raise UserError(problem + "; it does not fit the configured network")
    if optimizer.momentum_buffer is not None and "optimizer.momentum_buffer" in state:
        optimizer.momentum_buffer[...] = state["optimizer.momentum_buffer"]
    notes = [f"resume: from {path} (epoch {int(state['epoch'])}, step {int(state['step'])}, "
             f"written by {int(state['world_size'])} ranks)"]
    notes += [f"resume: {k} changed from {config.toml_value(old[k])} to "
              f"{config.toml_value(new[k])}" for k in changed]
    return {"epoch": int(state["epoch"]), "step": int(state["step"]), "notes": notes}


def prepare_run_dir(cfg, start):
    """Rank 0: create the run directory, save the resolved config, and on resume drop
    metrics of epochs after the checkpoint (they will be trained again)."""
    kept = None
    if os.path.exists(metrics_path(cfg)):
        try:
            with open(metrics_path(cfg), encoding="utf-8") as f:
                kept = [line for line in f
                        if line.strip() and json.loads(line)["epoch"] <= start["epoch"]]
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{metrics_path(cfg)} is malformed (each line must be a JSON "
                            "object with an epoch); repair or remove it to resume") from None
    try:
        os.makedirs(os.path.join(cfg.run.dir, "checkpoints"), exist_ok=True)
        checkpoint.write_atomic(os.path.join(cfg.run.dir, "config.toml"),
                                lambda f: f.write(config.to_toml(cfg).encode()))
        if kept is not None:
            checkpoint.write_atomic(metrics_path(cfg), lambda f: f.write("".join(kept).encode()))
    except OSError as e:
        raise UserError(f"run.dir {cfg.run.dir}: cannot write ({e.strerror}: {e.filename})"
                        ) from None


class _Parser(argparse.ArgumentParser):
    def error(self, message):   # a UserError, so ranks agree and report it once
        raise UserError(f"{message} (see python -m dpbp.train --help)")


def _epilog():
    lines = ["config keys and their defaults (configs/default.toml spells them out):"]
    for section, keys in config.defaults_by_section().items():
        lines.append(f"  [{section}]  " + ", ".join(f"{k} = {v}" for k, v in keys.items()))
    lines += ["", "exit codes: 0 done; 2 bad input (config, data, run directory, checkpoint), "
              "reported once;", "  any other non-zero code: a rank failed and the job was ended."]
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
                    help="continue the run in run.dir from its newest checkpoint")


def parse_args(argv):
    return PARSER.parse_args(argv)


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
