"""Plot a run's learning curves from RUN_DIR/metrics.jsonl into a PNG.

    python -m dpbp.plot runs/default                 # writes runs/default/curves.png
    python -m dpbp.plot runs/default -o curves.png

Three panels against epoch: training and validation loss, validation accuracy, learning
rate. Needs matplotlib (`pip install 'dpbp[plot]'`); it draws with the Agg backend, so no
display is needed. One process: under mpirun every rank would draw the same picture.
"""

import argparse
import json
import os

from dpbp.errors import ArgumentParser, UserError
from dpbp.parallel import comm as mpi
from dpbp.service.files import write_atomic
from dpbp.service.run_dir import metrics_path, read_metrics

SIZE_INCHES, DPI = (13.0, 4.0), 100   # 1300 x 400 pixels


def load_curves(run_dir):
    """{name: [values by epoch]} from RUN_DIR/metrics.jsonl, with "epoch" first."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    lines = read_metrics(run_dir)
    if not lines:
        raise UserError(f"{metrics_path(run_dir)}: no metrics to plot (the run has not "
                        "finished an epoch)")
    records = sorted((json.loads(line) for _, line in lines), key=lambda r: r["epoch"])
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")
    return {k: [r.get(k) for r in records] for k in keys}


def draw(curves, title):
    """The figure: losses (on a log axis where they span a factor of 10), validation
    accuracy (%), learning rate."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'dpbp[plot]' "
                        "(or pip install matplotlib)") from None
    epochs = curves["epoch"]
    marker = "o" if len(epochs) <= 30 else None   # single epochs stay visible
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)
    fig.suptitle(title)
    for ax in (ax_loss, ax_acc, ax_lr):
        ax.grid(True, alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)   # epochs are whole

    def line(ax, values, label, **style):   # epochs without a value are left out
        points = [(e, v) for e, v in zip(epochs, values) if v is not None]
        if points:
            ax.plot(*zip(*points), marker=marker, markersize=3, label=label, **style)
        return points

    line(ax_loss, curves["train_loss"], "training")
    line(ax_loss, curves["val_loss"], "validation")
    losses = [v for v in curves["train_loss"] + curves["val_loss"] if v is not None]
    log = min(losses) > 0 and max(losses) > 10 * min(losses)   # a range worth a log axis
    if log:
        ax_loss.set_yscale("log")
    ax_loss.set(title="loss", xlabel="epoch",
                ylabel="mean loss per sample" + (" (log scale)" if log else ""))
    ax_loss.legend()

    percent = [None if a is None else 100 * a for a in curves["val_accuracy"]]
    points = line(ax_acc, percent, "validation", color="tab:green")
    if points:
        ax_acc.set_title(f"validation accuracy (last {points[-1][1]:.2f} %)")
    else:
        ax_acc.set_title("validation accuracy")
        ax_acc.text(0.5, 0.5, "none recorded\n(regression, or no validation set)",
                    ha="center", va="center", transform=ax_acc.transAxes)
        ax_acc.set(xticks=[], yticks=[])
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)")

    line(ax_lr, curves["lr"], "learning rate", color="tab:purple")
    ax_lr.set(title="learning rate", xlabel="epoch", ylabel="lr")
    return fig


def main(argv=None):
    args = PARSER.parse_args(argv)
    if args.help:
        print(PARSER.format_help(), end="")
        return 0
    if not args.run_dir:
        raise UserError("RUN_DIR is required (see python -m dpbp.plot --help)")
    out = args.output or os.path.join(args.run_dir, "curves.png")
    if not out.lower().endswith(".png"):
        raise UserError(f"-o {out}: must name a .png file")
    curves = load_curves(args.run_dir)
    fig = draw(curves, f"{os.path.basename(os.path.normpath(args.run_dir))}: "
                       f"{len(curves['epoch'])} epochs")
    try:
        write_atomic(out, lambda f: fig.savefig(f, format="png"))
    except OSError as e:
        raise UserError(f"-o {out}: cannot write it ({e.strerror})") from None
    print(f"wrote {out}")
    return 0


PARSER = ArgumentParser(
    prog="python -m dpbp.plot", add_help=False,
    description="Plot training and validation loss, validation accuracy and learning "
                "rate against epoch,\nfrom RUN_DIR/metrics.jsonl, into a PNG. Needs "
                "matplotlib: pip install 'dpbp[plot]'.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="exit codes: 0 done; 2 bad input (run directory, metrics, output path, "
           "no matplotlib).")
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run directory")
PARSER.add_argument("-o", "--output", metavar="PNG",
                    help="where to write the picture (default RUN_DIR/curves.png)")


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
