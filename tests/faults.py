"""Fault injection, from the test side: failures that dpbp must handle and never hang on.

    DPBP_FAULT=KIND:RANK:STEP python -m tests.faults MODULE [ARGS...]   # e.g. dpbp.train
    DPBP_FAULT=KIND:RANK:STEP python -m tests.faults [ARGS...]          # dpbp.train
    DPBP_FAULT_WATCHDOG=SECONDS ...   # the watchdog's limit before the config is read

runs `python -m MODULE ARGS` (dpbp.train when the first argument is an option, as when
the supervisor runs `python -m dpbp.launch --module tests.faults -- ARGS`) with one
planned fault, or several separated by commas. Just before optimizer step STEP
(counted from 0 over the whole run), rank RANK
    raise      raises an exception
    exit       calls sys.exit(5)
    kill       kills itself with SIGKILL
    hang       sleeps for an hour (the watchdog's case)
    nan        puts a NaN into its shard of the batch (a non-finite loss and gradient)
    perturb    adds 1e-3 to its parameters (replicas that no longer agree)
    sigterm    sends itself SIGTERM (as Slurm does before preempting a job)
    sigint     sends itself SIGINT (as Ctrl-C does)
    sighup     sends itself SIGHUP (as a closed terminal or ssh session does)
    swap       copies the file SRC over DST, in place (DPBP_FAULT_SWAP=SRC|DST: the
               run's data changed under it)
    swapkill   as swap, then kills itself with SIGKILL
and, while rank 0 writes the checkpoint taken when STEP steps are done (RANK must be 0),
    killsave   kills itself with SIGKILL half-way through the file
    nospace    fails as a full disk does (OSError ENOSPC)
and at start-up (STEP 0), rank RANK
    othercpu   reports other numpy code paths and BLAS kernels (a node of another CPU type;
               train.deterministic compares them)
    hangload   freezes while it loads the data (sleeps for an hour)
    termload   receives SIGTERM while it loads the data
    hangconfig freezes while it reads the config (sleeps for an hour), before the
               config's run.watchdog_seconds is known: the watchdog then has the limit
               the command starts it with, the default of run.watchdog_seconds, which
               DPBP_FAULT_WATCHDOG=SECONDS lowers (the default is 600 s)

With DPBP_FAULT_ONCE=DIR, each planned fault happens at most once over all the runs that
share DIR (the restarts of a supervised job): the rank about to carry it out first
creates DIR/KIND-RANK-STEP, holding its pid, and where that file exists already it
passes over the fault.

dpbp itself knows nothing of this: the faults wrap its functions from outside, the
training step (dpbp.train.train_step), the schedule that the loop asks for every step's
learning rate just before the step (which tells the step's number), the checkpoint
writer (dpbp.service.checkpoint.save and its write_atomic), the arithmetic check
(dpbp.service.startup.arithmetic), the data loader (dpbp.service.startup.load_data) and
the config reader (dpbp.service.config.load); DPBP_FAULT_WATCHDOG sets the default of
run.watchdog_seconds on its class (RunConfig), which the commands start their watchdog
with.
"""

import errno
import importlib
import os
import shutil
import signal
import sys
import time

STEP_KINDS = ("raise", "exit", "kill", "hang", "nan", "perturb", "sigterm", "sigint", "sighup",
              "swap", "swapkill")
KINDS = STEP_KINDS + ("killsave", "nospace", "othercpu", "hangload", "termload", "hangconfig")
SIGNALS = {"sigterm": signal.SIGTERM, "sigint": signal.SIGINT, "sighup": signal.SIGHUP}


def parse(text):
    """[(kind, rank, step), ...] from the variable's text."""
    plans = []
    for plan in text.split(","):
        parts = plan.split(":")
        if len(parts) != 3 or parts[0] not in KINDS or not all(p.isdigit() for p in parts[1:]):
            raise ValueError(f"DPBP_FAULT={text!r}: expected KIND:RANK:STEP (comma-separated) "
                             f"with KIND one of {', '.join(KINDS)}")
        plans.append((parts[0], int(parts[1]), int(parts[2])))
    return plans


def first_time(plan, once):
    """Whether to carry out `plan` now: always without DPBP_FAULT_ONCE, else only if no
    run sharing the folder `once` did (this one claims it, writing its pid)."""
    if not once:
        return True
    try:
        fd = os.open(os.path.join(once, "-".join(map(str, plan))),
                     os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return False
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    return True


def inject(kind, step, x, params):
    """Carry out a fault of the step kinds on this rank, now. `x` is this rank's copy of
    its shard of the batch, `params` its flat parameters."""
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if kind == "exit":
        sys.exit(5)
    if kind in ("swap", "swapkill"):
        source, target = os.environ["DPBP_FAULT_SWAP"].split("|")
        shutil.copyfile(source, target)
    if kind in ("kill", "swapkill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "nan":
        x[:1] = float("nan")
    if kind == "perturb":
        params += 1e-3
    if kind in SIGNALS:
        os.kill(os.getpid(), SIGNALS[kind])
    while kind == "hang":
        time.sleep(3600)


def during_save(kind, f):
    """Rank 0, half-way through writing a checkpoint to file f."""
    f.flush()
    f.truncate(f.tell() // 2)
    if kind == "killsave":
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def install(plans, once=None):
    """Wrap dpbp's functions so that each fault of `plans` happens where and when it is
    planned (once only, with `once`, a folder: see DPBP_FAULT_ONCE)."""
    import dpbp.train
    from dpbp.nn import schedule
    from dpbp.service import checkpoint, config, startup
    now = {"step": None, "saving": None}
    real_lr_at, real_step = schedule.lr_at, dpbp.train.train_step
    real_save, real_write, real_arithmetic = (checkpoint.save, checkpoint.write_atomic,
                                              startup.arithmetic)
    real_load_data, real_load_config = startup.load_data, config.load

    def lr_at(tc, s, steps_per_epoch, *more):
        now["step"] = s
        return real_lr_at(tc, s, steps_per_epoch, *more)

    def planned(kinds, rank, step):
        """The first fault of `kinds` planned for (rank, step) and not yet carried out."""
        for plan in plans:
            if plan[0] in kinds and plan[1:] == (rank, step) and first_time(plan, once):
                return plan[0]
        return None

    def train_step(model, optimizer, loss_fn, x, y, N, summed, *args):
        kind = planned(STEP_KINDS, summed.comm.rank, now["step"])
        if kind:
            inject(kind, now["step"], x, model.params)
        return real_step(model, optimizer, loss_fn, x, y, N, summed, *args)

    def save(path, model, optimizer, position, *args, **kwargs):
        now["saving"] = position.step
        try:
            return real_save(path, model, optimizer, position, *args, **kwargs)
        finally:
            now["saving"] = None

    def write_atomic(path, write):
        kind = now["saving"] is not None and planned(("killsave", "nospace"), 0, now["saving"])
        if kind:
            return real_write(path, lambda f: (write(f), during_save(kind, f)))
        return real_write(path, write)

    def arithmetic():
        mine = real_arithmetic()
        return mine + " (othercpu)" if planned(("othercpu",), rank_now(), 0) else mine

    def load_data(*args, **kwargs):
        kind = planned(("hangload", "termload"), rank_now(), 0)
        if kind == "termload":
            os.kill(os.getpid(), signal.SIGTERM)
        if kind == "hangload":
            inject("hang", 0, None, None)
        return real_load_data(*args, **kwargs)

    def load_config(*args, **kwargs):
        if planned(("hangconfig",), rank_now(), 0):
            inject("hang", 0, None, None)
        return real_load_config(*args, **kwargs)

    schedule.lr_at, dpbp.train.train_step, startup.load_data = lr_at, train_step, load_data
    config.load = load_config
    checkpoint.save, checkpoint.write_atomic, startup.arithmetic = save, write_atomic, arithmetic


def rank_now():
    """This rank, once MPI runs."""
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank()


def set_up_watchdog(seconds):
    """The commands start their watchdog with `seconds` until the config gives its own."""
    from dpbp.service.config import RunConfig
    RunConfig.watchdog_seconds = float(seconds)


if __name__ == "__main__":
    install(parse(os.environ["DPBP_FAULT"]), os.environ.get("DPBP_FAULT_ONCE"))
    if os.environ.get("DPBP_FAULT_WATCHDOG"):
        set_up_watchdog(os.environ["DPBP_FAULT_WATCHDOG"])
    if len(sys.argv) > 1 and not sys.argv[1].startswith("-"):
        module, sys.argv = sys.argv[1], sys.argv[1:]
    else:   # python -m tests.faults [ARGS]: the trainer
        module, sys.argv = "dpbp.train", ["dpbp.train", *sys.argv[1:]]
    importlib.import_module(module).cli()
