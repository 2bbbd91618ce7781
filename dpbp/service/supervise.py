"""Watching over a run: stop requests from signals, and a watchdog for ranks that hang.

`StopSignals` turns SIGTERM (Slurm preemption, `kill`) and SIGINT (Ctrl-C) into a request
that the training loop sees within a step or two: `StopVote` lets the ranks agree on it
collectively (so all stop after the same step), then they save a checkpoint and exit
128 + the signal's number, and `--resume` continues exactly. A second signal of the same
kind is not caught: it ends the process at once.

`Watchdog` is a thread that ends the job when the training loop has not called `feed()`
for `seconds`: a rank stuck in I/O, or waiting in a collective on a peer that is gone.
Every rank has one, so every stuck rank prints its stack before the job ends.
"""

import faulthandler
import signal
import sys
import threading
import time

import numpy as np


class StopSignals:
    """While installed (a context manager), SIGTERM and SIGINT set `received` instead of
    ending the process."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received = 0        # the number of the first signal, 0 while none came
        self._previous = {}

    def _handler(self, signum, frame):
        self.received = self.received or signum
        signal.signal(signum, self._previous[signum])   # a second one acts at once

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


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
        self._request.Wait()
        agreed = int(self._ballot[0])
        self._ballot[0] = self.signals.received
        self._request = self.comm.start_allreduce_max_(self._ballot)
        return agreed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._request.Wait()


def signal_name(signum):
    return signal.Signals(signum).name


class Watchdog:
    """A daemon thread that calls `on_timeout()` (expected to end the job) after printing
    this rank's stacks, once `seconds` pass without `feed()`. seconds = 0: off."""

    def __init__(self, seconds, rank, on_timeout):
        self.seconds, self.rank, self._on_timeout = seconds, rank, on_timeout
        self._deadline = time.monotonic() + seconds
        self._stopped = threading.Event()
        if seconds > 0:
            threading.Thread(target=self._watch, name="dpbp-watchdog", daemon=True).start()

    def feed(self):
        self._deadline = time.monotonic() + self.seconds

    def stop(self):
        self._stopped.set()

    def _watch(self):
        while not self._stopped.wait(min(1.0, self.seconds / 4)):
            if time.monotonic() > self._deadline:
                print(f"dpbp: rank {self.rank}: no training step finished in "
                      f"{self.seconds:g} s (run.watchdog_seconds); its stack follows; "
                      "ending the job", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
                self._on_timeout()
                return
