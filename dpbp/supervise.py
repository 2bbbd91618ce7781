"""Watching over a run: stop requests from signals, and a watchdog for ranks that hang.

`StopSignals` turns SIGTERM (Slurm preemption, `kill`) and SIGINT (Ctrl-C) into a request
that the training loop sees at its next step; the ranks agree on it collectively, save a
checkpoint and exit 128 + the signal's number, so `--resume` continues exactly. A second
signal of the same kind is not caught: it ends the process at once.

`Watchdog` is a thread that ends the job when the training loop has not called `feed()`
for `seconds`: a rank stuck in I/O, or waiting in a collective on a peer that is gone.
Every rank has one, so every stuck rank prints its stack before the job ends.
"""

import faulthandler
import signal
import sys
import threading
import time


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
