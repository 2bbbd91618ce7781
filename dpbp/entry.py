"""The first lines of the training command: stop signals held from there on.

`python -m dpbp.train` and the `dpbp-train` script import numpy and MPI, a second or so,
before the command's StopSignals (service/supervise.py) watches over it. A stop signal
in that time would end it halfway through an import: a KeyboardInterrupt traceback for
Ctrl-C, a death without a word for SIGTERM. So the command's first line calls hold():
SIGTERM, SIGINT and SIGHUP are then noted, not acted on, until StopSignals takes over,
which ends set-up for the first one noted with the documented line and exit code
(128 + its number). Importing this module does nothing; only the entry points call hold().
"""

import importlib
import signal

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_held = {"first": 0, "replaced": {}}   # the first signal noted; the handlers hold() replaced


def hold():
    """From now until StopSignals takes over, note stop signals instead of acting on them."""
    for s in SIGNALS:
        _held["replaced"][s] = signal.signal(s, _note)


def _note(signum, frame):
    _held["first"] = _held["first"] or signum


def noted():
    """The first stop signal noted since hold(), or 0."""
    return _held["first"]


def handler_before(signum, handler):
    """`handler` (the one a new handler of `signum` replaced), or, where that was hold()'s
    note, the handler that hold() replaced: the one a second signal must reach."""
    return _held["replaced"].get(signum, handler) if handler is _note else handler


def train():
    """The `dpbp-train` script: `python -m dpbp.train`, stop signals held from here."""
    hold()
    importlib.import_module("dpbp.train").cli()
