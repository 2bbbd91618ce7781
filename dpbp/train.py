"""Data-parallel training of a multilayer perceptron, in one process or many under MPI.

    python -m dpbp.train                      # one process
    mpirun -n 4 python -m dpbp.train          # four ranks, the same result to rounding

Every rank holds a full replica of the model, computes gradients on its own shard of
each global minibatch, the gradients are summed with one Allreduce, and every rank then
applies the same update (SGD or AdamW), so the replicas stay identical (the step:
train_step in dpbp/parallel/step.py). This module is the epoch loop around it; set-up is
service/startup.py, and the run's reliability (watchdog, stop requests, non-finite steps,
replica checks, checkpoints, the best checkpoint, early stopping) is service/guard.py,
called after every step and epoch.
"""

if __name__ == "__main__":   # python -m dpbp.train: stop signals held from this line on
    from dpbp import entry
    entry.hold()

import argparse  # noqa: E402
import hashlib  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from dpbp.errors import EXIT_DIVERGED, EXIT_HUNG, ArgumentParser, plural  # noqa: E402
from dpbp.nn import noise, schedule  # noqa: E402
from dpbp.parallel import comm as mpi  # noqa: E402
from dpbp.parallel import sharding  # noqa: E402
from dpbp.parallel.evaluation import evaluate  # noqa: E402
from dpbp.parallel.step import train_step  # noqa: E402
from dpbp.service import checkpoint, config, history, run_dir  # noqa: E402
from dpbp.service import data as datasets  # noqa: E402
from dpbp.service.checkpoint import Position  # noqa: E402
from dpbp.service.config import RunConfig  # noqa: E402
from dpbp.service.console import Console, Progress  # noqa: E402
from dpbp.service.guard import Guard, end_hung_job  # noqa: E402
from dpbp.service.startup import set_up  # noqa: E402
from dpbp.service.supervise import StopSignals, Watchdog  # noqa: E402


def main(argv=None):
    started = time.perf_counter()
    comm = mpi.init()
    watchdog = Watchdog(RunConfig.watchdog_seconds, comm.rank, end_hung_job)   # set-up too
    try:
        with StopSignals(launched=mpi.launched()) as signals:
            return command(argv, comm, signals, watchdog, started)
    finally:
        watchdog.stop()


def command(argv, comm, signals, watchdog, started):
    """The command, once signals and the watchdog watch over it."""
    with mpi.agreement(comm):
        args = PARSER.parse_args(argv)
    say = Console(comm.rank == 0 and not args.quiet)   # rank 0 speaks for all
    if PARSER.answered(args, say):
        return 0
    if not args.print_config:   # alone in any world, as dpbp.launch runs it
        mpi.check_launcher(comm)
    run = set_up(args, comm, say, watchdog)
    if run is None:   # --print-config, or a resumed run that is already complete
        return 0
    try:
        progress = Progress(say, args.progress, mpi.launched())
        code, at = train(run, comm, say, progress, signals, watchdog)
        if run.files:
            run.files.finish(*end_state(run.cfg, code))
    except mpi.AgreedExit as e:   # bad input (a full disk), or divergence: every rank
        if run.files:
            run.files.finish("diverged" if e.code == EXIT_DIVERGED else "failed",
                             e.message or f"exit {e.code}")
        raise
    finally:
        if run.files:
            run.files.release()
    if code in (None, 0):   # done: every epoch, or stopped early
        say(done_line(run, at, time.perf_counter() - started))
    return code or 0


def end_state(cfg, code):
    """(state, cause) for the run record of a run that train() ended with `code`."""
    if code is None:
        return "completed", None
    if code == 0:
        return "early_stopped", history.why_stopped(cfg)
    return "stopped", signal.Signals(code - 128).name


def done_line(run, at, seconds):
    """The last line of a run that ended well at position `at`, after `seconds`."""
    cfg, epochs = run.cfg, at.epoch
    weights = hashlib.sha256(run.model.params.tobytes()).hexdigest()[:16]   # to compare runs
    early = (f" of {cfg.train.epochs}, stopped early ({history.why_stopped(cfg)})"
             if epochs < cfg.train.epochs else "")
    best = f", best {checkpoint.best_path(cfg.run.dir)}" if cfg.run.keep_best else ""
    return (f"done: {plural(epochs, 'epoch')}{early}, {plural(at.step, 'step')} in "
            f"{seconds:.1f} s; weights sha256 {weights}; checkpoint "
            f"{checkpoint.path_for(cfg.run.dir, epochs)}{best}, metrics "
            f"{run_dir.metrics_path(cfg.run.dir)}")


def train(run, comm, say, progress, signals, watchdog):
    """Collective. The epochs from run.start to the last. Returns (code, position): code
    None when done, 0 when early stopping ended the run, else the exit code of a stop (a
    signal, after a checkpoint); the position where the run stopped."""
    cfg, tc, data, model, optimizer = run.cfg, run.cfg.train, run.data, run.model, run.optimizer
    steps_per_epoch = sharding.num_batches(len(data.x), tc.batch_size)
    at = run.start
    with Guard(comm, run, say, signals, watchdog) as guard:
        for epoch in range(at.epoch, tc.epochs):
            t0 = time.perf_counter()
            plateau = history.plateau_lr(cfg, guard.scores, steps_per_epoch)   # set per epoch
            order = sharding.epoch_order(len(data.x), cfg.run.seed, epoch, cfg.data.shuffle)
            batches = sharding.global_batches(order, tc.batch_size)
            first = at.batch                                 # > 0 on a mid-epoch resume
            loss_sum = run.loss_sum if first else 0.0      # this rank's, so far
            bar = progress.bar(len(batches), first, f"epoch {epoch + 1}/{tc.epochs}")
            for b in range(first, len(batches)):
                # every rank: train on its shard of global batch b
                N = len(batches[b])
                rows = batches[b][run.summed.rows(N)]
                optimizer.lr = schedule.lr_at(tc, at.step, steps_per_epoch, plateau)
                # random draws (dropout's masks): a function of (seed, step, each row's index)
                keys = noise.row_keys(cfg.run.seed, at.step, rows) if model.draws else None
                x, unread = datasets.read_rows(data.x, rows)   # from disk: verified
                with np.errstate(over="ignore", invalid="ignore"):   # non-finite: caught
                    loss, ok = train_step(model, optimizer, run.loss_fn, x, data.y[rows], N,
                                          run.summed, tc.clip_grad_norm, keys)
                if ok:
                    loss_sum += loss
                at = Position(epoch, b + 1, at.step + 1, at.skipped + (0 if ok else 1),
                              at.counted + (N if ok else 0))
                bar.update()
                code = guard.after_step(ok, at, loss_sum, b + 1 == len(batches), loss, N,
                                        unread)
                if code is not None:
                    return code, at
            bar.close()
            record, total = epoch_record(run, comm, at, loss_sum, batches[first:], t0)
            at = Position(epoch + 1, 0, at.step)
            code = guard.after_epoch(record, at, total, format_epoch(record, tc.epochs))
            if code is not None:
                return code, at
    return None, at


def epoch_record(run, comm, at, loss_sum, trained_batches, t0):
    """Collective. The epoch's line of metrics, and its loss sum over all ranks; `at` is
    the position after its last step, `trained_batches` those this process trained."""
    train_seconds = time.perf_counter() - t0
    trained = sum(len(batch) for batch in trained_batches)
    total = run.summed.epoch_loss(loss_sum)   # DP: over ranks (GrainSum: already whole)
    val_loss, val_accuracy = None, None
    data = run.data
    with np.errstate(over="ignore", invalid="ignore"):   # divergence is caught by the guard
        if data.x_val is not None:
            val_loss, val_accuracy = evaluate(run.model, run.loss_fn, data.x_val, data.y_val,
                                              data.num_classes, comm)
    record = dict(epoch=at.epoch + 1, train_loss=total / at.counted if at.counted else None,
                  val_loss=val_loss, val_accuracy=val_accuracy, lr=run.optimizer.lr,
                  seconds=time.perf_counter() - t0, samples_per_second=trained / train_seconds,
                  world_size=comm.size, skipped_steps=at.skipped, step=at.step,
                  time=round(time.time(), 3))
    if at.batch > len(trained_batches):   # resumed mid-epoch: seconds and speed of the rest
        record["resumed_after_batch"] = at.batch - len(trained_batches)
    return record, total


# ----------------------------------------------------------------------------- output

def format_epoch(r, epochs):
    val = "val_loss -  val_acc -" if r["val_loss"] is None else (
        f"val_loss {r['val_loss']:.4f}  val_acc "
        + ("-" if r["val_accuracy"] is None else f"{100 * r['val_accuracy']:.2f}%"))
    train = "-" if r["train_loss"] is None else f"{r['train_loss']:.4f}"
    resumed = r.get("resumed_after_batch")
    return (f"epoch {r['epoch']:>{len(str(epochs))}}/{epochs}  train_loss {train}"
            f"  {val}  lr {r['lr']:.4g}  {r['seconds']:.2f} s  "
            f"{r['samples_per_second']:,.0f} samples/s"
            + (f"  (resumed after batch {resumed}: time and speed of the rest)"
               if resumed else ""))


def _epilog():
    lines = ["config keys and their defaults (configs/default.toml spells them out):"]
    for section, keys in config.defaults_by_section().items():
        lines.append(f"  [{section}]  " + ", ".join(f"{k} = {v}" for k, v in keys.items()))
    lines += ["", "exit codes: 0 done (also when early stopping ended the run); 2 bad input "
              "(config, data,", "  run directory, checkpoint), reported once;",
              f"  {EXIT_DIVERGED} a non-finite loss or gradient, or "
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
PARSER.add_argument("--resume", metavar="auto|PATH", nargs="?", const=True, default=None,
                    help="continue the run in run.dir from its newest valid checkpoint, with "
                         "its saved config; --config and --set change it (not the network, "
                         "the global batch or the optimizer). --resume auto: continue it if "
                         "there is one, else start it (the same command for both). --resume "
                         "PATH: from the checkpoint PATH; with a new run.dir, a branch into "
                         "that directory. The table of what each start does: "
                         "docs/operations.md#the-resume-contract")
PARSER.add_argument("--restart", action="store_true",
                    help="this start is a restart of the same run (dpbp.launch passes it; "
                         "a Slurm requeue counts as one): continue as --resume auto does, "
                         "with the run's recorded config; the command line's config "
                         "changes nothing, and a line says so where it differs")
PARSER.add_argument("--allow-data-change", action="store_true",
                    help="on a resume, train on data that differ from what the run trained "
                         "on (else refused, naming the array): recorded in run.json and in "
                         "the next epoch's metrics line (data_changed); not on a restart")
PARSER.add_argument("--print-config", action="store_true",
                    help="print the resolved config (TOML, overrides applied) and exit; "
                         "saved and passed back with --config, it gives the same run")
PARSER.add_argument("--quiet", action="store_true",
                    help="print nothing but errors (no start-up lines, epochs or progress bar)")
PARSER.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                    help="a progress bar of each epoch's steps: auto (the default) draws it "
                         "where a person sees it, on a terminal (under mpirun, with rank 0's "
                         "lines when mpirun writes them to a terminal) and never in logs; on "
                         "draws it on stderr in logs too; off never")




def cli():
    mpi.run(main)


if __name__ == "__main__":
    cli()
