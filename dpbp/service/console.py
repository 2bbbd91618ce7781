"""What a command shows: rank 0's lines and the progress bar.

A closed output (`python -m dpbp.train | head -1`) is not a failure of the run: the
lines stop, training goes on, and the run ends as it would have. The progress bar goes
where a person can see it, and always by the same way as the lines, so that the two never
interleave: rank 0's stdout when that is a terminal, or, under an MPI launcher (which
pipes rank 0's output to itself), rank 0's stdout too when the launcher writes it to a
terminal: MPICH's mpiexec passes a partial line ending in a carriage return on at once,
in order with the lines (measured: docs/operations.md). Never into logs, unless asked for.
"""

import contextlib
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


DEFAULT_SIZE = (80, 24)   # for a terminal that reports none: a fresh pseudo-terminal


def bar_output(mode, launched):
    """(file, terminal) for the progress bar under `mode` ("auto", "on", "off"): the file
    it is written to and the terminal it ends up on (whose width it takes), or None."""
    if mode == "off":
        return None
    if sys.stdout.isatty():
        return sys.stdout, sys.stdout
    terminal = launcher_terminal() if launched else None
    if terminal is not None:   # through the launcher, like the lines: never between them
        return sys.stdout, terminal
    return (sys.stderr, sys.stderr if sys.stderr.isatty() else None) if mode == "on" else None


def size(terminal):
    """(columns, lines) of `terminal` (a file, or None for a log); DEFAULT_SIZE's for
    those it reports as 0 (tqdm would then draw nothing)."""
    try:
        shape = os.get_terminal_size(terminal.fileno())
    except (AttributeError, OSError, ValueError):
        return DEFAULT_SIZE
    return shape.columns or DEFAULT_SIZE[0], shape.lines or DEFAULT_SIZE[1]


def launcher_terminal(generations=4):
    """The terminal where this rank's standard output ends up through its launcher,
    opened (to read its width), or None where it ends up anywhere else (a file, a pipe
    into `tee`: a log).

    A launcher (MPICH's hydra, Open MPI's prte) starts its ranks in sessions of their own,
    without a controlling terminal, and reads their output from pipes. Follow the output
    up the process tree (Linux's /proc): while a process's standard output is a pipe that
    its parent holds too, the parent is the one that passes it on; the first process
    whose parent does not is the launcher, and its own standard output is where the
    output goes. Taken when that is a terminal this user may write to."""
    pid = os.getpid()
    for _ in range(generations):
        try:
            target = os.readlink(f"/proc/{pid}/fd/1")
            parent = processes.stat(pid)[0]
            if pid != os.getpid() and target.startswith(("/dev/pts/", "/dev/tty")):
                out = open(target, "w")
                if out.isatty():
                    return out
                out.close()
            if parent <= 1 or not target.startswith("pipe:") or target not in open_files(parent):
                return None
            pid = parent
        except (OSError, ValueError):
            return None
    return None


def open_files(pid):
    """What the open file descriptors of process `pid` point to (readlink's names)."""
    folder = f"/proc/{pid}/fd"
    names = set()
    for fd in os.listdir(folder):
        with contextlib.suppress(OSError):   # closed meanwhile
            names.add(os.readlink(os.path.join(folder, fd)))
    return names


class Progress:
    """The epoch's progress bars, on rank 0, where bar_output puts them."""

    def __init__(self, console, mode, launched):
        self.file, self.terminal = (bar_output(mode, launched) if console.speaks else
                                    None) or (None, None)

    def bar(self, total, done, description):
        """A bar of `total` steps, `done` of them already, as wide as the terminal now is."""
        if self.file is None:
            return _NoBar()
        from tqdm import tqdm
        columns, lines = size(self.terminal)
        try:
            return _Bar(tqdm(total=total, initial=done, desc=description, unit="step",
                             leave=False, file=self.file, ncols=columns, nrows=lines))
        except OSError:   # the terminal is gone
            self.file = None
            return _NoBar()
