"""Plot a run's learning curves from RUN_DIR/metrics.jsonl into a PNG, PDF or SVG.

    python -m dpbp.plot runs/default                 # writes runs/default/curves.png
    python -m dpbp.plot runs/default -o curves.pdf   # the format by the suffix

Panels against epoch: training and validation loss (and the loss of single steps where
run.log_every_steps logged them), validation accuracy, and the learning rate at every
step where it is not constant: from the run's config, and for the plateau schedule the
rate each epoch logged. Needs matplotlib (`pip install matplotlib`; from a checkout,
`pip install -e '.[plot]'`); it draws with the Agg backend, so no display is needed. One
process: under mpirun every rank would draw the same picture.
"""

import argparse
import json
import os

from dpbp.errors import ArgumentParser, UserError, plural
from dpbp.nn.schedule import lr_at
from dpbp.parallel import comm as mpi
from dpbp.service import config
from dpbp.service.files import write_atomic
from dpbp.service.run_dir import config_path, metrics_path, read_metrics, read_steps

SIZE_INCHES, DPI = (13.0, 4.0), 100   # 1300 x 400 pixels
FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg"}   # -o FILE: by its suffix


def load_curves(run_dir):
    """{name: [values by epoch]} from RUN_DIR/metrics.jsonl, with "epoch" first; also
    "steps", the records of RUN_DIR/steps.jsonl (run.log_every_steps), and "schedule",
    the learning rate at every step as (epochs, lr), or None where the run's records do
    not say how many steps an epoch has."""
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir}: no such run directory")
    lines = read_metrics(run_dir)
    if not lines:
        raise UserError(f"{metrics_path(run_dir)}: no metrics to plot (the run has not "
                        "finished an epoch)")
    records = sorted((json.loads(line) for _, line in lines), key=lambda r: r["epoch"])
    keys = ("epoch", "train_loss", "val_loss", "val_accuracy", "lr")
    curves = {k: [r.get(k) for r in records] for k in keys}
    curves["steps"] = [r for r in read_steps(run_dir) if r.get("loss") is not None]
    curves["schedule"] = schedule_of(run_dir, records)
    return curves


def schedule_of(run_dir, records):
    """(epochs, lr) at the end of every step of the run so far, from its config: the
    metrics hold only each epoch's last lr, which would draw a warmup or a cosine as
    straight lines. The plateau schedule's rate after warmup is the one each epoch
    logged (it follows from the validation metrics, not from the config alone)."""
    last = records[-1]
    if not last.get("step") or not os.path.exists(config_path(run_dir)):
        return None   # written before dpbp recorded steps
    tc = config.load(config_path(run_dir)).train
    per_epoch = last["step"] // last["epoch"]   # every epoch has as many steps
    logged = {r["epoch"]: r.get("lr") for r in records}
    steps = range(last["step"])
    return ([(s + 1) / per_epoch for s in steps],
            [lr_at(tc, s, per_epoch, logged.get(s // per_epoch + 1)) for s in steps])


def draw(curves, name):
    """The figure of run `name`: losses (on a log axis where they span a factor of 10),
    validation accuracy (%), and the learning rate where it changes (a constant one is
    in the title)."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global state, no display
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib (from a "
                        "checkout of dpbp: pip install -e '.[plot]')") from None
    schedule = curves["schedule"] or (curves["epoch"], curves["lr"])
    constant = len(set(schedule[1])) == 1
    fig = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2 if constant else 3)
    fig.suptitle(f"{name}: {plural(len(curves['epoch']), 'epoch')}"
                 + (f"; lr {schedule[1][0]:g} (constant)" if constant else ""))
    for ax in axes:
        ax.grid(True, alpha=0.3)
        ax.set_xlabel("epoch")
        if len(curves["epoch"]) == 1:   # one epoch: one tick, not 0.96 .. 1.04
            ax.set_xticks(curves["epoch"])
        else:
            ax.xaxis.get_major_locator().set_params(integer=True)   # epochs are whole
    draw_losses(axes[0], curves)
    draw_accuracy(axes[1], curves)
    if not constant:
        axes[2].plot(*schedule, color="tab:purple")
        axes[2].set(title="learning rate" + (" at every step" if curves["schedule"] else ""),
                    ylabel="lr")
    return fig


def line(ax, epochs, values, label, **style):
    """values by epoch, those without a value left out; markers while they are few."""
    points = [(e, v) for e, v in zip(epochs, values) if v is not None]
    if points:
        ax.plot(*zip(*points), marker="o" if len(epochs) <= 30 else None, markersize=3,
                label=label, **style)
    return points


def draw_losses(ax, curves):
    steps = curves["steps"]
    if steps:   # run.log_every_steps: the loss of single steps, faint behind the epochs'
        ax.plot([r["epoch"] for r in steps], [r["loss"] for r in steps], color="tab:blue",
                alpha=0.3, linewidth=0.8, label="training, single steps")
    line(ax, curves["epoch"], curves["train_loss"], "training", color="tab:blue")
    line(ax, curves["epoch"], curves["val_loss"], "validation", color="tab:orange")
    losses = [v for v in curves["train_loss"] + curves["val_loss"] if v is not None]
    losses += [r["loss"] for r in steps]
    log = bool(losses) and min(losses) > 0 and max(losses) > 10 * min(losses)
    if log:
        ax.set_yscale("log")
    ax.set(title="loss", ylabel="mean loss per sample" + (" (log scale)" if log else ""))
    ax.legend()


def draw_accuracy(ax, curves):
    percent = [None if a is None else 100 * a for a in curves["val_accuracy"]]
    points = line(ax, curves["epoch"], percent, "validation", color="tab:green")
    if points:
        ax.set_title(f"validation accuracy (last {points[-1][1]:.2f} %)")
    else:
        ax.set_title("validation accuracy")
        ax.text(0.5, 0.5, "none recorded\n(regression, or no validation set)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set(xticks=[], yticks=[])
    ax.set(ylabel="accuracy (%)")


def main(argv=None):
    args = PARSER.parse_args(argv)
    if PARSER.answered(args):
        return 0
    if not args.run_dir:
        raise UserError("RUN_DIR is required (see python -m dpbp.plot --help)")
    out = args.output or os.path.join(args.run_dir, "curves.png")
    kind = FORMATS.get(os.path.splitext(out)[1].lower())
    if kind is None:
        raise UserError(f"-o {out}: must name a .png, .pdf or .svg file")
    curves = load_curves(args.run_dir)
    fig = draw(curves, os.path.basename(os.path.normpath(args.run_dir)))
    try:
        write_atomic(out, lambda f: fig.savefig(f, format=kind))
    except OSError as e:
        raise UserError(f"-o {out}: cannot write it ({e.strerror})") from None
    print(f"wrote {out}")
    return 0


PARSER = ArgumentParser(
    prog="python -m dpbp.plot", add_help=False,
    usage="python -m dpbp.plot RUN_DIR [-o FILE] [-h] [--version]",
    description="Plot training and validation loss, validation accuracy and learning "
                "rate against epoch,\nfrom RUN_DIR/metrics.jsonl, into a PNG, PDF or SVG. "
                "Needs matplotlib: pip install matplotlib.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
    epilog="exit codes: 0 done; 2 bad input (run directory, metrics, output path, "
           "no matplotlib).")
PARSER.add_argument("-h", "--help", action="store_true", help="show this help and exit")
PARSER.add_argument("run_dir", metavar="RUN_DIR", nargs="?", help="a run directory")
PARSER.add_argument("-o", "--output", metavar="FILE",
                    help="where to write the picture, as PNG, PDF or SVG by its suffix "
                         "(.png, .pdf, .svg; default RUN_DIR/curves.png)")


def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
