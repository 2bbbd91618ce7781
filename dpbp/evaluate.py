"""Evaluate a checkpoint on the validation set: loss, accuracy, per-class accuracy and the
confusion matrix, in one process or sharded over many under MPI.

    python -m dpbp.evaluate --checkpoint runs/default/checkpoints/epoch-0010.npz
    mpirun -n 4 python -m dpbp.evaluate --checkpoint ... --json

The data is the run's own (the config saved in the checkpoint) unless --config or --set
change it. Loss and accuracy come from the same function, on the same rows, that the
training run used for its metrics line, so they equal that epoch's `val_loss` and
`val_accuracy`. The rows are cut into blocks at fixed offsets and every rank evaluates
its share of the blocks; the per-class counts are summed with one int64 Allreduce, so
they are exact at any world size.
"""

import argparse
import json

import numpy as np

from dpbp.errors import ArgumentParser, UserError
from dpbp.nn.losses import cross_entropy, mse
from dpbp.nn.model import MLP
from dpbp.parallel import comm as mpi
from dpbp.parallel.sharding import blocks
from dpbp.parallel.threads import blas_threads, blockwise, limit_blas_threads
from dpbp.service import checkpoint, config
from dpbp.service import data as datasets
from dpbp.train import EVAL_BLOCK, evaluate, fingerprint

MAX_MATRIX_CLASSES = 1000   # beyond this, a confusion matrix is too large to be of use


# ----------------------------------------------------------------------------- counting

def class_counts(model, x, y, num_classes, comm, block=EVAL_BLOCK):
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

    mine = blocks(len(x), block, comm.rank, comm.size)
    counts = sum(blockwise(counted, mine, blas_threads()),
                 np.zeros(C * C + 2 * C if with_matrix else 2 * C, dtype=np.int64))
    comm.allreduce_(counts)                 # DP: exact sums of every rank's counts
    confusion = counts[2 * C:].reshape(C, C) if with_matrix else None
    return confusion, counts[:2 * C].reshape(2, C)


# ----------------------------------------------------------------------------- loading

def load_checkpoint(comm, path):
    """Collective. Rank 0 reads the checkpoint at `path`; returns (state, saved_toml):
    the state dict on rank 0 (None elsewhere) and its config as TOML text on every rank.
    A missing or malformed checkpoint stops every rank with one line."""
    state = None
    with mpi.agreement(comm):
        if comm.rank == 0:
            state = checkpoint.load(path)
    return state, comm.bcast_obj(None if state is None else state["config"])


def restore_model(comm, state, path, widths, cfg):
    """Collective. The network `widths` of `cfg`, holding the checkpoint's weights (read on
    rank 0, broadcast to all). Weights that do not fit stop every rank with one line."""
    with mpi.agreement(comm):
        try:
            model = MLP(widths, cfg.model.activation, cfg.model.dtype)
        except MemoryError:
            raise UserError(f"the network {'-'.join(map(str, widths))} does not fit in "
                            "memory; check model.hidden") from None
        if comm.rank == 0:
            problem = model.load_state_dict(state, f"checkpoint {path}")
            if problem:
                raise UserError(f"{problem}; the checkpoint does not fit this config and data")
    comm.bcast_(model.params)            # DP: every rank evaluates rank 0's weights
    return model


# ----------------------------------------------------------------------------- the command

def main(argv=None):
    comm = mpi.init()
    with mpi.agreement(comm):
        args = PARSER.parse_args(argv)
        if not args.help and not args.checkpoint:
            raise UserError("--checkpoint PATH is required (see python -m dpbp.evaluate --help)")
    if args.help:
        if comm.rank == 0:
            print(PARSER.format_help(), end="")
        return 0
    state, saved_toml = load_checkpoint(comm, args.checkpoint)
    with mpi.agreement(comm):
        saved = config.from_toml(saved_toml, f"checkpoint {args.checkpoint}")
        cfg = config.load(args.config, args.set, base=saved)
    limit_blas_threads(comm.ranks_sharing_cores, cfg.train.deterministic)   # as the run
    with mpi.agreement(comm):
        try:
            data = datasets.load(cfg.data, cfg.train.loss, cfg.model.dtype, cfg.run.seed)
        except MemoryError:
            raise UserError(f"the {cfg.data.source} data does not fit in memory") from None
        if data.x_val is None:
            raise UserError(f"the {cfg.data.source} data of this config has no validation "
                            "set (data.val_fraction = 0 and no x_val); nothing to evaluate on")
    same_inputs = comm.replicas_identical(fingerprint(cfg, data))
    with mpi.agreement(comm):
        if not same_inputs:
            raise UserError("the ranks loaded different configs or data; check that every "
                            "node sees the same files")
    widths = [data.num_inputs, *cfg.model.hidden, data.num_outputs]
    model = restore_model(comm, state, args.checkpoint, widths, cfg)
    epoch = comm.bcast_obj(None if state is None else state["epoch"])

    loss_fn = {"cross_entropy": cross_entropy, "mse": mse}[cfg.train.loss]
    loss, accuracy = evaluate(model, loss_fn, data.x_val, data.y_val, data.num_classes, comm)
    confusion, per_class = None, None
    if data.num_classes:
        confusion, per_class = class_counts(model, data.x_val, data.y_val, data.num_classes,
                                            comm)
    if comm.rank == 0:
        result = summary(args.checkpoint, epoch, cfg, len(data.x_val), loss, accuracy,
                         per_class, confusion)
        print(json.dumps(result) if args.json else report(result))
    return 0


def summary(path, epoch, cfg, n, loss, accuracy, per_class, confusion):
    """Everything measured, as one JSON-ready dict."""
    result = {"checkpoint": path, "epoch": epoch, "data": cfg.data.source, "samples": n,
              "loss_function": cfg.train.loss, "loss": loss, "accuracy": accuracy,
              "per_class_accuracy": None, "class_samples": None, "class_correct": None,
              "confusion_matrix": None}
    if per_class is None:
        result["note"] = ("regression targets: loss only (no accuracy, per-class accuracy "
                          "or confusion matrix)")
        return result
    totals, hits = per_class
    result["per_class_accuracy"] = [int(h) / int(t) if t else None for t, h in zip(totals, hits)]
    result["class_samples"], result["class_correct"] = totals.tolist(), hits.tolist()
    if confusion is not None:
        result["confusion_matrix"] = confusion.tolist()
    else:
        result["note"] = f"no confusion matrix beyond {MAX_MATRIX_CLASSES} classes"
    return result


def report(r):
    """The summary as text for people: a few lines, the matrix only where it fits."""
    lines = [f"checkpoint {r['checkpoint']} (epoch {r['epoch']}): {r['data']} validation "
             f"set, {r['samples']} samples",
             f"loss {r['loss']:.6f} ({r['loss_function']})"]
    if r["accuracy"] is None:
        lines.append(r["note"])
        return "\n".join(lines)
    lines[-1] += (f"  accuracy {100 * r['accuracy']:.2f}% ({sum(r['class_correct'])}/"
                  f"{r['samples']})")
    lines.append("per-class accuracy:")
    for c, (a, t) in enumerate(zip(r["per_class_accuracy"], r["class_samples"])):
        if c == 50:
            lines.append(f"  ... {len(r['class_samples']) - c} more classes; --json has them")
            break
        lines.append(f"  class {c:>3}: " + ("no samples" if a is None else
                                            f"{100 * a:6.2f}% of {t}"))
    matrix = r["confusion_matrix"]
    if matrix is not None and len(matrix) <= 20:
        width = max(3, len(str(max(max(row) for row in matrix))))
        lines.append("confusion matrix (rows: true class, columns: predicted class):")
        lines.append("      " + " ".join(f"{j:>{width}}" for j in range(len(matrix))))
        for i, row in enumerate(matrix):
            lines.append(f"  {i:>3} " + " ".join(f"{v:>{width}}" for v in row))
    else:
        lines.append("confusion matrix: too wide to print here; --json has it"
                     if matrix is not None else r["note"])
    return "\n".join(lines)


PARSER = ArgumentParser(
    prog="python -m dpbp.evaluate", add_help=False,
    description="Evaluate a checkpoint on its run's validation set: loss, accuracy, "
                "per-class accuracy and\nconfusion matrix. Run as one process, or sharded "
                "over N ranks with mpirun -n N.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="exit codes: 0 done; 2 bad input (checkpoint, config, data), reported once.")
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("--checkpoint", metavar="PATH",
                    help="a checkpoint, e.g. runs/default/checkpoints/epoch-0010.npz")
PARSER.add_argument("--config", metavar="PATH",
                    help="TOML file applied over the checkpoint's own config (e.g. other data)")
PARSER.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                    help="override one key of the checkpoint's config (repeatable), e.g. "
                         "--set 'data.path=\"other.npz\"'")
PARSER.add_argument("--json", action="store_true",
                    help="print one JSON object (loss, accuracy, per_class_accuracy, "
                         "confusion_matrix, ...) instead of text")


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
