"""Fault injection, from the test side: failures that dpbp must handle and never hang on.

    DPBP_FAULT=KIND:RANK:STEP python -m tests.faults MODULE [ARGS...]   # e.g. dpbp.train

runs `python -m MODULE ARGS` with one planned fault. Just before optimizer step STEP
(counted from 0 over the whole run), rank RANK
    raise      raises an exception
    exit       calls sys.exit(5)
    kill       kills itself with SIGKILL
    hang       sleeps for an hour (the watchdog's case)
    nan        puts a NaN into its shard of the batch (a non-finite loss and gradient)
    perturb    adds 1e-3 to its parameters (replicas that no longer agree)
    sigterm    sends itself SIGTERM (as Slurm does before preempting a job)
    sigint     sends itself SIGINT (as Ctrl-C does)
and, while rank 0 writes the checkpoint taken when STEP steps are done (RANK must be 0),
    killsave   kills itself with SIGKILL half-way through the file
    nospace    fails as a full disk does (OSError ENOSPC)
and at start-up (STEP 0) under train.deterministic, rank RANK
    othercpu   reports other numpy code paths and BLAS kernels (a node of another CPU type)

dpbp itself knows nothing of this: the faults wrap its functions from outside, the
training step (dpbp.train.train_step), the schedule that the loop asks for every step's
learning rate just before the step (which tells the step's number), the checkpoint
writer (dpbp.service.checkpoint.save and its write_atomic) and the arithmetic check
(dpbp.service.startup.arithmetic).
"""

import errno
import importlib
import os
import signal
import sys
import time

KINDS = ("raise", "exit", "kill", "hang", "nan", "perturb", "sigterm", "sigint", "killsave",
         "nospace", "othercpu")


def parse(text):
    """(kind, rank, step) from the variable's text."""
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in KINDS or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"DPBP_FAULT={text!r}: expected KIND:RANK:STEP with KIND one of "
                         f"{', '.join(KINDS)}")
    return parts[0], int(parts[1]), int(parts[2])


def inject(kind, step, x, params):
    """Carry out a fault of the step kinds on this rank, now. `x` is this rank's copy of
    its shard of the batch, `params` its flat parameters."""
    if kind == "raise":
        raise RuntimeError(f"injected fault at step {step}")
    if kind == "exit":
        sys.exit(5)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "nan":
        x[:1] = float("nan")
    if kind == "perturb":
        params += 1e-3
    if kind in ("sigterm", "sigint"):
        os.kill(os.getpid(), signal.SIGTERM if kind == "sigterm" else signal.SIGINT)
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


def install(kind, rank, step):
    """Wrap dpbp's functions so that the fault happens where and when it is planned."""
    import dpbp.train
    from dpbp.nn import schedule
    from dpbp.service import checkpoint, startup
    now = {"step": None, "saving": None}
    real_lr_at, real_step = schedule.lr_at, dpbp.train.train_step
    real_save, real_write, real_arithmetic = (checkpoint.save, checkpoint.write_atomic,
                                              startup.arithmetic)

    def lr_at(tc, s, steps_per_epoch):
        now["step"] = s
        return real_lr_at(tc, s, steps_per_epoch)

    def train_step(model, optimizer, loss_fn, x, y, N, summed, *args):
        if (summed.comm.rank, now["step"]) == (rank, step):
            inject(kind, step, x, model.params)
        return real_step(model, optimizer, loss_fn, x, y, N, summed, *args)

    def save(path, model, optimizer, position, *args, **kwargs):
        now["saving"] = position.step
        try:
            return real_save(path, model, optimizer, position, *args, **kwargs)
        finally:
            now["saving"] = None

    def write_atomic(path, write):
        if kind in ("killsave", "nospace") and now["saving"] == step:
            return real_write(path, lambda f: (write(f), during_save(kind, f)))
        return real_write(path, write)

    def arithmetic():
        mine = real_arithmetic()
        return mine + " (othercpu)" if kind == "othercpu" and rank_now() == rank else mine

    schedule.lr_at, dpbp.train.train_step = lr_at, train_step
    checkpoint.save, checkpoint.write_atomic, startup.arithmetic = save, write_atomic, arithmetic


def rank_now():
    """This rank, once MPI runs."""
    from mpi4py import MPI
    return MPI.COMM_WORLD.Get_rank()


if __name__ == "__main__":
    install(*parse(os.environ["DPBP_FAULT"]))
    module, sys.argv = sys.argv[1], sys.argv[1:]
    importlib.import_module(module).cli()
