"""Fault injection for testing that failures are handled and never hang the job. Off unless
the variable is set.

    DPBP_FAULT=KIND:RANK:STEP    e.g. DPBP_FAULT=raise:1:3

Just before optimizer step STEP (counted from 0 over the whole run), rank RANK
    raise      raises an exception
    exit       calls sys.exit(5)
    kill       kills itself with SIGKILL
    hang       sleeps forever (the watchdog's case)
    nan        puts a NaN into its shard of the batch (a non-finite loss and gradient)
    perturb    adds 1e-3 to its parameters (replicas that no longer agree)
    sigterm    sends itself SIGTERM (as Slurm does before preempting a job)
    sigint     sends itself SIGINT (as Ctrl-C does)
and, while rank 0 writes the checkpoint taken when STEP steps are done (RANK must be 0),
    killsave   kills itself with SIGKILL half-way through the file
    nospace    fails as a full disk does (OSError ENOSPC)
and at start-up (STEP 0) under train.deterministic, rank RANK
    othercpu   reports other numpy code paths and BLAS kernels (a node of another CPU type)
"""

import errno
import functools
import os
import signal
import sys
import time

KINDS = ("raise", "exit", "kill", "hang", "nan", "perturb", "sigterm", "sigint", "killsave",
         "nospace", "othercpu")


def parse(text):
    """(kind, rank, step) from the variable's text, or None when it is unset."""
    if not text:
        return None
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in KINDS or not all(p.isdigit() for p in parts[1:]):
        raise ValueError(f"DPBP_FAULT={text!r}: expected KIND:RANK:STEP with KIND one of "
                         f"{', '.join(KINDS)}")
    return parts[0], int(parts[1]), int(parts[2])


@functools.cache
def _planned():
    return parse(os.environ.get("DPBP_FAULT", ""))


def inject(rank, step, x, params):
    """Carry out the planned fault if this is its rank and step; otherwise nothing.
    `x` is this rank's copy of its shard of the batch, `params` its flat parameters."""
    fault = _planned()
    if fault is None or fault[1:] != (rank, step):
        return
    kind = fault[0]
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


def during_save(step, f):
    """Rank 0, half-way through writing the checkpoint taken after `step` steps to file f."""
    fault = _planned()
    if fault is None or fault[0] not in ("killsave", "nospace") or fault[2] != step:
        return
    f.flush()
    f.truncate(f.tell() // 2)
    if fault[0] == "killsave":
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def arithmetic(rank, description):
    """What rank `rank` reports as its numpy and BLAS (threads.arithmetic): `description`,
    or, under othercpu for this rank, another one."""
    fault = _planned()
    if fault is not None and fault[:2] == ("othercpu", rank):
        return description + " (othercpu)"
    return description
