"""A stop signal at a chosen point of the training command's start, from the test side.

    python -m tests.signal_at SIGNAL POINT ENTRY [ARGS...]

starts dpbp.train with ARGS the way ENTRY does (`-m`: as `python -m dpbp.train` runs it;
`script`: as the `dpbp-train` script does, through the function pyproject.toml names)
and sends this process SIGNAL (SIGINT, SIGTERM or SIGHUP) at POINT:

    import:MODULE           just before MODULE is first imported (import:numpy)
    call:MODULE.FUNCTION    at the first call of FUNCTION of MODULE (call:dpbp.parallel.comm.init)

Nothing of dpbp or numpy is imported here before ENTRY runs, and dpbp knows nothing of
this: an import hook (sys.meta_path) and a profile hook (sys.setprofile) watch from
outside. The signal reaches the process at once, by os.kill, in the middle of what
POINT names.
"""

import os
import runpy
import signal
import sys


class SignalAt:
    """Sends `signum` to this process at `point`, once."""

    def __init__(self, signum, point):
        self.signum, (self.kind, self.target) = signum, point.split(":", 1)
        self.done = False

    def fire(self):
        if not self.done:
            self.done = True
            os.kill(os.getpid(), self.signum)

    def find_spec(self, name, path=None, target=None):   # sys.meta_path: every import
        if self.kind == "import" and name == self.target:
            self.fire()
        return None   # the usual finders find it

    def profile(self, frame, event, arg):   # sys.setprofile: every call
        if event == "call" and self.kind == "call" and not self.done:
            module, function = self.target.rsplit(".", 1)
            if frame.f_code.co_name == function and frame.f_globals.get("__name__") == module:
                self.fire()


def main():
    name, point, entry, *args = sys.argv[1:]
    at = SignalAt(signal.Signals[name], point)
    sys.meta_path.insert(0, at)
    sys.setprofile(at.profile)
    if entry == "-m":
        sys.argv = [sys.argv[0], *args]
        runpy.run_module("dpbp.train", run_name="__main__", alter_sys=True)
    else:
        sys.argv = ["dpbp-train", *args]
        from dpbp.entry import train   # the [project.scripts] entry of dpbp-train
        train()


if __name__ == "__main__":
    main()
