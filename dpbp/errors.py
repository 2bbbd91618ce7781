"""The one exception type for problems the user can fix (bad config, bad data, bad files,
bad command lines), the command-line parser that raises it, and the exit codes."""

import argparse

from dpbp import __version__

EXIT_BAD_INPUT = 2   # a UserError: reported once, nothing written
EXIT_DIVERGED = 3    # training stopped: a non-finite loss, or replicas that differ
EXIT_HUNG = 4        # the watchdog ended the job: no step finished in run.watchdog_seconds
EXIT_RESTARTS_EXHAUSTED = 75   # dpbp.launch gave up: restarts used up, or too few slots left


def plural(n, noun, nouns=None):
    """'1 epoch', '2 epochs'; `nouns` where adding an s is wrong ('2 batches')."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2, no traceback."""


class Stopped(BaseException):
    """A stop signal (SIGTERM, SIGINT, SIGHUP) that came before training began: the command
    ends with 128 + its number, nothing trained and nothing half-written."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (so ranks agree and report them once), with a
    pointer to --help. Options added with required=True show as required in the usage
    line, and are required unless --help or --version is asked for."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="store_true", help="print dpbp's version and exit")

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")

    def parse_args(self, args=None, namespace=None):
        needed = [a for a in self._actions if a.required and a.option_strings]
        for action in needed:   # checked below, once --help and --version are known
            action.required = False
        try:
            parsed = super().parse_args(args, namespace)
        finally:
            for action in needed:
                action.required = True
        missing = [a.option_strings[-1] for a in needed if getattr(parsed, a.dest) is None]
        if missing and not (getattr(parsed, "help", False) or parsed.version):
            self.error(f"{', '.join(missing)} required")
        return parsed

    def answered(self, args, say=print):
        """Whether `args` asked for --help or --version, printed with `say` (rank 0's)."""
        if args.version or args.help:
            say(f"dpbp {__version__}" if args.version else self.format_help().rstrip())
        return args.version or args.help
