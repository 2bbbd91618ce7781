"""The one exception type for problems the user can fix: bad config, bad data, bad files,
bad command lines."""

import argparse


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2, no traceback."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are UserErrors (so ranks agree and report them once), with a
    pointer to --help."""

    def error(self, message):
        raise UserError(f"{message} (see {self.prog} --help)")
