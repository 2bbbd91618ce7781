"""Rank 0's standard output passed on late, as a busy launcher passes it: from the test side.

    mpirun -n 2 python -m tests.held_output [ARGS...]      # dpbp.train ARGS

An MPI launcher passes rank 0's output on through a pipe, and on a busy machine it passes
it on late. Here what rank 0 writes to sys.stdout is held back, and passed on only once
the next progress bar has been drawn (dpbp's Progress.bar has returned): every epoch's
line arrives after the next epoch's bar was drawn. A bar drawn through standard output
stays in order with the lines; a bar drawn any other way lands ahead of the line before
it, every time. The other ranks run dpbp.train as it is. dpbp knows nothing of this:
sys.stdout is replaced and Progress.bar wrapped from outside.
"""

import sys


class HeldOutput:
    """sys.stdout, but what is written to it waits for release(); the rest (fileno,
    isatty, reconfigure, ...) is the real stream's."""

    def __init__(self, real):
        self.real, self.held = real, []

    def write(self, text):
        self.held.append(text)
        return len(text)

    def flush(self):
        pass

    def release(self):
        self.real.write("".join(self.held))
        self.real.flush()
        self.held = []

    def __getattr__(self, name):
        return getattr(self.real, name)


def main():
    from mpi4py import MPI   # dpbp.train starts MPI the same way right after
    held = HeldOutput(sys.stdout) if MPI.COMM_WORLD.Get_rank() == 0 else None
    if held is not None:
        from dpbp.service import console
        real_bar = console.Progress.bar

        def bar(self, *args):
            drawn = real_bar(self, *args)
            held.release()
            return drawn

        console.Progress.bar, sys.stdout = bar, held
    import dpbp.train
    sys.argv = ["dpbp.train", *sys.argv[1:]]
    try:
        dpbp.train.cli()
    finally:
        if held is not None:
            held.release()


if __name__ == "__main__":
    main()
