"""Watching over a run: stop requests from signals, and a watchdog for ranks that hang.

`StopSignals` turns SIGTERM (Slurm preemption, `kill`), SIGINT (Ctrl-C) and SIGHUP (a
closed terminal or ssh session, or a launcher that is gone) into a request that the
training loop sees within a step or two: `StopVote` lets the ranks agree on it
collectively (so all stop after the same step), then they save a checkpoint and exit
128 + the signal's number, and `--resume` continues exactly. A second signal of the same
kind is not caught: it ends the process at once.

`Watchdog` is a thread that ends the job when the training loop has not called `feed()`
for `seconds`: a rank stuck in I/O, or waiting in a collective on a peer that is gone.
Every rank has one, so every stuck rank prints its stack before the job ends.
"""

import faulthandler
import os
import signal
import sys
import threading
import time

import numpy as np

from dpbp import entry
from dpbp.errors import Stopped
from dpbp.parallel import comm as mpi


class StopSignals:
    """SIGTERM, SIGINT and SIGHUP as stop requests, from a command's start (a context
    manager, installed in the main thread); one that came earlier, since the command's
    first line (entry.hold), ends set-up at once.

    Before `defer()`, in set-up, a signal raises errors.Stopped at once: nothing is
    trained yet, and the command ends with 128 + its number. After it, a signal only sets
    `received`, which the training loop sees within a step or two (StopVote) and answers
    with a checkpoint. A second signal of the same kind acts at once (the handler it
    replaced: SIGINT's KeyboardInterrupt, SIGTERM's and SIGHUP's end of the process).

    Under an MPI launcher (`launched`), a thread also watches this rank's parent, the
    launcher's process on this node: when it is gone (killed, or its node agent lost),
    the rank stops as on SIGHUP instead of training on as an orphan.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, launched=False, poll_seconds=0.5):
        self.received = 0        # the number of the first signal, 0 while none came
        self.deferred = False
        self._previous = {}
        self._launched, self._poll = launched, poll_seconds
        self._done = threading.Event()

    def defer(self):
        """From now on a signal is a request that the training loop answers."""
        self.deferred = True

    def _handler(self, signum, frame):
        self.received = self.received or signum
        signal.signal(signum, self._previous[signum])   # a second one acts at once
        if not self.deferred:
            raise Stopped(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = entry.handler_before(s, signal.signal(s, self._handler))
            if entry.noted():   # before these handlers, since the command's first line
                self.received = entry.noted()
                raise Stopped(self.received)
            if self._launched:
                threading.Thread(target=self._watch_launcher, args=(os.getppid(),),
                                 name="dpbp-launcher-watch", daemon=True).start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _watch_launcher(self, parent):
        while not self._done.wait(self._poll):
            if os.getppid() != parent:   # reparented: the launcher's process is gone
                print(f"dpbp: rank process {os.getpid()}: its launcher (process {parent}) "
                      "is gone; stopping as on SIGHUP", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGHUP)
                return


class StopVote:
    """Collective. The ranks' agreement on stopping. Every rank calls poll() once per
    step; it returns the number of a signal that some rank had received by the previous
    call, else 0, the same on every rank. The vote runs one step behind: a non-blocking
    max over ranks started at one call is collected at the next, so it adds no wait to a
    step. Leaving it (a context manager) completes the vote in flight."""

    def __init__(self, comm, signals):
        self.comm, self.signals = comm, signals
        self._ballot = np.zeros(1, np.int64)
        self._request = comm.start_allreduce_max_(self._ballot)

    def poll(self):
        mpi.wait(self._request)
        agreed = int(self._ballot[0])
        self._ballot[0] = self.signals.received
        self._request = self.comm.start_allreduce_max_(self._ballot)
        return agreed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        mpi.wait(self._request)


def signal_name(signum):
    return signal.Signals(signum).name


class Watchdog:
    """A daemon thread that calls `on_timeout()` (expected to end the job) after printing
    this rank's stacks, once `seconds` pass without `feed()`. seconds = 0: off.

    A command starts it before its first collective, with the default seconds until the
    config gives its own (`set_seconds`), so that set-up (reading the config and the data,
    the ranks' agreements) is watched as training is; `training()` says that steps began,
    for the message."""

    def __init__(self, seconds, rank, on_timeout):
        self.rank, self._on_timeout = rank, on_timeout
        self.doing = "set-up did not finish"
        self._stopped = threading.Event()
        self._thread = None
        self.set_seconds(seconds)

    def set_seconds(self, seconds):
        self.seconds = seconds
        self.feed()
        if seconds > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="dpbp-watchdog",
                                            daemon=True)
            self._thread.start()

    def training(self):
        self.doing = "no training step finished"
        self.feed()

    def feed(self):
        self._deadline = time.monotonic() + self.seconds

    def stop(self):
        self._stopped.set()

    def _watch(self):
        while not self._stopped.wait(min(1.0, self.seconds / 4 or 1.0)):
            if self.seconds > 0 and time.monotonic() > self._deadline:
                print(f"dpbp: rank {self.rank}: {self.doing} in {self.seconds:g} s "
                      f"(run.watchdog_seconds), {where_main_thread_is()}; its stack "
                      "follows; ending the job", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                self._on_timeout()
                return


def where_main_thread_is():
    """For the watchdog's line: "waiting in MPI for another rank" where the main thread
    is inside a communication verb (comm.py, where every wait for other ranks happens),
    else "stuck outside MPI (in FILE:LINE FUNCTION)": this rank is the one that froze.
    dpbp.launch reads it to name the rank that failed."""
    frame = sys._current_frames().get(threading.main_thread().ident)
    if frame is None:
        return "stuck outside MPI"
    if os.path.realpath(frame.f_code.co_filename) == os.path.realpath(mpi.__file__):
        return "waiting in MPI for another rank"
    return (f"stuck outside MPI (in {os.path.basename(frame.f_code.co_filename)}:"
            f"{frame.f_lineno} {frame.f_code.co_name})")
