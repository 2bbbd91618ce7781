"""The one exception type for problems the user can fix: bad config, bad data, bad files."""


class UserError(Exception):
    """A problem with the user's input, reported as one line and exit code 2, no traceback."""
