"""Evaluate a checkpoint on its run's validation set, or its data's test set: loss,
accuracy, per-class accuracy and the confusion matrix, in one process or sharded over
many under MPI.

    python -m dpbp.evaluate --checkpoint runs/default/checkpoints/epoch-0010.npz
    mpirun -n 4 python -m dpbp.evaluate --checkpoint ... --split test --json

The network is the checkpoint's own (--config and --set may not change it, but for
model.dtype), and so is the data (the config saved in the checkpoint) unless --config or
--set change it. On the validation set (--split val, the default), loss and accuracy
come from the same function, on the same rows, that the training run used for its
metrics line, so they equal that epoch's `val_loss` and `val_accuracy`. The test set (the
t10k pair of mnist, x_test and y_test of npz and npy) is read only here, with --split
test, so no choice of the run (the best checkpoint, early stopping) ever looked at it.
The rows are cut into blocks at fixed offsets and every rank evaluates its share of the
blocks; the per-class counts are summed with one int64 Allreduce, so they are exact at
any world size.
"""

import argparse
import json
import sys

from dpbp.errors import ArgumentParser, UserError
from dpbp.parallel import comm as mpi
from dpbp.parallel.evaluation import MAX_MATRIX_CLASSES, class_counts, evaluate
from dpbp.parallel.threads import limit_blas_threads
from dpbp.service import config, network, run_dir
from dpbp.service import data as datasets
from dpbp.service.restore import load_checkpoint, restore_model
from dpbp.service.startup import LOSSES, check_same_inputs, load_data


def main(argv=None):
    comm = mpi.init()
    with mpi.agreement(comm):
        args = PARSER.parse_args(argv)
    if PARSER.answered(args, print if comm.rank == 0 else lambda *a: None):
        return 0
    state, saved_toml, layers, args.checkpoint = load_checkpoint(comm, args.checkpoint)
    with mpi.agreement(comm):
        saved = config.from_toml(saved_toml, f"checkpoint {args.checkpoint}")
        cfg = config.load(args.config, args.set, base=saved)
        notes = network.check_unchanged(saved, cfg, layers, args.checkpoint)   # its own
    limit_blas_threads(comm.ranks_sharing_cores, cfg.train.deterministic)   # as the run
    with mpi.agreement(comm):
        data = load_data(cfg, network.output_width(*layers))   # labels: the network's classes
        data_id = datasets.identity(data)
        if comm.rank == 0:   # the checkpoint's own data, unless the command line names others
            as_saved = data_id if cfg.model.dtype == saved.model.dtype else \
                datasets.identity(data, saved.model.dtype)   # as the run loaded them
            notes += run_dir.check_data(state["data"], as_saved,
                                        config.named_keys(args.config, args.set),
                                        args.checkpoint)
            notes += run_dir.unnamed_best(args.checkpoint, state)
        x, y = rows_of(args.split, cfg, data)
    check_same_inputs(comm, cfg, data_id + "; " + datasets.arrays_identity({"x": x, "y": y}))
    model = restore_model(comm, state, args.checkpoint, layers, cfg.model.dtype)
    with mpi.agreement(comm):
        network.check_fits(model, data, f"checkpoint {args.checkpoint}")
    epoch = comm.bcast_obj(None if state is None else state["epoch"])

    loss, accuracy = evaluate(model, LOSSES[cfg.train.loss], x, y, data.num_classes, comm)
    confusion, per_class = None, None
    if data.num_classes:
        confusion, per_class = class_counts(model, x, y, data.num_classes, comm)
    if comm.rank == 0:
        for note in notes:
            print(f"dpbp: note: {note}", file=sys.stderr)
        result = summary(args.checkpoint, epoch, cfg, args.split, len(x), loss, accuracy,
                         per_class, confusion)
        result["network"] = network.summary(layers, cfg)
        print(json.dumps(result) if args.json else report(result))
    return 0


def rows_of(split, cfg, data):
    """(x, y) of the `split` ("val" or "test") of the run's data (`data`, as loaded for
    `cfg`); a UserError where it has none."""
    if split == "test":
        return datasets.load_test(cfg.data, cfg.train.loss, cfg.model.dtype, data,
                                  images=bool(cfg.model.layers))
    if data.x_val is None:
        raise UserError(f"the {cfg.data.source} data of this config has no validation set "
                        "(data.val_fraction = 0 and no x_val); nothing to evaluate on")
    return data.x_val, data.y_val


def summary(path, epoch, cfg, split, n, loss, accuracy, per_class, confusion):
    """Everything measured, as one JSON-ready dict."""
    result = {"checkpoint": path, "epoch": epoch, "data": cfg.data.source, "split": split,
              "samples": n,
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
    split = {"val": "validation", "test": "test"}[r["split"]]
    net = r["network"]
    lines = [f"checkpoint {r['checkpoint']} (epoch {r['epoch']}): {r['data']} {split} "
             f"set, {r['samples']} samples",
             f"network {net['network']}; {net['dtype']}",
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
    description="Evaluate a checkpoint on its run's validation set, or its data's test "
                "set: loss, accuracy,\nper-class accuracy and confusion matrix. Run as one "
                "process, or sharded over N ranks\nwith mpirun -n N.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="exit codes: 0 done; 2 bad input (checkpoint, config, data), reported once.")
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("--checkpoint", metavar="PATH", required=True,
                    help="a checkpoint, e.g. runs/default/checkpoints/epoch-0010.npz, or a "
                         "run directory (runs/default): its newest valid checkpoint")
PARSER.add_argument("--split", choices=("val", "test"), default="val",
                    help="val (the default): the run's validation set, as its metrics "
                         "measured it; test: the data's test set (mnist's t10k pair, npz "
                         "and npy x_test and y_test), which training never reads")
PARSER.add_argument("--config", metavar="PATH",
                    help="TOML file applied over the checkpoint's own config (e.g. other "
                         "data); keys that would change its network are refused")
PARSER.add_argument("--set", metavar="SECTION.KEY=VALUE", action="append", default=[],
                    help="override one key of the checkpoint's config (repeatable), e.g. "
                         "--set 'data.path=\"other.npz\"'; not its network (model.hidden, "
                         "activation, dropout, layers, classes, train.loss): model.dtype "
                         "may change")
PARSER.add_argument("--json", action="store_true",
                    help="print one JSON object (loss, accuracy, per_class_accuracy, "
                         "confusion_matrix, ...) instead of text")


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
