"""Fault injection for testing that failures never hang the job. Off unless set.

    DPBP_FAULT=KIND:RANK:STEP    e.g. DPBP_FAULT=raise:1:3

makes rank RANK, just before optimizer step STEP (counted from 0 over the whole run),
raise an exception (`raise`), call sys.exit(5) (`exit`), kill itself with SIGKILL
(`kill`) or sleep forever (`hang`).
"""

import functools
import os
import signal
import sys
import time

KINDS = ("raise", "exit", "kill", "hang")


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


def inject(rank, step):
    """Carry out the planned fault if this is its rank and step; otherwise nothing."""
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
    while True:
        time.sleep(3600)
