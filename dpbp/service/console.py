"""What a command shows: rank 0's lines and the progress bar.

A closed output (`python -m dpbp.train | head -1`) is not a failure of the run: the
lines stop, training goes on, and the run ends as it would have. The progress bar goes
where a person can see it: rank 0's stdout when that is a terminal, or, under an MPI
launcher (which pipes rank 0's output to itself), the terminal that the launcher writes
to, when it writes to one; never into logs, unless asked for.
"""

import os
import sys

from dpbp.service import processes


class Console:
    """say(...) prints like print() on the rank that speaks (rank 0, unless --quiet)."""

    def __init__(self, speaks):
        self.speaks = speaks
        if speaks and hasattr(sys.stdout, "reconfigure"):
            sys.stdout.reconfigure(line_buffering=True)   # each line as it ends, in pipes too

    def __call__(self, *args, **kwargs):
        if not self.speaks:
            return
        try:
            print(*args, **kwargs)
        except BrokenPipeError:   # the reader is gone: say nothing more, train on
            self.speaks = False
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


class _NoBar:
    def update(self, n=1):
        pass

    def close(self):
        pass


class _Bar:
    """A tqdm bar that stops drawing, instead of failing the run, when its terminal goes."""

    def __init__(self, bar):
        self._bar = bar

    def update(self, n=1):
        self._call("update", n)

    def close(self):
        self._call("close")

    def _call(self, name, *args):
        try:
            getattr(self._bar, name)(*args)
        except OSError:
            self._bar = _NoBar()


def bar_output(mode, launched):
    """Where the progress bar is drawn under `mode` ("auto", "on", "off"), or None."""
    if mode == "off":
        return None
    if sys.stdout.isatty():
        return sys.stdout
    terminal = launcher_terminal() if launched else None
    if terminal is not None:
        return terminal
    return sys.stderr if mode == "on" else None


def launcher_terminal(generations=4):
    """The terminal that this rank's launcher writes to, opened for writing, or None.

    A launcher (MPICH's hydra, Open MPI's prte) starts its ranks in sessions of their own,
    without a controlling terminal, their output piped to it; so look up the process tree
    (Linux's /proc) for the launcher's own standard output, and use it if it is a
    terminal this user may write to."""
    pid = os.getppid()
    for _ in range(generations):
        try:
            target = os.readlink(f"/proc/{pid}/fd/1")
            if target.startswith(("/dev/pts/", "/dev/tty")):
                out = open(target, "w")
                if out.isatty():
                    return out
                out.close()
            pid = processes.stat(pid)[0]   # its parent
        except (OSError, ValueError):
            return None
        if pid <= 1:
            return None
    return None


class Progress:
    """The epoch's progress bars, on rank 0, where bar_output puts them."""

    def __init__(self, console, mode, launched):
        self.file = bar_output(mode, launched) if console.speaks else None

    def bar(self, total, done, description):
        if self.file is None:
            return _NoBar()
        from tqdm import tqdm
        try:
            return _Bar(tqdm(total=total, initial=done, desc=description, unit="step",
                             leave=False, file=self.file, dynamic_ncols=True))
        except OSError:   # the terminal is gone
            self.file = None
            return _NoBar()
